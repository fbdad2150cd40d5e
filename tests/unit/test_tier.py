"""tier.py: the `tier:` config, outage bookkeeping, the store's shared-knowledge hooks and the
fills' source (object store first, one leader per digest). The real S3 + Redis are in
tests/e2e/test_tier.py; these pin the decisions with stand-ins for the two backends."""

from __future__ import annotations

import io
import logging

import pytest

from regcachelib import tier as tiermod
from regcachelib.config import ConfigError, parse_config
from regcachelib.tier import Backend, SharedBlobResponse, TierSource, parse_tier

from .helpers import random_bytes, sha256

TIER_YAML = """
tier:
  node: n1
  s3: {endpoint: "http://10.0.0.5:7480", bucket: cache, region: us-east-1, access_key_env: K, secret_key_env: S}
  redis: {url: "redis://10.0.0.5:6379/0"}
"""


def test_tier_config_is_parsed():
    config = parse_config(TIER_YAML)
    assert config.tier.bucket == "cache" and config.tier.node == "n1"
    assert config.tier.redis_url == "redis://10.0.0.5:6379/0" and config.tier.access_key_env == "K"
    assert parse_config("size_limit: 1GiB").tier is None  # no section: a single node, as before
    assert config.tier.redirect is False
    assert parse_config(TIER_YAML + "  redirect: true\n").tier.redirect is True


@pytest.mark.parametrize("section, why", [
    ("tier: yes", "expected a mapping"),
    ("tier: {s3: {bucket: b}}", "redis"),
    ("tier: {redis: {url: 'redis://x'}}", "bucket"),
    ("tier: {s3: {bucket: b, secret: x}, redis: {url: 'redis://x'}}", "unknown"),
    ("tier: {s3: {bucket: b}, redis: {url: 'redis://x'}, nodes: 3}", "unknown"),
    ("tier: {s3: {bucket: b}, redis: {url: 'redis://x'}, redirect: sometimes}", "true or false"),
])
def test_bad_tier_config_is_refused_with_its_location(section, why):
    with pytest.raises(ConfigError, match=why) as e:
        parse_config(section, "regcache.yml")
    assert "regcache.yml:1" in str(e.value) and "tier" in str(e.value)


def test_an_outage_is_logged_once_and_its_end_once(caplog):
    backend = Backend("s3", "object store")
    caplog.set_level(logging.INFO, logger="regcachelib.tier")
    for _ in range(3):
        backend.failed(ConnectionRefusedError("refused"))
    assert not backend.usable and backend.outages == 1
    backend.ok()
    backend.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in lines) == 1 and sum("sharing resumes" in m for m in lines) == 1
    backend.failed(TimeoutError("slow"))
    assert backend.outages == 2


class FakeShared:
    """The knowledge half of a Tier, in memory."""

    def __init__(self):
        self.members, self.public, self.tags, self.manifests = set(), {}, {}, {}

    def holds(self, registry, repo, digest):
        return (registry, repo, digest) in self.members

    def add_members(self, registry, repo, digests):
        self.members.update((registry, repo, d) for d in digests)

    def get_public(self, registry, repo):
        return self.public.get((registry, repo), (None, 0.0))

    def set_public(self, registry, repo, public, checked):
        self.public[(registry, repo)] = (public, checked)

    def tag_entries(self, registry, repo, tag):
        return dict(self.tags.get((registry, repo, tag), {}))

    def set_tag(self, registry, repo, tag, media_type, digest, checked):
        self.tags.setdefault((registry, repo, tag), {})[media_type] = (digest, checked)

    def put_manifest(self, digest, media_type, body):
        self.manifests[digest] = (media_type, body)


def test_store_shares_what_it_learns_and_reads_what_others_learnt(store):
    shared = store.shared = FakeShared()
    d1, d2 = sha256(b"one"), sha256(b"two")
    store.add_members("docker.io", "library/a", [d1])
    assert ("docker.io", "library/a", d1) in shared.members
    shared.add_members("docker.io", "library/b", [d2])  # another node learnt it
    assert store.holds("docker.io", "library/b", d2) and not store.holds("docker.io", "library/b", d1)

    store.set_public("docker.io", "library/a", True, checked=100.0)
    assert shared.public[("docker.io", "library/a")] == (True, 100.0)
    shared.set_public("docker.io", "library/a", False, 200.0)  # a newer verdict of another node wins
    assert store.get_public("docker.io", "library/a") == (False, 200.0)

    mt = "application/vnd.oci.image.manifest.v1+json"
    store.set_tag("docker.io", "library/a", "1", mt, d1, now=100.0)
    assert shared.tags[("docker.io", "library/a", "1")][mt] == (d1, 100.0)
    shared.set_tag("docker.io", "library/a", "1", mt, d2, 300.0)
    entry = store.find_tag("docker.io", "library/a", "1", None)
    assert (entry.digest, entry.checked_at) == (d2, 300.0)

    store.put_manifest(d1, mt, b"{}")
    store.put_manifest(d2, mt, b"{}", share=False)  # read from the tier: not written back
    assert list(shared.manifests) == [d1]


class FakeTier:
    def __init__(self, objects=None, holder=None):
        self.objects = dict(objects or {})
        self.holder = holder  # node holding the lease, or None
        self.s3_health = Backend("s3", "object store")
        self.config = tiermod.TierConfig(None, "b", None, None, None, "redis://x", "this-node")
        self.bytes_read = 0
        self.leases = 0
        self.looks = 0
        self.appear_after = None  # (looks, digest, data): another node's object shows up

    def open_blob(self, digest, start=0):
        self.looks += 1
        data = self.objects.get(digest)
        return None if data is None else (io.BytesIO(data[start:]), len(data) - start, "application/octet-stream")

    def try_lease(self, digest):
        if self.holder is not None:
            return None
        self.leases += 1
        return tiermod.NoLease()

    def lease_info(self, digest):
        self.looks_at_lease = getattr(self, "looks_at_lease", 0) + 1
        if self.appear_after and self.looks_at_lease >= self.appear_after[0]:
            self.holder = None  # the leader is done: its object is there
            self.objects[self.appear_after[1]] = self.appear_after[2]
        if self.holder is None:
            return None
        base = getattr(self, "peer_base", None)
        return tiermod.LeaseInfo.parse(f"{self.holder}:1" + (f" {base}" if base else ""))

    def peer_url(self, base, digest):
        return f"{base}{tiermod.PEER_PREFIX}{digest}?exp=1&sig=x"


class FakeUpstream:
    def __init__(self):
        self.requests = []
        self.body = b""

    def request(self, method, target, path, headers):
        self.requests.append((method, path))
        return FakeResponse(self.body)


class FakeResponse:
    status = 200
    headers = [("Content-Type", "application/octet-stream")]

    def __init__(self, body=b""):
        self._body = io.BytesIO(body)
        self.content_length = len(body)

    def header(self, name):
        return "application/octet-stream"

    def end_deadline(self):
        pass

    def read1(self, n):
        return self._body.read(n)

    def close(self):
        pass

    discard = close


def test_source_reads_the_object_store_first(store):
    data = random_bytes(3000)
    digest = sha256(data)
    upstream = FakeUpstream()
    source = TierSource(upstream, FakeTier({digest: data}), store)
    resp = source.request("GET", None, f"/v2/library/a/blobs/{digest}", [])
    assert isinstance(resp, SharedBlobResponse) and resp.content_length == 3000
    assert resp.read1(1 << 20) == data and upstream.requests == []


def test_follower_waits_for_the_leaders_object_instead_of_fetching(store, monkeypatch):
    monkeypatch.setattr(tiermod, "POLL_SECONDS", 0.01)
    data = random_bytes(1000)
    digest = sha256(data)
    upstream, tier = FakeUpstream(), FakeTier(holder="node-b")
    tier.appear_after = (4, digest, data)
    resp = TierSource(upstream, tier, store).request("GET", None, f"/v2/r/blobs/{digest}", [])
    assert isinstance(resp, SharedBlobResponse) and upstream.requests == [] and tier.leases == 0
    assert tier.looks == 2  # the bucket is looked at before waiting and once the lease is gone


def test_object_store_down_goes_straight_upstream(store):
    digest = sha256(b"x")
    upstream, tier = FakeUpstream(), FakeTier(holder="node-b")
    tier.s3_health.failed(ConnectionRefusedError())
    resp = TierSource(upstream, tier, store).request("GET", None, f"/v2/r/blobs/{digest}", [])
    assert isinstance(resp, FakeResponse) and len(upstream.requests) == 1


def test_leader_fetches_upstream_under_its_lease_and_manifests_pass_by(store):
    digest = sha256(b"y")
    upstream, tier = FakeUpstream(), FakeTier()
    source = TierSource(upstream, tier, store)
    resp = source.request("GET", None, f"/v2/r/blobs/{digest}", [])
    assert isinstance(resp, tiermod.LeadingResponse) and tier.leases == 1
    resp.close()  # nothing stored (no verified blob): nothing uploaded, the lease released
    source.request("GET", None, "/v2/r/manifests/latest", [])
    assert [p for _, p in upstream.requests] == [f"/v2/r/blobs/{digest}", "/v2/r/manifests/latest"]


def test_a_corrupt_shared_object_is_removed_so_the_next_request_goes_upstream(store):
    data = random_bytes(5000)
    digest = sha256(data)
    tier = FakeTier({digest: data[:-1] + b"!"})
    tier.removed = []
    tier.remove_blob = tier.removed.append
    resp = TierSource(FakeUpstream(), tier, store).request("GET", None, f"/v2/r/blobs/{digest}", [])
    while resp.read1(1024):
        pass
    assert tier.removed == [digest]


# --- streaming a fill in progress from the leader (peer streaming) ----------------------------------------


def test_peer_settings_are_parsed_and_checked():
    config = parse_config(TIER_YAML + "  peer_port: 7001\n  peer_address: 10.0.0.7\n")
    assert (config.tier.peer_port, config.tier.peer_address) == (7001, "10.0.0.7")
    assert parse_config(TIER_YAML).tier.peer_port == tiermod.PEER_PORT
    for bad, why in (("peer_port: 70000", "peer_port"), ("peer_port: yes", "peer_port"),
                     ("peer_address: 'http://x/'", "peer_address")):
        with pytest.raises(ConfigError, match=why):
            parse_config(TIER_YAML + f"  {bad}\n")


def test_a_lease_names_its_node_and_where_its_fill_streams_from():
    info = tiermod.LeaseInfo.parse("node-a:0a1b2c http://10.0.0.1:5081")
    assert (info.node, info.peer_base) == ("node-a", "http://10.0.0.1:5081")
    assert tiermod.LeaseInfo.parse("node-a:0a1b2c").peer_base is None  # a node without a peer listener


class FakeRedis:
    def __init__(self):
        self.values = {}

    def set(self, key, value, nx=False, px=None):
        if nx and key in self.values:
            return None
        self.values[key] = value.encode() if isinstance(value, str) else value
        return True

    def get(self, key):
        return self.values.get(key)

    def eval(self, script, numkeys, *args):  # a lease's renewal and release
        return 0


def make_tier(redis_client, node="n1"):
    config = parse_config(TIER_YAML).tier
    return tiermod.Tier(tiermod.TierConfig(**{**config.__dict__, "node": node}), s3=object(),
                        redis_client=redis_client)


def test_peer_urls_are_good_only_signed_with_the_tiers_key_and_until_they_expire():
    shared = FakeRedis()
    leader, follower = make_tier(shared, "a"), make_tier(shared, "b")
    leader.serve_peers(5081)
    assert leader.peer_key() == follower.peer_key()  # created once (SET NX), read by the other
    digest = sha256(b"blob")
    url = follower.peer_url(leader.peer_base, digest, now=1000.0)
    target = url[url.index(tiermod.PEER_PREFIX):]
    assert leader.verify_peer(target, now=1010.0) == (digest, "")
    assert leader.verify_peer(target, now=1000.0 + tiermod.PEER_URL_TTL + 1)[1] == "peer URL expired"
    other = sha256(b"another blob")
    assert leader.verify_peer(target.replace(digest, other), now=1010.0)[0] is None  # altered
    assert leader.verify_peer(target.split("?")[0], now=1010.0)[0] is None  # unsigned
    outsider = make_tier(FakeRedis(), "x")  # another tier's key
    forged = outsider.peer_url(leader.peer_base, digest, now=1000.0)
    assert leader.verify_peer(forged[forged.index(tiermod.PEER_PREFIX):], now=1010.0)[0] is None


def test_leases_carry_the_peer_url_only_once_the_node_serves_peers():
    shared = FakeRedis()
    tier = make_tier(shared, "a")
    digest = sha256(b"x")
    tier.try_lease(digest).release()
    assert tier.lease_info(digest).peer_base is None
    shared.values.clear()
    tier.serve_peers(6001)
    lease = tier.try_lease(digest)
    info = tier.lease_info(digest)
    assert info.node == "a" and info.peer_base.endswith(":6001") and lease.token == info.token
    lease.release()


class BreakingPeer:
    """A leader's peer listener that promises the whole blob and dies after part of it."""

    def __init__(self, data: bytes, cut: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("taken_over_by", ["object store", "this node"])
def test_a_broken_peer_stream_continues_from_whoever_takes_over(store, monkeypatch, taken_over_by):
    """The leader dies mid-stream: the follower's response goes on from the byte where it broke,
    read from the object store once the blob is there, or from upstream under its own lease
    (skipping what it had); the bytes together are the blob."""
    monkeypatch.setattr(tiermod, "POLL_SECONDS", 0.01)
    data = random_bytes(300_000)
    digest = sha256(data)
    peer = BreakingPeer(data, 100_000)
    try:
        tier = FakeTier(holder="node-a")
        tier.peer_base = peer.base
        if taken_over_by == "object store":
            tier.appear_after = (3, digest, data)
        upstream = FakeUpstream()
        upstream.body = data
        source = TierSource(upstream, tier, store)
        resp = source.request("GET", None, f"/v2/r/blobs/{digest}", [])
        assert isinstance(resp, tiermod.PeerBlobResponse) and resp.content_length == len(data)
        got = b""
        while chunk := resp.read1(65536):
            got += chunk
            if len(got) >= 100_000 and taken_over_by == "this node":
                tier.holder = None  # the dead leader's lease expired
        resp.close()
    finally:
        peer.close()
    assert got == data
    assert (len(upstream.requests), tier.leases) == ((0, 0) if taken_over_by == "object store" else (1, 1))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_peer_listener_serves_signed_requests_only_and_caps_streams_and_connections(store, monkeypatch):
    """A blob this node holds (or is fetching) goes to a peer that presents a URL signed with the
    tier's key, ranges included; anything else gets a 403 OCI error; past the stream cap, a 503;
    past the connection cap, a closed connection."""
    import asyncio
    import os

    from regcachelib import blobserver
    from regcachelib.blobserver import BlobServer, Signer
    from regcachelib.fill import Fills

    from .helpers import http_request, stage_and_commit

    data = random_bytes(200_000)
    digest = stage_and_commit(store, data)
    leader = make_tier(FakeRedis(), "a")
    follower = make_tier(leader.redis, "b")

    async def scenario():
        server = BlobServer(store, Fills(store, FakeUpstream()), Signer(os.urandom(32)))
        await server.start(None, None)
        try:
            port = await server.start_peer(free_port(), leader.verify_peer)
            base = leader.serve_peers(port)  # the requests below go to 127.0.0.1:port
            leader.peer_key()  # read when the listener starts (addon.py), off the event loop
            url = follower.peer_url(base, digest)
            path = url[url.index(tiermod.PEER_PREFIX):]
            whole = await http_request(port, path)
            ranged = await http_request(port, path, {"Range": "bytes=1000-"})
            unsigned = await http_request(port, path.split("?")[0])
            other = make_tier(FakeRedis(), "x").peer_url(base, digest)
            forged = await http_request(port, other[other.index(tiermod.PEER_PREFIX):])
            monkeypatch.setattr(blobserver, "MAX_PEER_STREAMS", 0)
            busy = await http_request(port, path)
            monkeypatch.setattr(blobserver, "MAX_PEER_CONNECTIONS", 0)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await http_request(port, path)  # closed before it is read
            return whole, ranged, unsigned, forged, busy
        finally:
            await server.stop()

    whole, ranged, unsigned, forged, busy = asyncio.run(scenario())
    assert whole.status == 200 and whole.body == data
    assert ranged.status == 206 and ranged.body == data[1000:]
    for refused in (unsigned, forged):
        assert refused.status == 403 and b'"DENIED"' in refused.body
    assert busy.status == 503


def test_a_node_never_streams_from_itself_nor_twice_from_a_leader_that_failed(store, monkeypatch):
    """A lease of this very node (a fill of a replaced service set) or a leader whose stream
    could not be opened is waited for (its object), not asked again and again."""
    monkeypatch.setattr(tiermod, "POLL_SECONDS", 0.01)
    data = random_bytes(1000)
    digest = sha256(data)
    for holder, base in (("this-node", "http://127.0.0.1:9"), ("node-b", "http://127.0.0.1:9")):
        tier = FakeTier(holder=holder)
        tier.peer_base = base  # port 9: nobody listens
        tier.appear_after = (6, digest, data)
        opened = []

        def refused(cls, *args):
            opened.append(args)
            raise ConnectionRefusedError("refused")

        monkeypatch.setattr(tiermod.PeerStream, "open", classmethod(refused))
        resp = TierSource(FakeUpstream(), tier, store).request("GET", None, f"/v2/r/blobs/{digest}", [])
        assert isinstance(resp, SharedBlobResponse)
        assert len(opened) == (0 if holder == "this-node" else 1)

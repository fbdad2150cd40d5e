"""Issue 14: a cache tier — several regcache nodes sharing one S3 bucket (content) and one Redis
(knowledge, leases).

Real parts: a Ceph radosgw (S3) and a redis-server in the world's store namespace
(tests/world/tier.py), up to three real mitmdump nodes in the router namespace (each its own
cache dir and proxy port), skopeo and curl in the client namespace, the world's docker.io with
token auth and its blob CDN (whose access log counts every upstream download).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest

from tests.world.tier import StoreHost, tier_available
from tests.world.world import DOCKER_HOST, REGISTRY_PORTS

from .conftest import Regcache, dir_manifest_digest, log_errors_expected, skopeo_copy
from .test_faults import small_tmpfs  # noqa: F401 - a fixture: a 20 MiB tmpfs for a cache dir
from .test_singleflight import (big_layer, blob_url, cdn_gets, client_bundle, curl, pull_token, settle_logs,
                                sha256_file, throttled_upstream)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODE_PORTS = {"a": 8180, "b": 8190, "c": 8200}
CREDS = ["--src-creds", "testuser:testpass"]


@pytest.fixture(scope="module")
def store_host(world):
    reason = tier_available()
    if reason:
        pytest.skip(reason)
    host = StoreHost(world).up()
    yield host
    host.down()


@pytest.fixture
def tier(world, store_host, tmp_path, request):
    """Start tier nodes (a fresh bucket and empty Redis per test): tier.start("a")."""
    world.run(store_host.ns, ["redis-cli", "-h", store_host.ip, "flushall"])
    bucket = f"tier-{uuid.uuid4().hex[:12]}"
    nodes: dict[str, Regcache] = {}
    expected = log_errors_expected(request)

    def start(name: str, cache_dir: Path | None = None, bucket_name: str | None = None,
              redirect: bool = False) -> Regcache:
        port = NODE_PORTS[name]
        workdir = tmp_path / f"node-{name}-{len(nodes)}"
        workdir.mkdir()
        # every node of the world runs in the router namespace: a peer port of its own each
        config = (store_host.tier_config(bucket_name or bucket, f"node-{name}", redirect, peer_port=port + 1)
                  + "fastpath: off\n")
        rc = Regcache(world, workdir, cache_dir or workdir / "cache", [f"regular@{port}"], {}, config, expected)
        rc.env = store_host.node_env()
        rc.port = port
        nodes[name] = rc
        return rc.start([port])

    yield SimpleNamespace(start=start, bucket=bucket, host=store_host, nodes=nodes)
    for rc in nodes.values():
        rc.stop()


def env_for(world, rc) -> dict:
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{rc.port}", "SSL_CERT_FILE": str(client_bundle(rc))}


def curl_via(world, rc, url: str, out: Path, headers=()):
    return curl(world, rc, url, out, headers=headers, proxy=False,
                extra=["--proxy", f"http://{world.router_client_ip}:{rc.port}"])


def upstream_content_requests(world, start: dict[str, int]) -> list[dict]:
    """Blob and manifest requests upstream (registry and CDN) since start (log lengths)."""
    found = []
    for host, n in start.items():
        found += [e for e in world.request_log(host)[n:] if "/blobs/" in e["path"] or "/manifests/" in e["path"]
                  or host == world.cdn_host]
    return found


def log_marks(world) -> dict[str, int]:
    return {h: len(world.request_log(h)) for h in ("registry-1.docker.io", world.cdn_host)}


def wait_shared(host: StoreHost, bucket: str, digests, timeout: float = 60) -> dict:
    """The bucket once it holds every digest's object (uploads run after the client was served)."""
    keys = {f"blobs/sha256/{d.split(':')[1]}" for d in digests}
    deadline = time.monotonic() + timeout
    while True:
        listing = host.bucket(bucket)
        if keys <= set(listing["objects"]) or time.monotonic() > deadline:
            return listing
        time.sleep(0.3)


def test_warm_pull_through_another_node_reads_the_object_store(world, tier, tmp_path):
    """Cold pull through node A; node B, with an empty local store, pulls the same image with
    0 upstream blob or manifest requests: bytes and knowledge come from the tier."""
    img = world.image("docker.io/library/small:1")
    a, b = tier.start("a"), tier.start("b")

    first = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "a", env_for(world, a))
    assert first.returncode == 0, first.stderr + a.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "a") == img.manifest_digest
    listing = wait_shared(tier.host, tier.bucket, img.blobs)
    for digest in img.blobs:
        assert listing["objects"].get(f"blobs/sha256/{digest.split(':')[1]}") == img.layer_sizes[digest], listing
    assert f"manifests/sha256/{img.manifest_digest.split(':')[1]}" in listing["objects"], listing
    assert not listing["uploads"]

    settle_logs()
    marks = log_marks(world)
    second = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "b", env_for(world, b))
    assert second.returncode == 0, second.stderr + b.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "b") == img.manifest_digest
    for digest in img.blobs:
        assert sha256_file(tmp_path / "b" / digest.split(":")[1]) == digest
        assert f"tier: blob {digest} from the object store" in b.log_text()
    settle_logs()
    assert upstream_content_requests(world, marks) == [], "node B asked upstream for content"


def outage_lines(rc) -> list[str]:
    return [line for line in rc.log_text().splitlines() if "tier object store" in line and "unreachable" in line]


def test_object_store_outage_pulls_still_work_and_sharing_resumes(world, tier, tmp_path):
    """radosgw stopped: a node serves its local layer and passes misses through to upstream
    (right digests, one log line for the outage); radosgw back: sharing resumes."""
    small, s2 = world.image("docker.io/library/small:1"), world.image("docker.io/library/s2:1")
    a, b = tier.start("a"), tier.start("b")
    r = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "a1", env_for(world, a))
    assert r.returncode == 0, r.stderr
    wait_shared(tier.host, tier.bucket, small.blobs)

    tier.host.stop_s3()
    try:
        for node, ref, img, name in ((a, "library/small:1", small, "a2"), (b, "library/s2:1", s2, "b1"),
                                     (b, "library/small:1", small, "b2")):
            r = skopeo_copy(world, f"docker://registry-1.docker.io/{ref}", tmp_path / name, env_for(world, node))
            assert r.returncode == 0, r.stderr + node.log_text()[-3000:]
            assert dir_manifest_digest(tmp_path / name) == img.manifest_digest
            for digest in img.blobs:
                assert sha256_file(tmp_path / name / digest.split(":")[1]) == digest
        assert len(outage_lines(b)) == 1, outage_lines(b)
    finally:
        tier.host.start_s3()

    time.sleep(2.5)  # a failed backend is asked again after tier.RETRY_AFTER
    gcr = world.image("gcr.io/proj/small:1")
    r = skopeo_copy(world, "docker://gcr.io/proj/small:1", tmp_path / "b3", env_for(world, b))
    assert r.returncode == 0, r.stderr + b.log_text()[-3000:]
    assert "sharing resumes" in b.log_text()
    wait_shared(tier.host, tier.bucket, gcr.blobs)
    c = tier.start("c")
    settle_logs()
    start = len(world.request_log("gcr.io"))
    r = skopeo_copy(world, "docker://gcr.io/proj/small:1", tmp_path / "c1", env_for(world, c))
    assert r.returncode == 0, r.stderr + c.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "c1") == gcr.manifest_digest
    settle_logs()
    asked = [e for e in world.request_log("gcr.io")[start:] if "/blobs/" in e["path"] or "/manifests/" in e["path"]]
    assert asked == [], asked


def test_private_content_stays_isolated_across_nodes(world, tier, tmp_path):
    """A private image node A cached for testuser is in the shared bucket; an anonymous client
    on node B gets none of it, testuser on B gets it from the tier."""
    secret = world.image("docker.io/private/secret:1")
    layer = max((d for d in secret.blobs if d != secret.config_digest), key=secret.layer_sizes.get)
    a, b = tier.start("a"), tier.start("b")
    ref = "docker://registry-1.docker.io/private/secret:1"
    r = skopeo_copy(world, ref, tmp_path / "a", env_for(world, a), CREDS)
    assert r.returncode == 0, r.stderr + a.log_text()[-3000:]
    wait_shared(tier.host, tier.bucket, secret.blobs)

    anon = skopeo_copy(world, ref, tmp_path / "anon", env_for(world, b))
    assert anon.returncode != 0 and any(w in anon.stderr.lower() for w in ("unauthorized", "401", "denied"))
    anon_token = pull_token(world, "private/secret")
    for name, headers in (("anon-token", [f"Authorization: Bearer {anon_token}"]), ("no-auth", [])):
        c = curl_via(world, b, blob_url("private/secret", layer), tmp_path / name, headers=headers).run()
        assert c.exit_code == 0 and c.status == 401, c.describe()
        assert c.headers.get("x-cache") is None
    assert "not serving cached docker.io/private/secret" in b.log_text()

    before = len(cdn_gets(world, layer))
    r = skopeo_copy(world, ref, tmp_path / "b", env_for(world, b), CREDS)
    assert r.returncode == 0, r.stderr + b.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "b") == secret.manifest_digest
    assert sha256_file(tmp_path / "b" / layer.split(":")[1]) == layer
    settle_logs()
    assert len(cdn_gets(world, layer)) == before


def pushed_blob(world, tmp_path: Path, repo: str, size: int) -> tuple[str, int]:
    """A fresh random blob of size bytes pushed into the world's docker.io registry under repo
    (OCI monolithic upload, straight to the registry in the upstream namespace)."""
    path = tmp_path / f"blob-{size}"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    digest = f"sha256:{h.hexdigest()}"
    base = f"http://127.0.0.1:{REGISTRY_PORTS[DOCKER_HOST]}"
    query = urlencode({"service": "registry.docker.io", "scope": f"repository:{repo}:pull,push"})
    token = json.loads(world.run(world.ns_client, ["curl", "-sS", "--fail", "--cacert", world.ca_bundle_path,
                                                   "-u", "testuser:testpass",
                                                   f"https://auth.docker.io/token?{query}"]).stdout)["token"]
    auth = ["-H", f"Authorization: Bearer {token}"]
    r = world.run(world.ns_upstream, ["curl", "-sS", "-X", "POST", "-o", "/dev/null", "-D", "-", *auth,
                                      f"{base}/v2/{repo}/blobs/uploads/"])
    location = next(line.split(":", 1)[1].strip() for line in r.stdout.splitlines()
                    if line.lower().startswith("location:"))
    location = re.sub(r"^https?://[^/]+", "", location)
    url = f"{base}{location}{'&' if '?' in location else '?'}digest={digest}"
    r = world.run(world.ns_upstream, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path), *auth,
                                      "-H", "Content-Type: application/octet-stream", url], timeout=120)
    assert r.stdout.strip() == "201", (r.stdout, r.stderr)
    path.unlink()
    return digest, size


def test_three_nodes_pull_one_cold_blob_with_one_upstream_fetch(world, tier, tmp_path):
    """Clients on A, B and C ask for the same cold 100 MiB blob at once: one upstream GET in the
    whole tier (a Redis lease), every client gets the exact bytes, one complete object (above the
    64 MiB multipart threshold: the upload goes in parts)."""
    digest, size = pushed_blob(world, tmp_path, "library/big", 100 * 1024 * 1024)
    nodes = [tier.start(n) for n in "abc"]
    token = pull_token(world, "library/big")
    before = len(cdn_gets(world, digest))
    with throttled_upstream(world):
        clients = [curl_via(world, rc, blob_url("library/big", digest), tmp_path / f"c{i}",
                            headers=[f"Authorization: Bearer {token}"]).start() for i, rc in enumerate(nodes)]
        for c in clients:
            c.wait(180)
    for c in clients:
        assert c.exit_code == 0 and c.status == 200, c.describe()
        assert sha256_file(c.out) == digest
    settle_logs()
    assert len(cdn_gets(world, digest)) - before == 1
    listing = wait_shared(tier.host, tier.bucket, [digest])
    assert listing["objects"][f"blobs/sha256/{digest.split(':')[1]}"] == size and not listing["uploads"]


def test_followers_stream_a_shared_miss_from_the_fetching_node_as_it_arrives(world, tier, tmp_path):
    """A client on node B asks for a cold blob node A is fetching from a slow upstream: B's
    client gets its first bytes while A's fetch is still running (streamed from A's peer
    listener, not after A's upload), the whole tier makes one upstream GET, both digests right."""
    digest, size = big_layer(world)
    a, b = tier.start("a"), tier.start("b")
    token = pull_token(world, "library/big")
    auth = [f"Authorization: Bearer {token}"]
    before = len(cdn_gets(world, digest))
    with throttled_upstream(world, "24mbit"):  # ~10 s for 30 MiB
        started = time.monotonic()
        ca = curl_via(world, a, blob_url("library/big", digest), tmp_path / "ca", headers=auth).start()
        ca.wait_received(2 * 1024 * 1024, timeout=60)  # A is fetching, well before its end
        assert lease_holder(tier, digest).startswith("node-a")
        asked = time.monotonic()
        cb = curl_via(world, b, blob_url("library/big", digest), tmp_path / "cb", headers=auth).start()
        deadline = time.monotonic() + 60
        while cb.received() == 0:
            assert cb.proc.poll() is None, cb.wait().describe() + b.log_text()[-3000:]
            assert time.monotonic() < deadline, b.log_text()[-3000:]
            time.sleep(0.02)
        first_byte = time.monotonic() - asked
        a_running = ca.proc.poll() is None
        ca.wait(120)
        a_total = time.monotonic() - started
        cb.wait(120)
    assert ca.exit_code == 0 and ca.status == 200 and sha256_file(ca.out) == digest, ca.describe()
    assert cb.exit_code == 0 and cb.status == 200 and sha256_file(cb.out) == digest, cb.describe()
    assert a_running, f"B's first byte after {first_byte:.1f} s came only once A's fetch was over"
    assert first_byte < a_total / 3, (first_byte, a_total)
    assert f"tier: blob {digest} streams from node node-a" in b.log_text()
    settle_logs()
    assert len(cdn_gets(world, digest)) - before == 1
    listing = wait_shared(tier.host, tier.bucket, [digest])
    assert listing["objects"][f"blobs/sha256/{digest.split(':')[1]}"] == size and not listing["uploads"]


def test_peer_listener_refuses_unsigned_and_forged_requests(world, tier, tmp_path):
    """Only members of the tier (holders of its key in Redis) may read a node's fills over the
    peer port: others get a 403 with an OCI error body."""
    digest, _size = big_layer(world)
    a = tier.start("a")
    peer = f"http://{world.router_client_ip}:{NODE_PORTS['a'] + 1}/_regcache/peer/{digest}"
    for name, url in (("unsigned", peer), ("forged", f"{peer}?exp={int(time.time()) + 60}&sig={'0' * 64}")):
        p = world.run(world.ns_client, ["curl", "-sS", "-o", tmp_path / name, "-w", "%{http_code}", url])
        assert p.stdout == "403", p.stdout + p.stderr
        assert '"code": "DENIED"' in (tmp_path / name).read_text()
    assert "refused peer request" in a.log_text()


def test_a_node_with_a_full_disk_serves_its_clients_and_the_others_read_the_bucket(world, tier, tmp_path,
                                                                                   small_tmpfs):
    """Node A's cache disk (a 20 MiB tmpfs) cannot hold the 30 MiB layer: A's clients still get
    the right bytes (passed through from upstream while the tier lacks it, streamed from the
    bucket once it has it: no upstream GET then), and A leaves nothing partial for the others,
    who read the copy node B shared."""
    img = world.image("docker.io/library/big:1")
    digest, size = big_layer(world)
    a, b = tier.start("a", cache_dir=small_tmpfs), tier.start("b")
    ref = "docker://registry-1.docker.io/library/big:1"

    r = skopeo_copy(world, ref, tmp_path / "a1", env_for(world, a))
    assert r.returncode == 0, r.stderr + a.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "a1") == img.manifest_digest
    assert sha256_file(tmp_path / "a1" / digest.split(":")[1]) == digest
    assert "cache disk full" in a.log_text()
    assert tier.host.bucket(tier.bucket)["objects"].get(f"blobs/sha256/{digest.split(':')[1]}") is None

    r = skopeo_copy(world, ref, tmp_path / "b1", env_for(world, b))
    assert r.returncode == 0, r.stderr + b.log_text()[-3000:]
    listing = wait_shared(tier.host, tier.bucket, img.blobs)
    assert listing["objects"][f"blobs/sha256/{digest.split(':')[1]}"] == size and not listing["uploads"]

    settle_logs()
    before = len(cdn_gets(world, digest))
    r = skopeo_copy(world, ref, tmp_path / "a2", env_for(world, a))
    assert r.returncode == 0, r.stderr + a.log_text()[-3000:]
    assert sha256_file(tmp_path / "a2" / digest.split(":")[1]) == digest
    settle_logs()
    assert len(cdn_gets(world, digest)) == before, "node A fetched the layer upstream, not from the bucket"
    assert f"blob {digest} streams from the tier's object store uncached" in a.log_text()
    c = tier.start("c")
    r = skopeo_copy(world, ref, tmp_path / "c1", env_for(world, c))
    assert r.returncode == 0, r.stderr + c.log_text()[-3000:]
    assert sha256_file(tmp_path / "c1" / digest.split(":")[1]) == digest
    assert f"tier: blob {digest} from the object store" in c.log_text()
    settle_logs()
    assert len(cdn_gets(world, digest)) == before, "the layer was fetched upstream again"
    assert a.proc.poll() is None


def lease_holder(tier, digest: str) -> str:
    return tier.host.world.run(tier.host.ns, ["redis-cli", "-h", tier.host.ip, "get",
                                              f"regcache:lease:{digest}"]).stdout.strip()


def test_leader_killed_mid_fetch_others_take_over(world, tier, tmp_path):
    """kill -9 of the node fetching a shared miss while the other nodes' clients stream it from
    that node: another node takes over once the lease expires, the other clients' responses go
    on and end with the exact bytes, the bucket never holds a partial object, and the restarted
    node sweeps its leftover staging file."""
    digest, size = big_layer(world)
    key = f"blobs/sha256/{digest.split(':')[1]}"
    a, b, c = (tier.start(n) for n in "abc")
    token = pull_token(world, "library/big")
    auth = [f"Authorization: Bearer {token}"]
    with throttled_upstream(world, "24mbit"):  # ~10 s for 30 MiB: time to kill the leader mid-fetch
        ca = curl_via(world, a, blob_url("library/big", digest), tmp_path / "ca", headers=auth).start()
        deadline = time.monotonic() + 20
        while not lease_holder(tier, digest).startswith("node-a"):
            assert time.monotonic() < deadline, a.log_text()[-3000:]
            time.sleep(0.1)
        followers = [curl_via(world, rc, blob_url("library/big", digest), tmp_path / f"c{n}", headers=auth).start()
                     for n, rc in (("b", b), ("c", c))]
        time.sleep(1.5)
        assert tier.host.bucket(tier.bucket)["objects"].get(key) is None
        # the followers' clients stream A's download already; A's death must not cut them short
        streaming = [f.received() for f in followers]
        a.kill9()
        ca.wait(30)
        for f in followers:
            f.wait(180)
    assert ca.exit_code != 0  # the dead node's client was cut short, never handed a whole wrong body
    for f in followers:
        assert f.exit_code == 0 and f.status == 200, f.describe()
        assert sha256_file(f.out) == digest
    assert any("waiting for its object" in rc.log_text() for rc in (b, c))
    assert all(n > 0 for n in streaming), streaming
    assert all(f"stream of blob {digest} from node node-a broke" in rc.log_text() for rc in (b, c))
    listing = wait_shared(tier.host, tier.bucket, [digest])
    assert listing["objects"][key] == size and not listing["uploads"], listing

    restarted = tier.start("a", cache_dir=a.cache_dir)
    assert "leftover staging file" in restarted.log_text()


def regcache_cli(world, tier, *argv) -> str:
    """The regcache command in the router namespace (where the tier's store is reachable)."""
    p = world.run(world.ns_router, [sys.executable, "-m", "regcachelib.cli", *map(str, argv)],
                  env=tier.host.node_env(), check=False, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def test_export_from_a_tier_import_into_a_single_node_and_into_another_tier(world, tier, tmp_path):
    """`regcache export` from a tier (empty local dir: everything read from the bucket and Redis)
    and `import` into a single node keep digests, tags and membership; importing the bundle into
    another tier (another bucket, emptied Redis) lets its nodes serve the image with no upstream
    content request."""
    from regcachelib.store import Store

    img = world.image("docker.io/library/small:1")
    a = tier.start("a")
    r = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "a", env_for(world, a))
    assert r.returncode == 0, r.stderr
    wait_shared(tier.host, tier.bucket, img.blobs)

    tier_yml = tmp_path / "tier.yml"
    tier_yml.write_text(tier.host.tier_config(tier.bucket, "cli"))
    bundle = tmp_path / "bundle"
    out = regcache_cli(world, tier, "--dir", tmp_path / "export-dir", "--config", tier_yml, "export",
                       "docker.io/library/small:1", "-o", bundle)
    assert f"{len(img.blobs)} blob(s) fetched" in out, out

    single = tmp_path / "single"
    regcache_cli(world, tier, "--dir", single, "import", bundle)
    store = Store(str(single))
    try:
        entry = store.find_tag("docker.io", "library/small", "1", None)
        assert entry is not None and entry.digest == img.manifest_digest
        for digest in img.blobs:
            assert store.has_blob(digest) and store.holds("docker.io", "library/small", digest)
    finally:
        store.close()

    # another site: its own bucket, its own (here: emptied) Redis
    world.run(tier.host.ns, ["redis-cli", "-h", tier.host.ip, "flushall"])
    other = f"tier-{uuid.uuid4().hex[:12]}"
    other_yml = tmp_path / "other.yml"
    other_yml.write_text(tier.host.tier_config(other, "cli"))
    out = regcache_cli(world, tier, "--dir", tmp_path / "import-dir", "--config", other_yml, "import", "--public",
                       bundle)
    assert f"{len(img.blobs)} blob(s) uploaded" in out, out
    c = tier.start("c", bucket_name=other)
    settle_logs()
    marks = log_marks(world)
    r = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "c", env_for(world, c))
    assert r.returncode == 0, r.stderr + c.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "c") == img.manifest_digest
    settle_logs()
    # An imported publicness verdict is re-checked upstream (a HEAD), as on a single node; the
    # content itself comes from the other tier's bucket.
    assert [e for e in upstream_content_requests(world, marks) if e["method"] != "HEAD"] == []
    assert all(f"tier: blob {d} from the object store" in c.log_text() for d in img.blobs)


def test_shared_store_gc_keeps_what_tags_reach_and_what_is_in_flight(world, tier, tmp_path):
    """`regcache tier-gc`: objects no tag reaches go (once past the grace period), everything a
    tag reaches stays, and a blob some node holds a lease on (a fill in flight) is never removed."""
    small = world.image("docker.io/library/small:1")
    s2 = world.image("docker.io/library/s2:1")
    a = tier.start("a")
    r = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "a", env_for(world, a))
    assert r.returncode == 0, r.stderr
    # two blobs fetched by digest only: in the bucket, reached by no tag
    token = pull_token(world, "library/s2")
    loose = [d for d in s2.blobs if d not in small.blobs]
    for i, digest in enumerate(loose):
        c = curl_via(world, a, blob_url("library/s2", digest), tmp_path / f"loose{i}",
                     headers=[f"Authorization: Bearer {token}"]).run()
        assert c.status == 200, c.describe()
    wait_shared(tier.host, tier.bucket, small.blobs + loose)
    leased, unleased = loose[0], loose[1:]
    assert unleased, s2.blobs
    world.run(tier.host.ns, ["redis-cli", "-h", tier.host.ip, "set", f"regcache:lease:{leased}", "node-x:1",
                             "px", "60000"])

    cfg = tmp_path / "tier.yml"
    cfg.write_text(tier.host.tier_config(tier.bucket, "gc"))
    out = regcache_cli(world, tier, "--config", cfg, "tier-gc")  # default grace: all of it is recent
    assert "removed 0 " in out, out
    time.sleep(1.5)
    out = regcache_cli(world, tier, "--config", cfg, "tier-gc", "--grace", "1")
    objects = tier.host.bucket(tier.bucket)["objects"]
    for digest in small.blobs:
        assert f"blobs/sha256/{digest.split(':')[1]}" in objects, out
    assert f"manifests/sha256/{small.manifest_digest.split(':')[1]}" in objects
    assert f"blobs/sha256/{leased.split(':')[1]}" in objects, out
    for digest in unleased:
        assert f"blobs/sha256/{digest.split(':')[1]}" not in objects, out


def test_hits_redirect_to_presigned_urls_only_after_the_access_check(world, tier, tmp_path):
    """tier.redirect: a node answers a blob the bucket holds with a 307 to a short-lived presigned
    URL, so the bytes flow from the object store to the client; a client the access rule refuses
    (anonymous, private repository) gets no URL."""
    small, secret = world.image("docker.io/library/small:1"), world.image("docker.io/private/secret:1")
    a = tier.start("a")
    for ref, extra in (("library/small:1", ()), ("private/secret:1", CREDS)):
        r = skopeo_copy(world, f"docker://registry-1.docker.io/{ref}", tmp_path / ref.split("/")[0],
                        env_for(world, a), extra)
        assert r.returncode == 0, r.stderr
    wait_shared(tier.host, tier.bucket, small.blobs + secret.blobs)
    b = tier.start("b", redirect=True)

    layer = max((d for d in small.blobs if d != small.config_digest), key=small.layer_sizes.get)
    token = pull_token(world, "library/small")
    c = curl_via(world, b, blob_url("library/small", layer), tmp_path / "redirect",
                 headers=[f"Authorization: Bearer {token}"]).run()
    assert c.status == 307, c.describe()
    location = c.headers["location"]
    assert location.startswith(f"{tier.host.endpoint}/{tier.bucket}/blobs/sha256/{layer.split(':')[1]}?")
    fetched = tmp_path / "from-store"
    p = world.run(world.ns_client, ["curl", "-sS", "-o", fetched, "-w", "%{http_code}", location])
    assert p.stdout == "200" and sha256_file(fetched) == layer

    secret_layer = max((d for d in secret.blobs if d != secret.config_digest), key=secret.layer_sizes.get)
    c = curl_via(world, b, blob_url("private/secret", secret_layer), tmp_path / "anon").run()
    assert c.status == 401 and "location" not in c.headers, c.describe()

    r = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "b", env_for(world, b))
    assert r.returncode == 0, r.stderr + b.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "b") == small.manifest_digest
    for digest in small.blobs:
        assert sha256_file(tmp_path / "b" / digest.split(":")[1]) == digest


def test_redis_outage_pulls_still_work_and_sharing_resumes(world, tier, tmp_path):
    """redis-server stopped: nodes keep pulling right (knowledge they lack is asked upstream,
    blobs still come from the bucket without a lease), one log line; Redis back: sharing resumes."""
    small, s2, gcr = (world.image(r) for r in ("docker.io/library/small:1", "docker.io/library/s2:1",
                                               "gcr.io/proj/small:1"))
    a, b = tier.start("a"), tier.start("b")
    r = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "a1", env_for(world, a))
    assert r.returncode == 0, r.stderr
    wait_shared(tier.host, tier.bucket, small.blobs)

    tier.host.stop_redis()
    try:
        for ref, img, name in (("library/small:1", small, "b1"), ("library/s2:1", s2, "b2")):
            r = skopeo_copy(world, f"docker://registry-1.docker.io/{ref}", tmp_path / name, env_for(world, b))
            assert r.returncode == 0, r.stderr + b.log_text()[-3000:]
            assert dir_manifest_digest(tmp_path / name) == img.manifest_digest
            for digest in img.blobs:
                assert sha256_file(tmp_path / name / digest.split(":")[1]) == digest
        lines = [x for x in b.log_text().splitlines() if "knowledge store (Redis)" in x and "unreachable" in x]
        assert len(lines) == 1, lines
    finally:
        tier.host.start_redis()

    time.sleep(2.5)
    r = skopeo_copy(world, "docker://gcr.io/proj/small:1", tmp_path / "b3", env_for(world, b))
    assert r.returncode == 0, r.stderr
    assert "knowledge store (Redis) reachable again" in b.log_text()
    wait_shared(tier.host, tier.bucket, gcr.blobs)
    c = tier.start("c")
    settle_logs()
    start = len(world.request_log("gcr.io"))
    r = skopeo_copy(world, "docker://gcr.io/proj/small:1", tmp_path / "c1", env_for(world, c))
    assert r.returncode == 0, r.stderr + c.log_text()[-3000:]
    settle_logs()
    asked = [e for e in world.request_log("gcr.io")[start:] if "/blobs/" in e["path"] or "/manifests/" in e["path"]]
    assert asked == []

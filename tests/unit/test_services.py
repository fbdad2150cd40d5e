"""The blob and manifest services, without a flow or a proxy: a RegistryRequest in, a result
(or a RegistryError) out, against the local upstream of helpers.py that counts what it is asked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import ssl
import time

import pytest

from regcachelib import oci
from regcachelib.blobs import Follow, Hit, Relay, Uncached
from regcachelib.concurrency import Flights, Workers
from regcachelib.config import Config
from regcachelib.manifests import Answer
from regcachelib.request import RegistryRequest
from regcachelib.services import build_services
from regcachelib.store import Store
from regcachelib.upstream import Target, Upstream

from .helpers import Reply, random_bytes, sha256, stage_and_commit

BLOB = random_bytes(100 * 1024, seed=3)
BLOB_DIGEST = sha256(BLOB)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": {}, "layers": []}).encode()
MANIFEST_DIGEST = sha256(MANIFEST)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@contextlib.contextmanager
def services_for(tmp_path, upstream_server, fastpath_port: int = 0, **config):
    store = Store(str(tmp_path / "cache"))
    workers = Workers()
    upstream = Upstream(ssl.create_default_context(), timeout=5.0, backoff=0.0)
    try:
        yield build_services(dataclasses.replace(Config(), **config), store, upstream, workers, lambda: fastpath_port)
    finally:
        workers.shutdown()
        store.close()


def request(upstream_server, path: str, method: str = "GET", headers=(), offline: bool = False) -> RegistryRequest:
    route = oci.parse_route("quay.io", path) if path != "/v2/" else None
    return RegistryRequest("quay.io", Target("127.0.0.1", upstream_server.port, "http"), path, method, route,
                           tuple(headers), "10.0.0.2", offline=offline, direct=False)


# --- blobs ----------------------------------------------------------------------------------------


def test_blob_miss_is_followed_then_hit(tmp_path, upstream_server):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(body=BLOB)

    async def main():
        with services_for(tmp_path, upstream_server) as s:
            first = await s.blobs.get(request(upstream_server, path))
            assert isinstance(first, Follow) and not first.fastpath
            await asyncio.wait_for(_until(lambda: s.store.has_blob(BLOB_DIGEST)), 10)
            assert s.store.holds("quay.io", "org/img", BLOB_DIGEST)  # upstream served it there
            s.access.remember_public("quay.io", "org/img", True)
            again = await s.blobs.get(request(upstream_server, path))
            assert again == Hit(BLOB_DIGEST, None, False)
            head = await s.blobs.get(request(upstream_server, path, "HEAD"))
            assert head == Hit(BLOB_DIGEST, len(BLOB), False)

    run(main())
    assert upstream_server.count("GET", f"/v2/org/img/blobs/{BLOB_DIGEST}") == 1


def test_default_fast_path_takes_proxied_clients_for_public_repositories_only(tmp_path, upstream_server):
    """The default config redirects an HTTPS_PROXY client's blob hit to the fast path (its
    redirect may come back through the proxy, which serves it in-band), but only from a
    repository known to be public: other content stays inside TLS unless fastpath_private."""
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(body=BLOB)

    async def main():
        with services_for(tmp_path, upstream_server, fastpath_port=5080) as s:
            proxied = request(upstream_server, path)
            assert not proxied.direct
            await s.blobs.get(proxied)
            await asyncio.wait_for(_until(lambda: s.store.has_blob(BLOB_DIGEST)), 10)
            s.access.remember_public("quay.io", "org/img", True)
            assert await s.blobs.get(proxied) == Hit(BLOB_DIGEST, None, True)
            s.access.remember_public("quay.io", "org/img", False)
            assert s.blobs.use_fastpath(proxied) is False
            # a client on plain HTTP (a mirror on http://) gets the bytes outside TLS anyway
            assert s.blobs.use_fastpath(dataclasses.replace(proxied, direct=True, plain_http=True)) is True
            assert s.blobs.use_fastpath(dataclasses.replace(proxied, direct=True)) is False  # transparent: TLS
            s.blobs.config = dataclasses.replace(s.blobs.config, fastpath_private=True)
            assert s.blobs.use_fastpath(proxied) is True
            s.blobs.config = dataclasses.replace(s.blobs.config, fastpath="off")
            assert s.blobs.use_fastpath(proxied) is False

    run(main())


def test_a_download_teaches_membership_before_anyone_hears_of_it(tmp_path, upstream_server):
    """Followers of a download check their access the moment upstream's 200 is known: the
    membership it teaches must be stored by then, or each follower would ask upstream again."""
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(body=BLOB, gate_after=1024)

    async def main():
        with services_for(tmp_path, upstream_server) as s:
            target = Target("127.0.0.1", upstream_server.port, "http")
            fill, leader = s.fills.join(oci.parse_digest(BLOB_DIGEST), "quay.io", "org/img", target, path, [])
            assert leader
            await asyncio.wait_for(fill.headers_ready.wait(), 10)
            assert s.store.holds("quay.io", "org/img", BLOB_DIGEST)  # no await in between
            with open(s.store.miss_log_path) as f:
                assert json.loads(f.readline())["digest"] == BLOB_DIGEST
            upstream_server.gate.set()

    run(main())


def test_blob_offline_unknown_and_head_miss_and_refusal(tmp_path, upstream_server):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(status=401, body=oci.error_body("UNAUTHORIZED", "no"),
                                         headers=[("WWW-Authenticate", 'Bearer realm="x"')])

    async def main():
        with services_for(tmp_path, upstream_server) as s:
            with pytest.raises(oci.RegistryError) as e:
                await s.blobs.get(request(upstream_server, path, offline=True))
            assert (e.value.status, e.value.code, e.value.outcome) == (404, "BLOB_UNKNOWN", "UNKNOWN")
            head = await s.blobs.get(request(upstream_server, path, "HEAD"))
            assert isinstance(head, Relay) and head.status == 401 and head.outcome == "UPSTREAM_401"
            assert ("WWW-Authenticate", 'Bearer realm="x"') in head.headers
            refused = await s.blobs.get(request(upstream_server, path))
            assert isinstance(refused, Relay) and refused.status == 401 and b"UNAUTHORIZED" in refused.body
            # stored but not known to be in the repository: offline, nobody may have it
            stage_and_commit(s.store, BLOB)
            with pytest.raises(oci.RegistryError) as e:
                await s.blobs.get(request(upstream_server, path, offline=True))
            assert e.value.status == 404
            assert not s.store.holds("quay.io", "org/img", BLOB_DIGEST)

    run(main())


def test_blob_without_room_is_uncached(tmp_path, upstream_server, monkeypatch):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(body=BLOB)

    async def main():
        with services_for(tmp_path, upstream_server) as s:
            monkeypatch.setattr(s.store, "has_room", lambda size: False)
            assert isinstance(await s.blobs.get(request(upstream_server, path)), Uncached)
            assert not s.store.has_blob(BLOB_DIGEST)

    run(main())


# --- manifests ------------------------------------------------------------------------------------


def test_concurrent_manifest_misses_make_one_upstream_request(tmp_path, upstream_server):
    path = "/v2/org/img/manifests/v1"
    upstream_server.routes[path] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_MANIFEST)], gate_after=0)
    # where followers' access (publicness) is checked: the digest the shared answer is for
    by_digest = Reply(headers=[("Content-Type", oci.OCI_MANIFEST)])
    upstream_server.routes[f"/v2/org/img/manifests/{MANIFEST_DIGEST}"] = by_digest

    async def main():
        with services_for(tmp_path, upstream_server) as s:
            tasks = [asyncio.create_task(s.manifests.get(request(upstream_server, path))) for _ in range(10)]
            await asyncio.sleep(0.3)
            upstream_server.gate.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            # the leader's answer; followers get it only with their own access (the repository is public)
            assert all(isinstance(r, Answer) and r.manifest.body == MANIFEST for r in results), results
            assert s.store.find_tag("quay.io", "org/img", "v1", None).digest == MANIFEST_DIGEST
            with open(s.store.miss_log_path) as f:
                assert len(f.readlines()) == 1

    run(main())
    assert upstream_server.count("GET", "/v2/org/img/manifests/v1") == 1


def test_tag_revalidated_then_stale_when_upstream_is_down(tmp_path, upstream_server):
    path = "/v2/org/img/manifests/v1"
    upstream_server.routes[path] = Reply(headers=[("Docker-Content-Digest", MANIFEST_DIGEST)])

    async def main():
        with services_for(tmp_path, upstream_server, tag_ttl=60.0) as s:
            s.store.put_manifest(MANIFEST_DIGEST, oci.OCI_MANIFEST, MANIFEST)
            s.store.set_tag("quay.io", "org/img", "v1", oci.OCI_MANIFEST, MANIFEST_DIGEST, now=time.time() - 3600)
            s.access.remember_public("quay.io", "org/img", True)
            answer = await s.manifests.get(request(upstream_server, path))
            assert answer.outcome == "REVALIDATED" and answer.manifest.digest == MANIFEST_DIGEST
            assert await s.manifests.get(request(upstream_server, path)) == Answer(answer.manifest, "HIT")
            s.store.set_tag("quay.io", "org/img", "v1", oci.OCI_MANIFEST, MANIFEST_DIGEST, now=time.time() - 3600)
            upstream_server.routes[path] = Reply(status=503)
            stale = await s.manifests.get(request(upstream_server, path))
            assert stale.outcome == "STALE" and stale.warning

    run(main())
    assert upstream_server.count("GET", "/v2/org/img/manifests/v1") == 0  # revalidation is a HEAD


def test_ping_answered_by_the_cache_when_upstream_is_down(tmp_path, upstream_server):
    upstream_server.routes["/v2/"] = Reply(body=b"{}", headers=[("Content-Type", "application/json")])

    async def main():
        with services_for(tmp_path, upstream_server) as s:
            assert (await s.manifests.ping(request(upstream_server, "/v2/"))).status == 200
            assert (await s.manifests.ping(request(upstream_server, "/v2/"))).status == 200  # kept
            upstream_server.close()
            down = dataclasses.replace(request(upstream_server, "/v2/"), headers=(("Authorization", "Bearer x"),))
            answer = await s.manifests.ping(down)
            assert (answer.status, answer.body) == (200, b"{}")

    run(main())
    assert upstream_server.count("GET", "/v2/") == 1


# --- the single-flight primitive ------------------------------------------------------------------


def test_flights_run_once_and_share_the_result_or_the_error():
    flights = Flights()
    calls = []

    async def work():
        calls.append(1)
        await asyncio.sleep(0.05)
        return "result"

    async def failing():
        calls.append(1)
        await asyncio.sleep(0.05)
        raise RuntimeError("upstream said no")

    async def main():
        results = await asyncio.gather(*(flights.run("k", work) for _ in range(5)))
        assert [r for r, _leader in results] == ["result"] * 5
        assert sum(leader for _r, leader in results) == 1 and len(calls) == 1 and len(flights) == 0
        errors = await asyncio.gather(*(flights.run("k", failing) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(e, RuntimeError) for e in errors) and len(calls) == 2

    run(main())


async def _until(predicate, interval: float = 0.01):
    while not predicate():
        await asyncio.sleep(interval)


# --- regcache's own account (credentials:) --------------------------------------------------------


def _with_account(s, monkeypatch):
    from regcachelib.config import Credential

    s.credentials.credentials["quay.io"] = Credential("quay.io", "robot", secret_env="UNUSED")
    monkeypatch.setattr(s.credentials, "_login", lambda *a: "Bearer account-token")
    s.access.remember_public("quay.io", "org/img", True)


def test_the_account_fetches_for_an_anonymous_client_and_steps_aside_when_refused(tmp_path, upstream_server,
                                                                                   monkeypatch):
    path = "/v2/org/img/manifests/1"
    upstream_server.routes[path] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_MANIFEST)])

    def authorizations():
        return [h.get("authorization") for m, p, h in upstream_server.requests if p == path]

    async def main():
        with services_for(tmp_path, upstream_server, tag_ttl=0.0) as s:
            _with_account(s, monkeypatch)
            answer = await s.manifests.get(request(upstream_server, path))
            assert isinstance(answer, Answer) and answer.manifest.digest == MANIFEST_DIGEST
            assert authorizations() == ["Bearer account-token"]
            # a client that brought its own credentials is served with them
            await s.manifests.get(request(upstream_server, path, "HEAD", headers=[("Authorization", "Basic dTpw")]))
            assert authorizations()[-1] == "Basic dTpw"
            # the account's token is refused: the client hears its own answer, the account rests
            upstream_server.routes[path] = Reply(status=401, headers=[("WWW-Authenticate", 'Bearer realm="x"')])
            refused = await s.manifests.get(request(upstream_server, path, "HEAD"))
            assert authorizations()[-2:] == ["Bearer account-token", None]
            assert refused.status == 401
            upstream_server.routes[path] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_MANIFEST),
                                                                         ("Docker-Content-Digest", MANIFEST_DIGEST)])
            again = await s.manifests.get(request(upstream_server, path, "HEAD"))
            assert again.outcome == "REVALIDATED" and authorizations()[-1] is None

    run(main())

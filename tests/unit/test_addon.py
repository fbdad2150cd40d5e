"""addon.py: the RegistryCache addon, driven through mitmproxy's taddons/tflow.

Flows use regular (explicit proxy) mode. Tests that need an upstream point an alias
(127.0.0.1 -> quay.io) at the local HTTP upstream of helpers.py; the others use real registry
names with no network access needed (offline mode, or requests answered before any fetch).
"""

from __future__ import annotations

import asyncio
import ipaddress
import contextlib
import json
import time

import pytest
from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.proxy.layers.tls import TlsClienthelloHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from regcachelib import addon as addon_module
from regcachelib import oci
from regcachelib.addon import RegistryCache
from regcachelib.request import REQUEST

from .helpers import Reply, http_request, random_bytes, sha256, stage_and_commit, wait_until

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []}).encode()
MANIFEST_DIGEST = sha256(MANIFEST)
DOCKER_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST, "config": {}, "layers": []}).encode()
BLOB = random_bytes(200 * 1024, seed=5)
BLOB_DIGEST = sha256(BLOB)


@pytest.fixture(autouse=True)
def cache_dir_in_tmp(tmp_path, monkeypatch):
    # The option default is computed from the working directory; keep the tests out of it.
    monkeypatch.setattr(addon_module, "DEFAULT_DIR", str(tmp_path / "cache"))


def make_flow(host: str, path: str, method: str = "GET", headers=(), port: int = 443, scheme: str = "https") -> http.HTTPFlow:
    hdrs = http.Headers([(b"host", host.encode()), *[(k.encode(), v.encode()) for k, v in headers]])
    req = tutils.treq(host=host, port=port, scheme=scheme.encode(), method=method.encode(), path=path.encode(), authority=b"", headers=hdrs, content=b"")
    flow = tflow.tflow(req=req)
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    return flow


def add_proxyserver_options(tctx) -> None:
    """The options of mitmproxy's Proxyserver addon that regcache uses (taddons loads only core)."""
    if "connection_strategy" not in tctx.options:
        tctx.options.add_option("connection_strategy", str, "eager", "Determine when server connections should be established.", choices=("eager", "lazy"))


@contextlib.asynccontextmanager
async def running_addon(tmp_path, config: str = "", offline: bool = False):
    cfg = tmp_path / "regcache.yaml"
    cfg.write_text("fastpath: false\nupstream_timeout: 5s\nupstream_backoff: 0s\n" + config)
    rc = RegistryCache()
    with taddons.context(rc) as tctx:
        add_proxyserver_options(tctx)
        tctx.configure(rc, regcache_dir=str(tmp_path / "cache"), regcache_config=str(cfg), regcache_offline=offline)
        await tctx.master.addons.invoke_addon(rc, hooks.RunningHook())  # the children too
        assert tctx.options.connection_strategy == "lazy"  # a hit must open no upstream connection
        try:
            yield rc, tctx
        finally:
            await tctx.master.addons.invoke_addon(rc, hooks.DoneHook())


async def send(rc: RegistryCache, flow: http.HTTPFlow) -> http.HTTPFlow:
    """A request through the addon tree's hooks, as mitmproxy runs them (a hook that raises
    fails the test instead of being logged)."""
    await ctx.master.addons.invoke_addon(rc, HttpRequestHeadersHook(flow))
    await ctx.master.addons.invoke_addon(rc, HttpRequestHook(flow))
    return flow


async def routed(rc: RegistryCache, flow: http.HTTPFlow):
    """The registry request routing made of a flow."""
    await send(rc, flow)
    return flow.metadata[REQUEST]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def error_code(flow: http.HTTPFlow) -> str:
    assert flow.response.headers["content-type"] == "application/json"
    doc = json.loads(flow.response.content)
    return doc["errors"][0]["code"]


def mark_public(rc: RegistryCache, registry: str, repo: str) -> None:
    rc.access.remember_public(registry, repo, True)


def store_index_tag(rc: RegistryCache, registry: str, repo: str, tag: str, **set_tag_kw) -> None:
    """MANIFEST (an OCI index) in the store, tagged registry/repo:tag."""
    rc.store.put_manifest(MANIFEST_DIGEST, oci.OCI_INDEX, MANIFEST)
    rc.store.set_tag(registry, repo, tag, oci.OCI_INDEX, MANIFEST_DIGEST, **set_tag_kw)


# The local upstream answers for quay.io: flows to 127.0.0.1:<port> are cached as quay.io.
# the local upstream is plain HTTP on a random port: configured as such, or it is never cached
# and, being on loopback, the proxy may connect to it only by proxy_allow
LOCAL_ALIAS = "aliases:\n  127.0.0.1: quay.io\nplain_http_registries: [127.0.0.1]\nproxy_allow: ['127.0.0.0/8']\n"


def local_flow(upstream_server, path: str, method: str = "GET", headers=()) -> http.HTTPFlow:
    return make_flow("127.0.0.1", path, method, headers, port=upstream_server.port, scheme="http")


# --- options ---------------------------------------------------------------------------------------


def test_options_load_and_validate(tmp_path):
    async def main():
        good = tmp_path / "good.yaml"
        good.write_text("tag_ttl: 1m\nsize_limit: 1GiB\nfastpath: false\n")
        bad = tmp_path / "bad.yaml"
        bad.write_text("tag_ttl: 1m\nsize_limt: 1GiB\n")
        rc = RegistryCache()
        with taddons.context(rc) as tctx:
            assert tctx.options.regcache_offline is False
            tctx.configure(rc, regcache_dir=str(tmp_path / "cache"), regcache_config=str(good))
            assert rc.config.tag_ttl == 60.0
            assert rc.store.directory == str(tmp_path / "cache")
            with pytest.raises(exceptions.OptionsError) as ei:
                tctx.configure(rc, regcache_config=str(bad))
            assert f"{bad}:2:1" in str(ei.value)
            assert "size_limt" in str(ei.value)
            # the bad value was rolled back; the last good config stays in force
            assert tctx.options.regcache_config == str(good)
            assert rc.config.tag_ttl == 60.0
            with pytest.raises(exceptions.OptionsError, match="cannot read"):
                tctx.configure(rc, regcache_config=str(tmp_path / "missing.yaml"))
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(rc, regcache_dir="")
            await rc.done()

    run(main())


def test_regcache_dir_option_moves_the_store(tmp_path):
    async def main():
        rc = RegistryCache()
        with taddons.context(rc) as tctx:
            tctx.configure(rc, regcache_dir=str(tmp_path / "one"))
            digest = stage_and_commit(rc.store, b"in one")
            tctx.configure(rc, regcache_dir=str(tmp_path / "two"))
            assert rc.store.directory == str(tmp_path / "two")
            assert not rc.store.has_blob(digest)
            tctx.configure(rc, regcache_dir=str(tmp_path / "one"))
            assert rc.store.has_blob(digest)
            await rc.done()

    run(main())


def test_startup_sweeps_leftover_staging_files(tmp_path):
    staging = tmp_path / "cache" / "staging"
    staging.mkdir(parents=True)
    (staging / "sha256-dead.1.abcd").write_bytes(b"partial")

    async def main():
        async with running_addon(tmp_path):
            assert list(staging.iterdir()) == []

    run(main())


# --- what is left alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["example.com", "auth.docker.io", "production.cloudflare.docker.com"])
def test_non_registry_host_is_left_alone(tmp_path, host):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            for path in ("/v2/library/alpine/manifests/latest", "/v2/../../etc/passwd/blobs/x", "/token?scope=x"):
                flow = make_flow(host, path)
                await send(rc, flow)
                assert flow.response is None
                assert flow.request.host == host

    run(main())


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
def test_writes_pass_through_online(tmp_path, method):
    async def main():
        async with running_addon(tmp_path) as (rc, _):
            flow = make_flow("quay.io", "/v2/org/img/manifests/latest", method=method)
            await send(rc, flow)
            assert flow.response is None
            flow = make_flow("quay.io", "/v2/org/img/blobs/uploads/", method=method)
            await send(rc, flow)
            assert flow.response is None

    run(main())


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,code",
    [
        ("/v2/org/../../etc/manifests/latest", "NAME_INVALID"),
        ("/v2/org/%2e%2e/%2e%2e/blobs/" + BLOB_DIGEST, "NAME_INVALID"),
        ("/v2/org/img%00/manifests/latest", "NAME_INVALID"),
        ("/v2/" + "a" * 300 + "/manifests/latest", "NAME_INVALID"),
        ("/v2/org/img/blobs/sha256:1234", "DIGEST_INVALID"),
        ("/v2/org/img/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/org/img/manifests/-bad-tag", "MANIFEST_INVALID"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_malformed_paths_get_oci_errors(tmp_path, path, code, method):
    async def main():
        async with running_addon(tmp_path) as (rc, _):
            flow = make_flow("quay.io", path, method=method)
            await send(rc, flow)
            assert flow.response is not None
            assert flow.response.status_code == 400
            assert error_code(flow) == code
            assert flow.request.host == "quay.io"  # never sent anywhere

    run(main())


# --- offline ---------------------------------------------------------------------------------------------


def test_offline_unknown_content_is_404(tmp_path):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            for method in ("GET", "HEAD"):
                flow = make_flow("quay.io", f"/v2/org/img/blobs/{BLOB_DIGEST}", method)
                await send(rc, flow)
                assert flow.response.status_code == 404
                assert method == "HEAD" or error_code(flow) == "BLOB_UNKNOWN"
            flow = make_flow("quay.io", "/v2/org/img/manifests/latest")
            await send(rc, flow)
            assert (flow.response.status_code, error_code(flow)) == (404, "MANIFEST_UNKNOWN")
            flow = make_flow("registry-1.docker.io", f"/v2/alpine/manifests/{MANIFEST_DIGEST}")
            await send(rc, flow)
            assert (flow.response.status_code, error_code(flow)) == (404, "MANIFEST_UNKNOWN")

    run(main())


def test_offline_ping_is_answered(tmp_path):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            flow = make_flow("quay.io", "/v2/")
            await send(rc, flow)
            assert flow.response.status_code == 200

    run(main())


def test_offline_tag_and_digest_hits(tmp_path):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            mark_public(rc, "docker.io", "library/alpine")
            store_index_tag(rc, "docker.io", "library/alpine", "3.19")
            # docker.io's library/ normalisation: "alpine" and "library/alpine" are one repository
            for path in ("/v2/alpine/manifests/3.19", "/v2/library/alpine/manifests/3.19", f"/v2/alpine/manifests/{MANIFEST_DIGEST}"):
                flow = make_flow("registry-1.docker.io", path, headers=[("Accept", oci.OCI_INDEX)])
                await send(rc, flow)
                assert flow.response.status_code == 200, flow.response.content
                assert flow.response.content == MANIFEST
                assert flow.response.headers["content-type"] == oci.OCI_INDEX
                assert flow.response.headers["docker-content-digest"] == MANIFEST_DIGEST
                assert flow.response.headers["x-cache"] == "HIT"

    run(main())


def offline_get_of_stored_tag(tmp_path, config: str = "", headers=(), **set_tag_kw) -> http.HTTPFlow:
    """GET quay.io/org/img:v1 from the cache offline, with org/img known public and the tag stored
    (MANIFEST, an OCI index)."""
    async def main():
        async with running_addon(tmp_path, config, offline=True) as (rc, _):
            mark_public(rc, "quay.io", "org/img")
            store_index_tag(rc, "quay.io", "org/img", "v1", **set_tag_kw)
            return await send(rc, make_flow("quay.io", "/v2/org/img/manifests/v1", headers=headers))

    return run(main())


def test_offline_old_tag_is_served_stale(tmp_path):
    flow = offline_get_of_stored_tag(tmp_path, "tag_ttl: 1m\n", now=time.time() - 3600)
    assert flow.response.status_code == 200
    assert flow.response.content == MANIFEST
    assert flow.response.headers["x-cache"] == "STALE"


def test_offline_tag_never_answered_with_an_unaccepted_media_type(tmp_path):
    flow = offline_get_of_stored_tag(tmp_path, headers=[("Accept", f"{oci.DOCKER_MANIFEST}, {oci.DOCKER_LIST}")])
    assert flow.response.status_code == 404
    assert error_code(flow) == "MANIFEST_UNKNOWN"
    assert flow.response.content != MANIFEST


def test_head_blob_hit(tmp_path):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            mark_public(rc, "quay.io", "org/img")
            digest = stage_and_commit(rc.store, BLOB)
            # stored, but org/img is not known to hold it: offline, that is a 404
            flow = make_flow("quay.io", f"/v2/org/img/blobs/{digest}", "HEAD")
            await send(rc, flow)
            assert flow.response.status_code == 404
            assert "x-cache" not in flow.response.headers
            rc.store.add_members("quay.io", "org/img", [digest])
            flow = make_flow("quay.io", f"/v2/org/img/blobs/{digest}", "HEAD")
            await send(rc, flow)
            assert flow.response.status_code == 200
            assert flow.response.headers["content-length"] == str(len(BLOB))
            assert flow.response.headers["docker-content-digest"] == digest
            assert flow.response.headers["x-cache"] == "HIT"
            assert flow.response.content == b""

    run(main())


def test_offline_private_repository_is_not_served(tmp_path):
    # Nothing says org/private is public, and offline nobody can check the client's credentials.
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            store_index_tag(rc, "quay.io", "org/private", "v1")
            flow = make_flow("quay.io", "/v2/org/private/manifests/v1", headers=[("Authorization", "Bearer whatever")])
            await send(rc, flow)
            assert flow.response.status_code in (401, 403)
            assert flow.response.content != MANIFEST

    run(main())


# --- online, against the local upstream -------------------------------------------------------------


def test_fresh_tag_is_answered_from_the_store(tmp_path, upstream_server):
    path = "/v2/org/img/manifests/v1"
    upstream_server.routes[path] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_INDEX), ("Docker-Content-Digest", MANIFEST_DIGEST)])
    # the public probe asks for the digest the repository holds
    upstream_server.routes[f"/v2/org/img/manifests/{MANIFEST_DIGEST}"] = upstream_server.routes[path]

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            store_index_tag(rc, "quay.io", "org/img", "v1")
            flow = local_flow(upstream_server, path, headers=[("Accept", f"{oci.OCI_INDEX}, {oci.OCI_MANIFEST}")])
            await send(rc, flow)
            assert flow.response.status_code == 200
            assert flow.response.content == MANIFEST
            assert flow.response.headers["content-type"] == oci.OCI_INDEX
            assert flow.response.headers["x-cache"] == "HIT"
            head = local_flow(upstream_server, path, "HEAD", headers=[("Accept", oci.OCI_INDEX)])
            await send(rc, head)
            assert head.response.status_code == 200
            assert head.response.headers["content-length"] == str(len(MANIFEST))
            assert head.response.headers["docker-content-digest"] == MANIFEST_DIGEST

    run(main())
    assert upstream_server.count("GET", path) == 0  # a fresh tag costs no upstream GET


def test_tag_with_unaccepted_media_type_goes_upstream(tmp_path, upstream_server):
    path = "/v2/org/img/manifests/v1"
    docker_digest = sha256(DOCKER_MANIFEST)
    upstream_server.routes[path] = Reply(body=DOCKER_MANIFEST, headers=[("Content-Type", oci.DOCKER_MANIFEST), ("Docker-Content-Digest", docker_digest)])

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            store_index_tag(rc, "quay.io", "org/img", "v1")
            flow = local_flow(upstream_server, path, headers=[("Accept", oci.DOCKER_MANIFEST)])
            await send(rc, flow)
            assert flow.response.status_code == 200
            assert flow.response.headers["content-type"] == oci.DOCKER_MANIFEST
            assert flow.response.content == DOCKER_MANIFEST
            assert flow.response.headers["x-cache"] == "MISS"
            # both answers are now kept, each for the clients that accept it
            assert rc.store.find_tag("quay.io", "org/img", "v1", {oci.DOCKER_MANIFEST}).digest == docker_digest
            assert rc.store.find_tag("quay.io", "org/img", "v1", {oci.OCI_INDEX}).digest == MANIFEST_DIGEST
            assert rc.store.get_manifest(docker_digest).body == DOCKER_MANIFEST

    run(main())
    (get,) = [h for m, p, h in upstream_server.requests if m == "GET" and p == path]
    assert get["accept"] == oci.DOCKER_MANIFEST


def test_blob_miss_then_hit_through_the_blob_server(tmp_path, upstream_server):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(body=BLOB, headers=[("Content-Type", "application/octet-stream")])

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            flow = local_flow(upstream_server, path, headers=[("Authorization", "Bearer t0ken")])
            await send(rc, flow)
            assert flow.response is None  # streamed by mitmproxy from the in-band blob server
            assert (flow.request.host, flow.request.port) == ("127.0.0.1", rc.blobserver.inband_port)
            assert flow.request.path.startswith("/_regcache/t/")
            assert "authorization" not in flow.request.headers
            resp = await http_request(flow.request.port, flow.request.path)
            assert resp.status == 200 and resp.body == BLOB
            assert resp.headers["x-cache"] == "MISS"
            await wait_until(lambda: rc.store.has_blob(BLOB_DIGEST))
            with open(rc.store.miss_log_path) as f:
                misses = [json.loads(line) for line in f]
            assert [(m["kind"], m["digest"], m["registry"], m["repo"]) for m in misses] == [("blob", BLOB_DIGEST, "quay.io", "org/img")]
            assert "t0ken" not in json.dumps(misses)

            hit = local_flow(upstream_server, path, headers=[("Range", "bytes=100-199")])
            await send(rc, hit)
            resp = await http_request(hit.request.port, hit.request.path)
            assert resp.status == 206 and resp.body == BLOB[100:200]
            assert resp.headers["x-cache"] == "HIT"

    run(main())
    assert upstream_server.count("GET", path) == 1


def test_small_blob_hit_is_answered_inline_and_counted(tmp_path, upstream_server):
    """A small stored blob is answered from the request hook itself (no loopback hop through
    the blob server); a Range request and a large blob still stream from the blob server."""
    from mitmproxy.proxy.layers.http import HttpResponseHook

    small = random_bytes(addon_module.INLINE_BLOB_MAX, seed=7)

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, tctx):
            digests = [stage_and_commit(rc.store, data) for data in (small, BLOB)]
            rc.store.add_members("quay.io", "org/img", digests)
            mark_public(rc, "quay.io", "org/img")
            flow = local_flow(upstream_server, f"/v2/org/img/blobs/{digests[0]}")
            await send(rc, flow)
            assert flow.response.status_code == 200 and flow.response.content == small
            assert flow.response.headers["x-cache"] == "HIT"
            assert flow.response.headers["docker-content-digest"] == digests[0]
            assert flow.response.headers["content-type"] == "application/octet-stream"
            assert flow.response.headers["content-length"] == str(len(small))
            assert not flow.metadata.get("regcache.blobserver")
            await tctx.master.addons.invoke_addon(rc, HttpResponseHook(flow))
            snap = rc.monitor.stats.snapshot()
            assert (snap.served_bytes, snap.cache_bytes) == (len(small), len(small))
            assert snap.registries["quay.io"].outcomes[("blob", "HIT")] == 1

            ranged = local_flow(upstream_server, f"/v2/org/img/blobs/{digests[0]}", headers=[("Range", "bytes=0-9")])
            large = local_flow(upstream_server, f"/v2/org/img/blobs/{digests[1]}")
            for routed_flow in (ranged, large):
                await send(rc, routed_flow)
                assert routed_flow.response is None and routed_flow.metadata.get("regcache.blobserver")
            resp = await http_request(ranged.request.port, ranged.request.path)
            assert resp.status == 206 and resp.body == small[:10]

    run(main())
    assert upstream_server.requests == []


def test_blob_upstream_401_is_relayed(tmp_path, upstream_server):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    challenge = 'Bearer realm="https://auth.example/token",service="quay.io"'
    upstream_server.routes[path] = Reply(status=401, body=oci.error_body("UNAUTHORIZED", "auth"), headers=[("WWW-Authenticate", challenge), ("Content-Type", "application/json")])

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            flow = local_flow(upstream_server, path)
            await send(rc, flow)
            assert flow.response.status_code == 401
            assert flow.response.headers["www-authenticate"] == challenge
            assert error_code(flow) == "UNAUTHORIZED"
            assert not rc.store.has_blob(BLOB_DIGEST)

    run(main())


async def assert_redirected_blob_fails_uncached(rc: RegistryCache, upstream_server, path: str, within: float) -> None:
    """A blob GET whose upstream redirect cannot be followed is answered with a 5xx in time; nothing is stored."""
    flow = local_flow(upstream_server, path)
    await asyncio.wait_for(send(rc, flow), within)
    assert flow.response is not None and flow.response.status_code >= 500
    assert not rc.store.has_blob(BLOB_DIGEST)


def test_blob_request_with_broken_upstream_redirect_gets_an_answer(tmp_path, upstream_server):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(status=307, headers=[("Location", "http://127.0.0.1:notaport/blob")])

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            await assert_redirected_blob_fails_uncached(rc, upstream_server, path, within=3)

    run(main())


# --- mirror listeners: which registry a request is for ---------------------------------------------


DOCKER_MIRROR = "reverse:https://registry-1.docker.io@5000"


def mirror_flow(path: str, host: str, mode: str = DOCKER_MIRROR, sni: str | None = None) -> http.HTTPFlow:
    """A request as a mirror listener's client sends it; Host as the client wrote it."""
    spec = ProxyMode.parse(mode)
    hdrs = http.Headers([(b"host", host.encode())])
    scheme = b"https" if sni else b"http"
    req = tutils.treq(host=spec.address[0], port=spec.address[1], scheme=scheme, method=b"GET", path=path.encode(),
                      authority=b"", headers=hdrs, content=b"")
    flow = tflow.tflow(req=req)
    flow.client_conn.proxy_mode = spec
    flow.client_conn.sni = sni
    return flow


@pytest.mark.parametrize(
    "host,sni,registry,target",
    [
        # the cache's own name or address: the listener's upstream
        ("10.0.0.5:5000", None, "docker.io", ("registry-1.docker.io", 443, "https")),
        ("regcache.corp", None, "docker.io", ("registry-1.docker.io", 443, "https")),
        ("127.0.0.1:9090", None, "docker.io", ("registry-1.docker.io", 443, "https")),
        # the DNS way in: a registry's name pointed at the cache (port 80, or 443 with SNI)
        ("quay.io", None, "quay.io", ("quay.io", 443, "https")),
        ("QUAY.IO:80", None, "quay.io", ("quay.io", 443, "https")),
        ("k8s.gcr.io", None, "k8s.gcr.io", ("k8s.gcr.io", 443, "https")),
        ("registry-1.docker.io", None, "docker.io", ("registry-1.docker.io", 443, "https")),
        ("quay.io", "quay.io", "quay.io", ("quay.io", 443, "https")),
        ("10.0.0.5", "gcr.io", "gcr.io", ("gcr.io", 443, "https")),
    ],
)
def test_mirror_registry_named_by_host_or_sni(tmp_path, host, sni, registry, target):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            ident = await routed(rc, mirror_flow("/v2/library/small/manifests/1", host, sni=sni))
            assert ident.registry == registry
            assert (ident.target.host, ident.target.port, ident.target.scheme) == target
            assert ident.path == "/v2/library/small/manifests/1" and ident.forward_credentials

    run(main())


def test_mirror_order_ns_then_prefix_then_host(tmp_path):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            ident = await routed(rc, mirror_flow("/v2/org/img/manifests/1?ns=ghcr.io", "quay.io"))
            assert (ident.registry, ident.target.host, ident.path) == ("ghcr.io", "ghcr.io", "/v2/org/img/manifests/1")
            ident = await routed(rc, mirror_flow("/v2/gcr.io/proj/img/manifests/1", "quay.io"))
            assert (ident.registry, ident.path) == ("gcr.io", "/v2/proj/img/manifests/1")
            # the client's token is for quay.io, where its (unprefixed) /v2/ ping went
            assert not ident.forward_credentials
            ident = await routed(rc, mirror_flow("/v2/quay.io/org/img/manifests/1", "quay.io"))
            assert ident.registry == "quay.io" and ident.forward_credentials
            # a prefix that is not a registry is part of the repository name
            ident = await routed(rc, mirror_flow("/v2/evil.example/img/manifests/1", "cache"))
            assert (ident.registry, ident.path) == ("docker.io", "/v2/evil.example/img/manifests/1")

    run(main())


def test_mirror_client_host_survives_mitmproxys_host_rewrite(tmp_path):
    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            flow = mirror_flow("/v2/library/small/manifests/1", "quay.io")
            # upstream gets the Host mitmproxy sends on a reverse listener; routing still sees quay.io
            assert (await routed(rc, flow)).registry == "quay.io"
            assert flow.request.host_header == "registry-1.docker.io"

    run(main())


@pytest.mark.parametrize("ns", ["evil.example", "127.0.0.1:{port}", "localhost", "gcr.io:1", ""])
def test_mirror_ns_that_is_no_registry_is_refused_and_nothing_fetched(tmp_path, upstream_server, ns):
    ns = ns.format(port=upstream_server.port)
    upstream_server.routes["/v2/org/img/manifests/1"] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_INDEX)])

    async def main():
        # intercept_all widens interception only: a client still cannot name any host
        async with running_addon(tmp_path, "intercept_all: true\n") as (rc, _):
            for path in ("/v2/org/img/manifests/1", "/v2/", f"/v2/org/img/blobs/{BLOB_DIGEST}"):
                mode = f"reverse:http://127.0.0.1:{upstream_server.port}@5000"
                flow = mirror_flow(f"{path}?ns={ns}", "cache:5000", mode=mode)
                await send(rc, flow)
                assert flow.response.status_code == 404, path
                assert error_code(flow) == "NAME_UNKNOWN"
            assert upstream_server.requests == []
            assert rc.store.get_manifest(MANIFEST_DIGEST) is None

    run(main())


def test_mirror_host_of_a_loopback_service_fetches_nothing_there(tmp_path, upstream_server):
    """Host: 127.0.0.1:<a service on the cache host> is the cache's own address: the request is
    the listener's registry's, and the service never hears of it."""
    registry = type(upstream_server)()
    registry.routes["/v2/org/img/manifests/1"] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_INDEX)])
    try:
        async def main():
            async with running_addon(tmp_path) as (rc, _):
                mode = f"reverse:http://127.0.0.1:{registry.port}@5000"
                flow = mirror_flow("/v2/org/img/manifests/1", f"127.0.0.1:{upstream_server.port}", mode=mode)
                await send(rc, flow)
                assert flow.response.status_code == 200 and flow.response.content == MANIFEST
            assert upstream_server.requests == []
            assert registry.count("GET", "/v2/org/img/manifests/1") == 1

        run(main())
    finally:
        registry.close()


# --- redirects upstream sends ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "address,allowed",
    [
        ("93.184.216.34", True), ("2606:4700::6810:84e5", True),
        ("127.0.0.1", False), ("10.77.1.13", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
        ("::1", False), ("fe80::1%eth0", False), ("fd00::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ],
)
def test_redirect_addresses(address, allowed):
    from regcachelib.upstream import redirect_address_allowed

    assert redirect_address_allowed(address, ()) is allowed
    world_net = [ipaddress.ip_network("10.77.1.0/24")]
    assert redirect_address_allowed(address, world_net) is (allowed or address == "10.77.1.13")


@pytest.mark.parametrize(
    "location",
    ["https://localhost:{port}/blob", "https://127.0.0.1:{port}/blob",
     "http://cdn.example/blob", "http://localhost:{port}/blob"],
)
def test_blob_redirect_to_loopback_or_plain_http_is_not_followed(tmp_path, upstream_server, location, caplog):
    path = f"/v2/org/img/blobs/{BLOB_DIGEST}"
    upstream_server.routes[path] = Reply(status=307, headers=[("Location", location.format(port=upstream_server.port))])
    upstream_server.routes["/blob"] = Reply(body=BLOB)

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            await assert_redirected_blob_fails_uncached(rc, upstream_server, path, within=10)
            # refused by rule, not by a failing connection; nothing reached the target
            assert "not following 127.0.0.1's redirect" in caplog.text
            assert [p for _, p, _ in upstream_server.requests] == [path]

    run(main())


@pytest.mark.parametrize("sni", ["quay.io", "cache.example.net", None])
def test_mirror_tls_is_always_intercepted_and_upstream_sni_is_the_listeners(tmp_path, sni):
    """On a mirror's 443 every name is answered (registries pointed at it by DNS, its own name);
    the upstream connection names the listener's upstream, as without keep_host_header."""
    from types import SimpleNamespace

    async def main():
        async with running_addon(tmp_path, offline=True) as (rc, _):
            spec = ProxyMode.parse("reverse:https://registry-1.docker.io@443")
            server = SimpleNamespace(sni=None, address=spec.address)
            data = SimpleNamespace(context=SimpleNamespace(client=SimpleNamespace(proxy_mode=spec), server=server),
                                   client_hello=SimpleNamespace(sni=sni), ignore_connection=False)
            await ctx.master.addons.invoke_addon(rc, TlsClienthelloHook(data))
            assert data.ignore_connection is False
            assert server.sni == "registry-1.docker.io"

    run(main())


# --- a bug of regcache's never breaks a pull -------------------------------------------------------


@pytest.mark.parametrize("mode", ["regular", "reverse:http://127.0.0.1:{port}@5000"])
def test_unexpected_error_passes_the_request_through_with_a_traceback(tmp_path, upstream_server, monkeypatch,
                                                                     caplog, mode):
    async def boom(req):
        raise RuntimeError("a bug")

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, _):
            monkeypatch.setattr(rc.services.blobs, "get", boom)
            monkeypatch.setattr(rc.services.manifests, "get", boom)
            for path in (f"/v2/org/img/blobs/{BLOB_DIGEST}", "/v2/org/img/manifests/v1"):
                if mode == "regular":
                    flow = local_flow(upstream_server, path)
                else:
                    flow = mirror_flow(path, "cache:5000", mode=mode.format(port=upstream_server.port))
                await send(rc, flow)
                # no 500: mitmproxy forwards the request to the registry as it is
                assert flow.response is None
                assert (flow.request.host, flow.request.port) == ("127.0.0.1", upstream_server.port)
                assert flow.request.path == path
            assert caplog.text.count("RuntimeError: a bug") == 2
            assert "passing it through to upstream" in caplog.text

    run(main())


def test_monitor_counts_the_outcome_the_flow_ended_with(tmp_path, upstream_server, caplog):
    """The outcome is logged and counted when the flow ends (response or error), not when the
    answer is decided: a flow that fails after dispatch is not counted as served."""
    import logging

    from mitmproxy.proxy.layers.http import HttpErrorHook, HttpResponseHook

    caplog.set_level(logging.INFO)
    path = "/v2/org/img/manifests/v1"
    upstream_server.routes[path] = Reply(body=MANIFEST, headers=[("Content-Type", oci.OCI_INDEX)])

    async def main():
        async with running_addon(tmp_path, LOCAL_ALIAS) as (rc, tctx):
            first = await send(rc, local_flow(upstream_server, path))
            assert first.response.headers["x-cache"] == "MISS"
            assert rc.monitor.stats.snapshot().registries == {}  # decided, not yet ended
            await tctx.master.addons.invoke_addon(rc, HttpResponseHook(first))
            second = await send(rc, local_flow(upstream_server, path))
            second.error = flow_error = tflow.terr()
            await tctx.master.addons.invoke_addon(rc, HttpErrorHook(second))
            snap = rc.monitor.stats.snapshot()
            assert snap.registries["quay.io"].misses == 1 and snap.registries["quay.io"].hits == 0
            assert "tag=v1 outcome=MISS bytes=" in caplog.text
            assert f"outcome=HIT bytes={len(MANIFEST)} error={flow_error.msg}" in caplog.text

    run(main())

"""stats.py and metrics.py: persisted counters (across processes), the hooks in fill.py and
blobserver.py, the Monitor child addon, /metrics, the status page, upstream instrumentation."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import ssl
import types

import diskcache
import pytest
from prometheus_client import generate_latest

from regcachelib import oci
from regcachelib.access import Access
from regcachelib.blobserver import BlobServer, Signer, Ticket
from regcachelib.fill import Fills
from regcachelib.metrics import Monitor, parse_listen, render_status_page
from regcachelib.stats import OTHER, PRIVATE, Stats
from regcachelib.store import Counters, Store
from regcachelib.upstream import Target, Upstream, UpstreamUnavailable

from .helpers import Reply, http_request, random_bytes, sha256, stage_and_commit, wait_until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _count_in_process(directory: str, n: int) -> None:
    cache = diskcache.Cache(directory)
    stats = Stats(Counters(cache))
    for _ in range(n):
        stats.request("quay.io", "blob", "HIT")
        stats.served_bytes(10, from_store=True)
    stats.flush()
    cache.close()


def test_counters_add_up_across_processes(tmp_path):
    directory = str(tmp_path / "tags")
    diskcache.Cache(directory).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_count_in_process, args=(directory, 200)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    snap = Stats(Counters(diskcache.Cache(directory))).snapshot()
    assert snap.registries["quay.io"].hits == 600
    assert snap.served_bytes == snap.cache_bytes == 6000


def test_snapshot_semantics(tmp_path):
    stats = Stats(Counters(diskcache.Cache(str(tmp_path / "t"))))
    stats.request("docker.io", "manifest", "MISS", "library/a", "GET", 500)  # fetched and served
    stats.request("docker.io", "manifest", "HIT", "library/a", "GET", 500)  # served from the store
    stats.request("docker.io", "manifest", "HIT", "library/a", "HEAD", 0)
    stats.request("docker.io", "blob", "HIT", "library/a", "GET", None)
    stats.request("docker.io", "manifest", "STALE", "library/b", "GET", 100)
    stats.request("quay.io", "manifest", "UPSTREAM_404", "org/x", "GET", 50)
    stats.upstream_bytes("docker.io", 1000)
    stats.served_bytes(1000, from_store=False)  # the client that waited for that download
    stats.served_bytes(1000, from_store=True)  # a later client
    snap = stats.snapshot()  # counts what is still buffered too
    hub = snap.registries["docker.io"]
    assert (hub.hits, hub.misses, hub.other) == (4, 1, 0)
    assert snap.registries["quay.io"].other == 1 and snap.registries["quay.io"].hit_ratio is None
    assert snap.hit_ratio == pytest.approx(4 / 5)
    assert snap.served_bytes == 500 + 500 + 100 + 2000
    assert snap.cache_bytes == 500 + 100 + 1000
    assert snap.upstream_bytes == 1500 and hub.upstream_bytes == 1500
    assert snap.saved_bytes == 3100 - 1500
    assert snap.top_images() == [("docker.io", "library/a", 2), ("docker.io", "library/b", 1)]
    stats.flush()
    again = Stats(stats.cache).snapshot()
    assert {**again.as_dict(), "since": None} == snap.as_dict()
    assert again.since is not None
    assert stats.reset() > 0
    assert Stats(stats.cache).snapshot().served_bytes == 0


def test_fill_and_blobserver_hooks_count_upstream_and_served_bytes(tmp_path, upstream_server):
    data = random_bytes(300 * 1024, seed=3)
    digest = sha256(data)
    # the download waits half way until the first reader follows it
    upstream_server.routes[f"/v2/org/img/blobs/{digest}"] = Reply(body=data, gate_after=100 * 1024)

    async def main():
        store = Store(str(tmp_path / "cache"))
        stats = Stats(store.counters)
        fills = Fills(store, Upstream(ssl.create_default_context(), timeout=5, backoff=0))
        fills.stats = stats
        server = BlobServer(store, fills, Signer(os.urandom(32)))
        server.stats = stats
        await server.start(None, None)
        try:
            fill = fills.start(oci.parse_digest(digest), "quay.io", "org/img", Target("127.0.0.1", upstream_server.port, "http"), f"/v2/org/img/blobs/{digest}", [])
            await fill.headers_ready.wait()
            reader = asyncio.create_task(http_request(server.inband_port, server.issue(Ticket(digest, "MISS"))))
            await wait_until(lambda: not server.tickets)
            upstream_server.gate.set()
            miss = await reader
            assert miss.body == data
            await wait_until(lambda: fills.get(digest) is None)
            hit = await http_request(server.inband_port, server.issue(Ticket(digest, "HIT")))
            assert hit.body == data
        finally:
            await server.stop()
            fills.shutdown()
        snap = stats.snapshot()
        assert snap.upstream_bytes == len(data) and snap.registries["quay.io"].upstream_bytes == len(data)
        assert snap.served_bytes == 2 * len(data)
        assert snap.cache_bytes == len(data)  # only the hit was read from a stored file
        store.close()

    run(main())


def test_parse_listen():
    assert parse_listen("") is None and parse_listen("off") is None
    assert parse_listen("9090") == ("0.0.0.0", 9090) and parse_listen(":9090") == ("0.0.0.0", 9090)
    assert parse_listen("127.0.0.1:9") == ("127.0.0.1", 9) and parse_listen("[::1]:9090") == ("::1", 9090)
    for bad in ("x", "host:", "host:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_monitor_is_loaded_with_the_addon_and_counts_its_log(tmp_path, monkeypatch):
    from mitmproxy.proxy.layers.http import HttpErrorHook, HttpResponseHook
    from mitmproxy.test import taddons, tflow

    from regcachelib import addon as addon_mod
    from regcachelib.request import OUTCOME, REQUEST, Outcome, RegistryRequest

    monkeypatch.setattr(addon_mod, "DEFAULT_DIR", str(tmp_path / "default-cache"))
    cache = addon_mod.RegistryCache()

    async def main():
        with taddons.context(cache) as tctx:
            tctx.configure(cache, regcache_dir=str(tmp_path / "cache"))
            assert tctx.options.regcache_metrics == ""
            monitor = cache.monitor
            assert monitor.stats is not None and monitor.stats.cache is cache.store.counters
            assert cache.fills.stats is monitor.stats
            assert cache.upstream.observe == monitor.observe_upstream
            route = oci.parse_route("quay.io", "/v2/org/x/manifests/1")
            req = RegistryRequest("quay.io", Target("quay.io"), "/v2/org/x/manifests/1", "GET", route, (), "10.0.0.1",
                                  offline=False, direct=False)
            # the monitor counts what the flow ended with, as recorded by the addon that answered it
            for outcome, hook in (("MISS", HttpResponseHook), ("HIT", HttpResponseHook), ("HIT", HttpErrorHook)):
                flow = tflow.tflow(resp=True, err=hook is HttpErrorHook)
                flow.metadata[REQUEST], flow.metadata[OUTCOME] = req, Outcome(outcome, 321)
                await tctx.master.addons.invoke_addon(cache, hook(flow))
            snap = monitor.stats.snapshot()
            assert snap.registries["quay.io"].misses == 1 and snap.registries["quay.io"].hits == 1
            assert snap.upstream_bytes == 321 and snap.cache_bytes == 321
            with pytest.raises(Exception):
                tctx.configure(cache, regcache_metrics="nonsense")
            await cache.done()

    run(main())


def _fake_cache(store, show_private=False):
    access = Access(None, store) if store is not None else None
    return types.SimpleNamespace(store=store, fills=None, blobserver=None, upstream=None, access=access,
                                 config=types.SimpleNamespace(status_show_private=show_private))


def test_endpoint_serves_metrics_status_page_json_and_health(tmp_path):
    store = Store(str(tmp_path / "cache"))
    stage_and_commit(store, random_bytes(70_000, 4))
    store.set_tag("docker.io", "library/small", "1", oci.OCI_MANIFEST, "sha256:" + "1" * 64)
    store.log_miss({"registry": "docker.io", "repo": "library/small", "reference": "1", "kind": "manifest", "size": 900, "outcome": "MISS"})
    monitor = Monitor(_fake_cache(store))
    monitor.cache.access.remember_public("docker.io", "library/small", True)
    monitor.stats = Stats(store.counters)
    monitor.stats.request("docker.io", "manifest", "MISS", "library/small", "GET", 900)
    for _ in range(3):
        monitor.stats.request("docker.io", "manifest", "HIT", "library/small", "GET", 900)
    monitor.listen = ("127.0.0.1", 0)

    async def main():
        await monitor._restart_server()
        port = monitor.port
        try:
            m = await http_request(port, "/metrics")
            page = await http_request(port, "/")
            js = await http_request(port, "/status.json")
            health = await http_request(port, "/healthz")
            missing = await http_request(port, "/nope")
            post = await http_request(port, "/metrics", method="POST")
        finally:
            await monitor._stop_server()
        return m, page, js, health, missing, post

    m, page, js, health, missing, post = run(main())
    text = m.body.decode()
    assert m.status == 200 and m.headers["content-type"].startswith("text/plain")
    assert 'regcache_requests_total{kind="manifest",outcome="HIT",registry="docker.io"} 3.0' in text
    assert 'regcache_bytes_total{source="cache"} 2700.0' in text
    assert 'regcache_store_entries{kind="blob"} 1.0' in text
    assert "regcache_hit_ratio 0.75" in text and "regcache_store_limit_bytes" in text
    assert "regcache_fills_in_flight 0.0" in text and "regcache_verification_failures_total 0.0" in text
    html = page.body.decode()
    assert page.status == 200 and "75.0%" in html and "docker.io/library/small" in html and "Recent misses" in html
    doc = json.loads(js.body)
    assert doc["stats"]["hits"] == 3 and doc["store"]["blobs"] == 1 and doc["recent_misses"][0]["repo"] == "library/small"
    assert health.status == 200 and health.body == b"ok\n"
    assert missing.status == 404 and post.status == 405
    store.close()


def test_status_page_escapes_what_it_shows():
    page = render_status_page({"stats": {"top_images": [{"image": "<script>x</script>", "pulls": 1}], "registries": {}}, "store": {}, "recent_misses": [{"registry": "<b>", "repo": "r", "kind": "blob", "reference": "x", "size": 1}]})
    assert "<script>x" not in page and "&lt;script&gt;" in page and "&lt;b&gt;/r" in page


def test_upstream_latency_errors_and_docker_hub_rate_limit(upstream_server):
    upstream_server.routes["/v2/library/a/manifests/1"] = Reply(body=b"{}", headers=[("ratelimit-limit", "100;w=21600"), ("ratelimit-remaining", "76;w=21600")])
    monitor = Monitor(_fake_cache(None))
    up = Upstream(ssl.create_default_context(), timeout=5, backoff=0, observe=monitor.observe_upstream)
    resp = up.request("GET", Target("127.0.0.1", upstream_server.port, "http"), "/v2/library/a/manifests/1", [])
    resp.close()
    with pytest.raises(UpstreamUnavailable):
        up.request("GET", Target("127.0.0.1", 1, "http"), "/v2/", [])
    text = generate_latest(monitor.registry).decode()
    assert 'regcache_upstream_ratelimit_remaining{credential="anonymous",registry="127.0.0.1"} 76.0' in text
    assert 'regcache_upstream_ratelimit_limit{credential="anonymous",registry="127.0.0.1"} 100.0' in text
    assert 'regcache_upstream_request_seconds_count{host="127.0.0.1"} 1.0' in text
    assert 'regcache_upstream_errors_total{host="127.0.0.1"} 1.0' in text
    # a client's own account (not anonymous, not regcache's): its figures are not shown
    resp = up.request("GET", Target("127.0.0.1", upstream_server.port, "http"), "/v2/library/a/manifests/1",
                      [("Authorization", "Basic dTpw")])
    resp.close()
    assert list(monitor.ratelimits) == [("127.0.0.1", "anonymous")]
    page = render_status_page({"upstream_ratelimits": [dict(monitor.ratelimits[("127.0.0.1", "anonymous")],
                                                            credential="<i>")]})
    assert "<td>&lt;i&gt;</td><td>76</td><td>100</td>" in page


def test_size_limit_gc_runs_above_ninety_percent(tmp_path):
    from .test_cli_inventory import put_image

    store = Store(str(tmp_path / "cache"), size_limit=10**9)
    old, _ = put_image(store, "quay.io", "org/old", "1", [random_bytes(300_000, 5)])
    new, _ = put_image(store, "quay.io", "org/new", "1", [random_bytes(300_000, 6)])
    store.get_manifest(new)
    monitor = Monitor(_fake_cache(store))
    monitor.stats = Stats(store.counters)
    assert run(monitor.gc_if_needed()) is None  # far below the limit
    # 90% of the limit is passed: evict down to 80%, oldest image first
    store.content.reset("size_limit", int(store.content.volume() / 0.95))
    result = run(monitor.gc_if_needed())
    assert result is not None and result.removed_manifests == [old]
    assert store.get_manifest(new) is not None
    assert monitor.stats.snapshot().evictions > 0
    store.close()


# --- what the status page may show of private repositories (issue 9 4b) ----------------------


SECRET_DIGEST = "sha256:" + "5" * 64


def _private_and_public_traffic(store) -> Monitor:
    """library/small (known public) and private/secret (not) pulled and missed once each, one
    download of each in progress."""
    monitor = Monitor(_fake_cache(store))
    monitor.cache.access.remember_public("docker.io", "library/small", True)
    monitor.stats = Stats(store.counters)
    for repo in ("library/small", "private/secret"):
        monitor.stats.request("docker.io", "manifest", "MISS", repo, "GET", 900)
        monitor.stats.request("docker.io", "manifest", "HIT", repo, "GET", 900)
        digest = SECRET_DIGEST if "secret" in repo else "sha256:" + "6" * 64
        store.log_miss({"registry": "docker.io", "repo": repo, "reference": "v1-tag", "digest": digest, "kind": "manifest",
                        "size": 901, "outcome": "MISS"})
    fills = {}
    for repo, digest in (("library/small", "sha256:" + "7" * 64), ("private/secret", SECRET_DIGEST)):
        fills[digest] = types.SimpleNamespace(digest=digest, registry="docker.io", repo=repo, written=10, size=100)
    monitor.cache.fills = types.SimpleNamespace(inflight=fills)
    return monitor


def _rendered(monitor) -> tuple[dict, str, str]:
    status = monitor.status()
    return status, json.dumps(status), monitor.render_html() + generate_latest(monitor.registry).decode()


def test_status_names_only_repositories_known_public_decided_when_rendered(tmp_path):
    store = Store(str(tmp_path / "cache"))
    monitor = _private_and_public_traffic(store)
    status, js, page = _rendered(monitor)
    for text in (js, page):
        assert "private/secret" not in text and SECRET_DIGEST not in text and SECRET_DIGEST[7:19] not in text
        assert "library/small" in text
    stats = status["stats"]
    assert {"image": "docker.io/library/small", "pulls": 2} in stats["top_images"]
    assert {"image": f"docker.io/{PRIVATE}", "pulls": 2} in stats["top_images"]  # counted, not named
    assert stats["private_repositories"] == {"docker.io": 1}
    assert stats["registries"]["docker.io"]["requests"] == 4
    hidden = [m for m in status["recent_misses"] if m["repo"] == PRIVATE]
    assert len(hidden) == 1 and "reference" not in hidden[0] and "size" not in hidden[0]
    assert [f["digest"] for f in status["fills_in_flight"] if f["repo"] == PRIVATE] == [None]
    assert f"{PRIVATE}: 1 repositories" in page

    # an upstream that said "private" (False) hides it just the same
    monitor.cache.access.remember_public("docker.io", "private/secret", False)
    assert "private/secret" not in _rendered(monitor)[1]
    # learnt public after the counts were made: named from then on
    monitor.cache.access.remember_public("docker.io", "private/secret", True)
    status, js, page = _rendered(monitor)
    assert "docker.io/private/secret" in js and SECRET_DIGEST in js and "docker.io/private/secret" in page
    assert status["stats"]["private_repositories"] == {}
    # and hidden again when it turns private
    monitor.cache.access.remember_public("docker.io", "private/secret", False)
    assert "private/secret" not in _rendered(monitor)[1]
    store.close()


def test_status_show_private_names_every_repository(tmp_path):
    store = Store(str(tmp_path / "cache"))
    monitor = _private_and_public_traffic(store)
    monitor.cache.config.status_show_private = True
    status, js, page = _rendered(monitor)
    assert {"image": "docker.io/private/secret", "pulls": 2} in status["stats"]["top_images"]
    assert SECRET_DIGEST in js and "docker.io/private/secret" in page
    store.close()


def test_status_show_private_config_key():
    from regcachelib.config import ConfigError, parse_config

    assert parse_config("").status_show_private is False
    assert parse_config("status_show_private: true").status_show_private is True
    with pytest.raises(ConfigError, match="status_show_private"):
        parse_config("status_show_private: 1")


# --- bounded state keyed by client-chosen names (issue 10 3d) ---------------------------------


def _stats_rows(store) -> int:
    return store.counters.count()


def test_junk_repositories_and_registries_keep_rows_and_series_bounded(tmp_path):
    store = Store(str(tmp_path / "cache"))
    monitor = Monitor(_fake_cache(store, show_private=True))
    monitor.stats = stats = Stats(store.counters, max_registries=20, max_repos=50)
    for i in range(5000):
        stats.request("docker.io", "manifest", "MISS", f"junk/r{i}", "GET", 10)
        stats.request("docker.io", "blob", "MISS", f"junk/r{i}", "GET", None)
        if i % 1000 == 0:
            stats.flush()
    for i in range(300):  # a wildcard pattern lets clients name registries too
        stats.request(f"r{i}.example.com", "manifest", "HIT", "x/y", "GET", 10)
        stats.upstream_bytes(f"r{i}.example.com", 5)
    pending = stats.snapshot()  # what is buffered is bounded as well
    stats.flush()
    snap = stats.snapshot()
    assert pending.pulls == snap.pulls
    hub = [repo for reg, repo in snap.pulls if reg == "docker.io"]
    assert len(hub) == 51 and snap.pulls[("docker.io", OTHER)] == 5000 - 50  # every pull counted
    assert len(snap.registries) == 21 and snap.registries[OTHER].hits == 300 - 19
    assert snap.upstream_bytes == 5000 * 10 + 300 * 5
    rows = _stats_rows(store)
    assert rows < 300, rows
    # a restarted process keeps to the same bounds
    again = Stats(store.counters, max_registries=20, max_repos=50)
    for i in range(5000, 5100):
        again.request("docker.io", "manifest", "MISS", f"junk/r{i}", "GET", 10)
    again.flush()
    assert _stats_rows(store) == rows
    text = generate_latest(monitor.registry).decode()
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(series) < 150, len(series)
    assert f'registry="{OTHER}"' in text

    # upstream hosts named by clients: latency and error series bounded too
    for i in range(1000):
        monitor.observe_upstream(Target(f"h{i}.example.com"), 0.5, None)  # as Upstream reports a failure
    text = generate_latest(monitor.registry).decode()
    assert text.count("regcache_upstream_errors_total{") <= 101
    assert f'regcache_upstream_errors_total{{host="{OTHER}"}} 900.0' in text
    store.close()


def _admit_in_process(directory: str, first: int) -> None:
    cache = diskcache.Cache(directory)
    stats = Stats(Counters(cache), max_registries=5, max_repos=10)
    for i in range(first, first + 30):
        stats.request("docker.io", "manifest", "MISS", f"junk/p{i}", "GET", 1)
        stats.request(f"r{i}.example.com", "manifest", "MISS", "x/y", "GET", 1)
        stats.flush()
    cache.close()


def test_bounds_hold_across_processes_on_one_cache(tmp_path):
    directory = str(tmp_path / "tags")
    diskcache.Cache(directory).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_admit_in_process, args=(directory, 100 * n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    snap = Stats(Counters(diskcache.Cache(directory))).snapshot()
    assert len([repo for reg, repo in snap.pulls if reg == "docker.io" and repo != OTHER]) == 10
    assert len([reg for reg in snap.registries if reg != OTHER]) == 5
    assert sum(snap.pulls.values()) == 2 * 90


# --- no addon method carries a mitmproxy hook's name unless it is that hook ----------------------


def test_every_addon_method_named_like_a_hook_takes_that_hooks_arguments():
    import dataclasses
    import inspect

    import mitmproxy.tools.dump  # noqa: F401 - imports every module that defines hooks
    from mitmproxy import hooks

    from regcachelib.addon import RegistryCache

    assert {"request", "response", "error", "load", "configure", "running", "done"} <= set(hooks.all_hooks)

    def walk(addon):
        yield addon
        for child in getattr(addon, "addons", []) or []:
            yield from walk(child)

    checked = []
    for addon in walk(RegistryCache()):
        for name in dir(addon):
            if name.startswith("_") or name not in hooks.all_hooks:
                continue
            method = getattr(addon, name)
            assert callable(method), f"{type(addon).__name__}.{name} is named like a hook but not callable"
            fields = [f.name for f in dataclasses.fields(hooks.all_hooks[name])]
            try:
                inspect.signature(method).bind(*fields)
            except TypeError as e:
                pytest.fail(f"{type(addon).__name__}.{name} is called as mitmproxy's {name} hook "
                            f"with ({', '.join(fields)}): {e}")
            checked.append(f"{type(addon).__name__}.{name}")
    assert "Monitor.configure" in checked and "Blobs.request" in checked and "Manifests.request" in checked


def test_status_shows_version_since_and_backed_off_registries(tmp_path):
    store = Store(str(tmp_path / "cache"))
    up = Upstream(ssl.create_default_context(), timeout=2, backoff=30)
    with pytest.raises(UpstreamUnavailable):
        up.request("GET", Target("127.0.0.1", 1, "http"), "/v2/", [])  # nothing listens on port 1
    cache = _fake_cache(store)
    cache.upstream = up
    monitor = Monitor(cache)
    monitor.stats = Stats(store.counters)
    monitor.stats.request("docker.io", "manifest", "HIT", "library/small", "GET", 1)
    status = monitor.status()
    assert status["version"] not in ("", None) and status["since"] == monitor.stats.snapshot().since
    [down] = status["upstream_backed_off"]
    assert (down["scheme"], down["host"], down["port"]) == ("http", "127.0.0.1", 1) and 0 < down["retry_in"] <= 30
    page = render_status_page(status)
    assert "Upstream health" in page and "http://127.0.0.1:1" in page and status["version"] in page
    store.close()

"""Seeing into a running cache: persisted statistics, a Prometheus endpoint, a status page.

`Monitor` is a child addon of RegistryCache (mitmproxy loads an addon's `addons` too). It
counts every answered request (RegistryCache._log calls `record`), the bytes the blob server
sends and the bytes fills download (stats.Stats, persisted in the cache dir), times upstream
requests, and — when the option `regcache_metrics` is set to host:port — serves on the
addon's own event loop:

    /             HTML status page: hit ratio, bytes saved, store fill, top images, recent misses
    /metrics      Prometheus text format (prometheus-client)
    /status.json  what the page shows, as JSON
    /healthz      "ok" (for container health checks)

Repositories not known to be public (access.py's stored verdict, read when a page or
status.json is rendered, so a repository counted before its probe finished stays hidden until
it is known public) are never named there: their pulls are summed into one "(private)" row per
registry, their misses and downloads in progress are shown without name, tag or digest. The
config key `status_show_private: true` names them. Prometheus labels carry registries and
upstream hosts only, never repositories, and are bounded like the persisted counters
(stats.MAX_REGISTRIES; the rest under "(other)").

It also keeps the store under its size limit the manifest-aware way: when the store passes
90% of size_limit it runs inventory.gc down to 80% (least recently used images first, never
a blob a retained manifest references, never a pinned image), before diskcache's own
cull at 100% (which knows nothing of manifests) has to.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import html
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import oci
from .credentials import ANONYMOUS, is_anonymous
from .stats import MAX_REGISTRIES, OTHER, PRIVATE, Stats
from .request import OUTCOME, REQUEST

log = logging.getLogger(__name__)

OPTION = "regcache_metrics"
GC_INTERVAL = 60.0
GC_HIGH, GC_LOW = 0.90, 0.80
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def parse_listen(value: str) -> tuple[str, int] | None:
    """'' -> off; '9090' or ':9090' -> all interfaces; 'host:port'; '[::1]:9090'."""
    value = (value or "").strip()
    if not value or value.lower() in ("off", "false", "no", "0"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{OPTION}: expected host:port or port, got {value!r}")
    return host or "0.0.0.0", int(port)


def _ratelimit_value(header: str | None) -> int | None:
    """Docker Hub sends 'ratelimit-remaining: 76;w=21600'."""
    if not header:
        return None
    head = header.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None


def tail_lines(path: str, n: int, max_bytes: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first one is probably cut
    return lines[-n:]


def human(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def store_summary(store) -> dict:
    """Size, limit and entry counts of a store, from the SQLite index only."""
    return {"size": store.volume(), "limit": store.size_limit, **store.entry_counts()}


class _StatsCollector:
    """Prometheus view of the persisted counters and of the store (read at scrape time)."""

    def __init__(self, monitor: "Monitor"):
        self.monitor = monitor

    def collect(self):
        m = self.monitor
        stats, cache = m.stats, m.cache
        if stats is None or cache.store is None:
            return
        snap = stats.snapshot()
        requests = CounterMetricFamily(
            "regcache_requests", "Registry requests answered, by registry, kind (blob/manifest) and outcome "
            "(HIT, MISS, REVALIDATED, STALE, UNKNOWN, UPSTREAM_<status>, ERROR...)",
            labels=["registry", "kind", "outcome"])
        for registry, r in sorted(snap.registries.items()):
            for (kind, outcome), count in sorted(r.outcomes.items()):
                requests.add_metric([registry, kind, outcome], count)
        yield requests
        b = CounterMetricFamily(
            "regcache_bytes", "Bytes by source: served (sent to clients), cache (of those, read from stored "
            "content), upstream (fetched from upstream registries)", labels=["source"])
        b.add_metric(["served"], snap.served_bytes)
        b.add_metric(["cache"], snap.cache_bytes)
        b.add_metric(["upstream"], snap.upstream_bytes)
        yield b
        up = CounterMetricFamily("regcache_upstream_bytes", "Bytes fetched from upstream, by registry",
                                 labels=["registry"])
        for registry, r in sorted(snap.registries.items()):
            up.add_metric([registry], r.upstream_bytes)
        yield up
        yield CounterMetricFamily("regcache_evictions", "Blobs and manifests evicted by manifest-aware gc "
                                  "(regcache gc, and the proxy's own size limit)", value=snap.evictions)
        yield CounterMetricFamily("regcache_evicted_bytes", "Bytes evicted by manifest-aware gc",
                                  value=snap.evicted_bytes)
        yield CounterMetricFamily("regcache_verification_failures", "Stored blobs and manifests that failed "
                                  "`regcache verify` (quarantined)", value=snap.verify_failures)
        ratio = snap.hit_ratio
        yield GaugeMetricFamily("regcache_hit_ratio", "hits / (hits + misses) since the counters began",
                                value=ratio if ratio is not None else 0.0)
        s = store_summary(cache.store)
        yield GaugeMetricFamily("regcache_store_bytes", "Size of the store on disk", value=s["size"])
        yield GaugeMetricFamily("regcache_store_limit_bytes", "The store's size limit", value=s["limit"])
        entries = GaugeMetricFamily("regcache_store_entries", "Entries in the store", labels=["kind"])
        entries.add_metric(["blob"], s["blobs"])
        entries.add_metric(["manifest"], s["manifests"])
        entries.add_metric(["tag"], s["tags"])
        entries.add_metric(["pin"], s["pins"])
        yield entries
        yield GaugeMetricFamily("regcache_fills_in_flight", "Blob downloads in progress",
                                value=len(cache.fills.inflight) if cache.fills else 0)
        services = getattr(cache, "services", None)
        tier = getattr(services, "tier", None)
        if tier is not None:
            status = tier.status()
            up = GaugeMetricFamily("regcache_tier_up", "Whether the tier's backend answers (1) or is down (0)",
                                   labels=["backend"])
            outages = CounterMetricFamily("regcache_tier_outages", "Outages of the tier's backends seen by this "
                                          "node since it started", labels=["backend"])
            for backend in ("s3", "redis"):
                up.add_metric([backend], 1.0 if status[backend]["up"] else 0.0)
                outages.add_metric([backend], status[backend]["outages"])
            yield up
            yield outages
            shared = CounterMetricFamily("regcache_tier_bytes", "Blob bytes this node read from the tier's object "
                                         "store and uploaded to it", labels=["direction"])
            shared.add_metric(["read"], status["bytes_read"])
            shared.add_metric(["uploaded"], status["bytes_uploaded"])
            yield shared


class Monitor:
    """Child addon of RegistryCache: statistics, metrics, status page, size-limit gc."""

    def __init__(self, cache):
        self.cache = cache  # the RegistryCache
        self.stats: Stats | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "regcache_upstream_request_seconds", "Time from sending an upstream request to its response headers, "
            "by host", ["host"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.upstream_errors = Counter(
            "regcache_upstream_errors", "Upstream requests that failed to connect, timed out or were backed off, "
            "by host", ["host"], registry=self.registry)
        self.ratelimit_remaining = Gauge(
            "regcache_upstream_ratelimit_remaining", "Pulls left in the current window, as last reported by the "
            "upstream (Docker Hub's ratelimit-remaining), by registry and credential: a configured username, or "
            "anonymous (this host's address)", ["registry", "credential"], registry=self.registry)
        self.ratelimit_limit = Gauge(
            "regcache_upstream_ratelimit_limit", "Pulls allowed per window, as last reported by the upstream "
            "(ratelimit-limit), by registry and credential", ["registry", "credential"], registry=self.registry)
        # (registry, credential) -> the last figures upstream reported, for the status page
        self.ratelimits: dict[tuple[str, str], dict] = {}
        self.registry.register(_StatsCollector(self))
        self._host_labels: set[str] = set()  # upstream hosts with series of their own
        self.listen: tuple[str, int] | None = None
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._running = False
        self._gc_task: asyncio.Task | None = None
        self._gc_busy = False
        self.started = time.time()

    # --- mitmproxy events -------------------------------------------------------------------

    def load(self, loader):
        loader.add_option(OPTION, str, "", "Serve Prometheus metrics (/metrics) and a status page (/) on host:port "
                                           "(e.g. 127.0.0.1:9090 or :9090); empty: off.")

    def use(self, services) -> None:
        """The services RegistryCache answers with now: count into their store."""
        if self.stats is None or self.stats.cache is not services.store.counters:
            if self.stats is not None:
                self.stats.stop()
            self.stats = Stats(services.store.counters)
            if self._running:
                self.stats.start()
        services.fills.stats = self.stats
        if self.cache.blobserver is not None:
            self.cache.blobserver.stats = self.stats

    def configure(self, updated):
        from mitmproxy import ctx, exceptions

        if OPTION in updated:
            try:
                listen = parse_listen(getattr(ctx.options, OPTION))
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            if listen != self.listen:
                self.listen = listen
                if self._running:
                    asyncio.get_running_loop().create_task(self._restart_server())

    async def running(self):
        self._running = True
        if self.stats is not None:
            self.stats.start()
        if self.cache.blobserver is not None:
            self.cache.blobserver.stats = self.stats
        await self._restart_server()
        self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())

    async def done(self):
        self._running = False
        if self._gc_task is not None:
            self._gc_task.cancel()
        await self._stop_server()
        if self.stats is not None:
            self.stats.stop()  # flushes; reopens the tags db if the store closed it first
            self.stats.cache.close()

    # --- counting -----------------------------------------------------------------------------------

    def response(self, flow) -> None:
        self._observe(flow)

    def error(self, flow) -> None:
        self._observe(flow)

    def _observe(self, flow) -> None:
        """Log and count the outcome the blob and manifest addons recorded, once the flow ended
        (a flow that failed after its answer was decided says so in its log line)."""
        req = flow.metadata.get(REQUEST)
        if req is None or req.route is None or OUTCOME not in flow.metadata:
            return
        outcome = flow.metadata.pop(OUTCOME)  # counted once, whichever hook ends the flow
        route = req.route
        failed = f" error={flow.error.msg}" if flow.error else ""
        log.info(
            "%s %s registry=%s repo=%s %s=%s outcome=%s%s%s%s",
            req.method, route.kind, req.registry, route.name, "digest" if route.digest else "tag", route.reference,
            outcome.outcome,
            f" bytes={outcome.size}" if outcome.size is not None else "",
            f" via={outcome.via}" if outcome.via else "",
            failed,
        )
        self.record(req.registry, route.kind, "ERROR" if flow.error else outcome.outcome, route.name, req.method,
                    outcome.size)
        if route.kind == oci.BLOB and outcome.size and req.method == "GET" and not flow.error and self.stats:
            # a small blob answered inline (the blob server counts the bytes it sends itself)
            self.stats.served_bytes(outcome.size, from_store=True)

    def record(self, registry: str, kind: str, outcome: str, repo: str, method: str, size: int | None) -> None:
        """One answered request."""
        if self.stats is not None:
            self.stats.request(registry, kind, outcome, repo, method, size)

    def observe_upstream(self, target, seconds: float, resp) -> None:
        """Upstream's report of one exchange: its time to response headers, or that it failed;
        the rate-limit headers it carried (Docker Hub)."""
        host = self._host_label(target.host)
        if resp is None:
            self.upstream_errors.labels(host).inc()
            return
        self.latency.labels(host).observe(seconds)
        remaining = _ratelimit_value(resp.header("ratelimit-remaining"))
        if remaining is None:
            return
        credential = self._credential_label(resp)
        if credential is None:
            return  # a client's own account: its figures are that client's business
        registry = self._host_label(oci.canonical_registry(target.host))
        self.ratelimit_remaining.labels(registry, credential).set(remaining)
        limit = _ratelimit_value(resp.header("ratelimit-limit"))
        if limit is not None:
            self.ratelimit_limit.labels(registry, credential).set(limit)
        source = resp.header("docker-ratelimit-source")
        previous = self.ratelimits.get((registry, credential))
        self.ratelimits[(registry, credential)] = {
            "registry": registry, "credential": credential, "remaining": remaining, "limit": limit,
            # Docker Hub names the address it counts anonymous pulls against; an account's id is not shown
            "source": source[:64] if credential == ANONYMOUS and source else None, "time": time.time()}
        if remaining == 0 and (previous is None or previous["remaining"] != 0):  # once, not per request
            log.warning("%s: no pulls left for %s (ratelimit-remaining 0); cached tags are answered stale",
                        registry, credential)

    def _credential_label(self, resp) -> str | None:
        """Whose pull limit upstream's figures are: a configured account's username, or anonymous
        (no credentials, an anonymous token, or Docker Hub counting by address); None for a
        client's own account."""
        services = getattr(self.cache, "services", None)
        credentials = getattr(services, "credentials", None)
        authorization = resp.sent_authorization
        user = credentials.whose(authorization) if credentials is not None else None
        if user is not None:
            return user
        if is_anonymous(authorization):
            return ANONYMOUS
        try:
            ipaddress.ip_address((resp.header("docker-ratelimit-source") or "").strip())
        except ValueError:
            return None
        return ANONYMOUS

    def _host_label(self, host: str) -> str:
        # A wildcard registry pattern lets clients name the upstream host: each new name would
        # be a new series forever.
        if host in self._host_labels:
            return host
        if len(self._host_labels) >= MAX_REGISTRIES:
            return OTHER
        self._host_labels.add(host)
        return host

    # --- what may be shown -------------------------------------------------------------------------

    def visible(self) -> Callable[[str, str], bool]:
        """Whether a repository may be named on the status page and in status.json: only when
        it is known to be public now, unless the operator set status_show_private. Answers are
        kept for one rendering only: publicness may be learnt (or lost) at any time."""
        if getattr(getattr(self.cache, "config", None), "status_show_private", False):
            return lambda registry, repo: True
        access = getattr(self.cache, "access", None)
        answers: dict[tuple, bool] = {}

        def visible(registry, repo) -> bool:
            key = (registry, repo)
            if key not in answers:
                try:
                    answers[key] = access is not None and access.known_public(registry, repo)[0] is True
                except Exception:  # noqa: BLE001 - unreadable verdict: not known public
                    answers[key] = False
            return answers[key]

        return visible

    def _pool(self):
        """The store's pool (concurrency.Workers): gc and the pages read and write the store."""
        workers = getattr(self.cache, "workers", None)
        return workers.store if workers is not None else None

    # --- size limit -----------------------------------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL)
            try:
                await self.gc_if_needed()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("size-limit gc failed")

    async def gc_if_needed(self):
        store = self.cache.store
        if store is None or self._gc_busy:
            return None
        limit = store.size_limit
        if store.volume() <= limit * GC_HIGH:
            return None
        from .inventory import gc

        self._gc_busy = True
        try:
            # eviction is a store write: the store's pool runs it
            result = await asyncio.get_running_loop().run_in_executor(self._pool(), gc, store, int(limit * GC_LOW),
                                                                      False, self.stats)
        finally:
            self._gc_busy = False
        log.info("size limit: evicted %d manifests and %d blobs (%s), store now %s of %s",
                 len(result.removed_manifests), len(result.removed_blobs), human(result.removed_bytes),
                 human(result.after), human(limit))
        return result

    # --- the HTTP endpoint ------------------------------------------------------------------------------

    async def _restart_server(self) -> None:
        await self._stop_server()
        if self.listen is None:
            return
        host, port = self.listen
        try:
            self.server = await asyncio.start_server(self._handle, host, port, limit=16 * 1024)
        except OSError as e:
            # The listener is off unless asked for, so this address was asked for by name:
            # an error logged during start-up makes mitmdump exit 1 (its errorcheck addon).
            log.error("cannot listen on %s=%s:%d for metrics and the status page: %s", OPTION, host, port, e)
            return
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics, status page on http://%s:%d/", host, self.port, host, self.port)

    async def _stop_server(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        allowed = getattr(self.cache, "client_allowed", None)
        if allowed is not None and not allowed(peer[0] if peer else None, "metrics listener"):
            writer.close()
            return
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3:
                await self._send(writer, 400, "text/plain", b"bad request\n")
                return
            method, target = parts[0], parts[1]
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, "text/plain", b"only GET\n")
                return
            path = urlsplit(target).path
            loop = asyncio.get_running_loop()
            if path == "/metrics":
                body = await loop.run_in_executor(self._pool(), generate_latest, self.registry)
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            elif path in ("/", "/status", "/index.html"):
                body = (await loop.run_in_executor(self._pool(), self.render_html)).encode()
                ctype = "text/html; charset=utf-8"
            elif path == "/status.json":
                body = json.dumps(await loop.run_in_executor(self._pool(), self.status), indent=1).encode()
                ctype = "application/json"
            elif path == "/healthz":
                ok = self.cache.store is not None
                await self._send(writer, 200 if ok else 503, "text/plain", b"ok\n" if ok else b"no store\n", method)
                return
            else:
                await self._send(writer, 404, "text/plain", b"not found\n")
                return
            await self._send(writer, 200, ctype, body, method)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001
            log.exception("metrics endpoint failed")
            try:
                await self._send(writer, 500, "text/plain", b"internal error\n")
            except Exception:  # noqa: BLE001
                pass
        finally:
            writer.close()

    async def _send(self, writer, status: int, ctype: str, body: bytes, method: str = "GET") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n")
        writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
        await writer.drain()

    # --- what the page shows -------------------------------------------------------------------------------

    def status(self) -> dict:
        cache = self.cache
        visible = self.visible()
        snap = self.stats.snapshot().redacted(visible) if self.stats is not None else None
        store = cache.store
        summary = store_summary(store) if store is not None else {}
        misses = []
        if store is not None:
            for line in reversed(tail_lines(store.miss_log_path, 20)):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                registry, repo = rec.get("registry"), rec.get("repo")
                if not (isinstance(registry, str) and isinstance(repo, str) and visible(registry, repo)):
                    # no name, tag, digest or size of a repository not known public
                    rec = {"time": rec.get("time", 0), "registry": str(registry), "repo": PRIVATE,
                           "kind": rec.get("kind"), "outcome": rec.get("outcome")}
                misses.append(rec)
        fills = []
        if cache.fills is not None:
            for fill in list(cache.fills.inflight.values()):
                shown = visible(fill.registry, fill.repo)
                fills.append({"digest": str(fill.digest) if shown else None, "registry": fill.registry,
                              "repo": fill.repo if shown else PRIVATE, "written": fill.written, "size": fill.size})
        upstream = cache.upstream
        return {
            "time": time.time(),
            "version": regcache_version(),
            "since": snap.since if snap is not None else None,  # what the page's "counting since" shows
            "uptime": time.time() - self.started,
            "directory": store.directory if store is not None else None,
            # registry endpoints regcache is backing off after a failure: their misses answer 503
            "upstream_backed_off": upstream.backed_off() if upstream is not None else [],
            # pulls left per registry and credential, as upstream last reported them (Docker Hub)
            "upstream_ratelimits": [dict(v) for _, v in sorted(self.ratelimits.items())],
            "stats": snap.as_dict() if snap is not None else None,
            "store": summary,
            "recent_misses": misses,
            "fills_in_flight": fills,
        }

    def render_html(self) -> str:
        return render_status_page(self.status())


def regcache_version() -> str:
    try:
        return importlib.metadata.version("regcache")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _short_ref(ref: str) -> str:
    return ref[:19] + "…" if ref.startswith("sha") and len(ref) > 20 else ref[:80]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render_status_page(status: dict) -> str:
    e = html.escape
    stats = status.get("stats") or {}
    b = stats.get("bytes") or {}
    store = status.get("store") or {}
    size, limit = store.get("size", 0), store.get("limit", 0) or 1
    fill_pct = min(100.0, 100.0 * size / limit)
    rows_reg = "".join(
        f"<tr><td>{e(name)}</td><td>{r['requests']}</td><td>{r['hits']}</td><td>{r['misses']}</td>"
        f"<td>{_pct(r['hit_ratio'])}</td><td>{human(r['upstream_bytes'])}</td></tr>"
        for name, r in (stats.get("registries") or {}).items()
    ) or '<tr><td colspan="6">no requests yet</td></tr>'
    rows_top = "".join(
        f"<tr><td>{e(t['image'])}</td><td>{t['pulls']}</td></tr>" for t in stats.get("top_images") or []
    ) or '<tr><td colspan="2">no pulls yet</td></tr>'
    private = stats.get("private_repositories") or {}
    note_private = (
        '<p class="sub" id="private-note">'
        + ", ".join(f"{e(reg)}/{PRIVATE}: {n} repositories" for reg, n in private.items())
        + " not known to be public, summed (config <code>status_show_private: true</code> names them)</p>"
    ) if private else ""
    rows_miss = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            e(time.strftime("%m-%d %H:%M:%S", time.localtime(m.get("time", 0)))),
            e(f"{m.get('registry', '')}/{m.get('repo', '')}"),
            e(str(m.get("kind", ""))),
            e(_short_ref(str(m.get("reference", "")))),
            e(human(m.get("size")) if isinstance(m.get("size"), int) else "-"),
        )
        for m in status.get("recent_misses") or []
    ) or '<tr><td colspan="5">no misses recorded</td></tr>'
    rows_fill = "".join(
        f"<tr><td>{e(f['registry'])}/{e(f['repo'])}</td><td><code>{e(_short_ref(f['digest'] or '-'))}</code></td>"
        f"<td>{human(f['written'])} of {human(f['size'])}</td></tr>"
        for f in status.get("fills_in_flight") or []
    ) or '<tr><td colspan="3">none</td></tr>'
    rows_down = "".join(
        f"<tr><td>{e(d['scheme'])}://{e(d['host'])}:{e(str(d['port']))}"
        f"{' at ' + e(d['address']) if d.get('address') else ''}</td><td>{e(str(d['retry_in']))} s</td></tr>"
        for d in status.get("upstream_backed_off") or []
    ) or '<tr><td colspan="2">every registry answered its last request</td></tr>'
    rows_limits = "".join(
        f"<tr><td>{e(r['registry'])}</td><td>{e(r['credential'])}"
        f"{' (' + e(r['source']) + ')' if r.get('source') else ''}</td><td>{r['remaining']}</td>"
        f"<td>{'-' if r.get('limit') is None else r['limit']}</td>"
        f"<td>{e(time.strftime('%H:%M:%S', time.localtime(r.get('time', 0))))}</td></tr>"
        for r in status.get("upstream_ratelimits") or []
    ) or '<tr><td colspan="5">no upstream reported a rate limit</td></tr>'
    since = e(time.strftime('%Y-%m-%d %H:%M', time.localtime(status.get('since') or status.get('time', 0))))
    entries = (f"{store.get('blobs', 0)} blobs · {store.get('manifests', 0)} manifests · "
               f"{store.get('tags', 0)} tags · {store.get('pins', 0)} pinned")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>regcache status</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} h1{{margin-bottom:0}} .sub{{color:#666;margin-top:.2em}}
.cards{{display:flex;gap:1em;flex-wrap:wrap;margin:1.5em 0}}
.card{{border:1px solid #ccc;border-radius:6px;padding:.8em 1.2em;min-width:11em}}
.card .v{{font-size:1.8em;font-weight:600}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left;white-space:nowrap}}
.bar{{width:20em;height:1em;background:#eee;border-radius:3px}}
.bar div{{height:100%;background:#4a8;border-radius:3px}}
</style></head><body>
<h1>regcache</h1><p class="sub">cache <code>{e(str(status.get('directory')))}</code> · counting since {since} ·
regcache {e(str(status.get('version')))}</p>
<div class="cards">
<div class="card" id="hit-ratio"><div>Hit ratio</div><div class="v">{_pct(stats.get('hit_ratio'))}</div>
<div>{stats.get('hits', 0)} hits · {stats.get('misses', 0)} misses</div></div>
<div class="card" id="bytes-saved"><div>Bytes saved</div><div class="v">{human(b.get('saved', 0))}</div>
<div>served {human(b.get('served', 0))} · from upstream {human(b.get('from_upstream', 0))}</div></div>
<div class="card" id="store-fill"><div>Store fill</div><div class="v">{fill_pct:.1f}%</div>
<div>{human(size)} of {human(limit)}</div><div class="bar"><div style="width:{fill_pct:.1f}%"></div></div>
<div>{entries}</div></div>
</div>
<h2>Registries</h2><table id="registries">
<tr><th>registry</th><th>requests</th><th>hits</th><th>misses</th><th>hit ratio</th><th>from upstream</th></tr>
{rows_reg}</table>
<h2>Upstream health</h2><table id="upstream-health">
<tr><th>backed off (a recent connection failed; misses answer 503 until)</th><th>retry in</th></tr>{rows_down}</table>
<h2>Upstream rate limits</h2><table id="upstream-ratelimits">
<tr><th>registry</th><th>credential</th><th>pulls left</th><th>limit</th><th>reported at</th></tr>{rows_limits}</table>
<h2>Top images</h2><table id="top-images"><tr><th>image</th><th>pulls</th></tr>{rows_top}</table>{note_private}
<h2>Recent misses</h2><table id="recent-misses">
<tr><th>time</th><th>repository</th><th>kind</th><th>reference</th><th>size</th></tr>{rows_miss}</table>
<h2>Downloads in progress</h2><table id="fills">
<tr><th>repository</th><th>digest</th><th>progress</th></tr>{rows_fill}</table>
<p class="sub">Prometheus metrics: <a href="/metrics">/metrics</a> · JSON: <a href="/status.json">/status.json</a></p>
</body></html>
"""

"""mitmproxy glue: the RegistryCache addon.

Decides, per /v2 request of a registry host, whether the store answers, a fill starts, or
the request passes through untouched; keeps non-registry TLS out of interception.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs

from . import oci
from .access import Access, Question
from .blobserver import FASTPATH_PREFIX, BlobServer, Signer, Ticket
from .config import Config, ConfigError, load_config
from .destinations import DestinationPolicy
from .fill import MAX_ERROR_BODY, Fills
from .metrics import Monitor
from .store import Manifest, Store
from .upstream import Target, Upstream, UpstreamUnavailable, make_ssl_context

log = logging.getLogger("regcache")

DEFAULT_DIR = os.path.join(os.getcwd(), "regcache-cache")
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
# A path-prefix mirror names the registry as the first path component: /v2/quay.io/org/img/...
_PREFIXED = re.compile(r"^/v2/(?P<registry>[^/]+\.[^/]+|[^/]+:\d+|localhost)/(?P<rest>.+)$")
# Worker threads for upstream calls, and how many of them one upstream endpoint may hold: a
# slow (or hostile) upstream keeps its own requests waiting, never everyone else's.
UPSTREAM_WORKERS = 32
UPSTREAM_PER_ENDPOINT = 8
# Request headers forwarded to upstream on our own fetches.
_FORWARD = ("authorization", "accept", "user-agent", "range")
# flow.metadata key: the Host a client sent to a mirror listener (mitmproxy rewrites the header).
CLIENT_HOST = "regcache.client_host"
_TLS_SCHEMES = ("https", "tls", "http3", "quic", "dtls")


@dataclass
class Identity:
    """Which registry a flow talks to, and where regcache fetches from for it."""

    registry: str
    target: Target
    path: str  # the /v2 path without a mirror's registry prefix or query
    # A path-prefix mirror request carries a token the client got for the mirror's own
    # registry (its /v2/ ping is never prefixed); it must not travel to another registry.
    forward_credentials: bool = True
    # Whether answers for this flow may enter the shared cache: only from the registry's own
    # HTTPS endpoint (or one configured as plain HTTP), never from a scheme or port a client chose.
    cacheable: bool = True


def _answered_digest(route: oci.Route, method: str, status: int, headers, body: bytes) -> str | None:
    """The digest a 200 manifest answer is for, or None when it cannot be told."""
    if status != 200:
        return None
    if route.digest is not None:
        return str(route.digest)
    if method == "GET":
        return oci.sha256_digest(body)
    claimed = next((v for k, v in headers if k.lower() == "docker-content-digest"), None)
    return oci.valid_digest(claimed)


def _header_list(flow: http.HTTPFlow, names=_FORWARD) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in flow.request.headers.items(multi=True) if k.lower() in names]
    meta = flow.metadata.get("regcache")
    if meta is not None and not meta[0].forward_credentials:
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
    return headers


def _refuse_repeated_options(options) -> None:
    """A regcache option given twice (``--set regcache_dir=a --set regcache_dir=b``) makes
    mitmproxy refuse it only after regcache has loaded, in a task whose error nobody sees:
    mitmdump then runs as a plain proxy that caches nothing. Say so while it can still stop
    the start (an error logged during start-up makes mitmdump exit 1)."""
    for name, value in getattr(options, "deferred", {}).items():
        values = getattr(value, "val", None)  # still the --set strings: not yet parsed
        if name.startswith("regcache_") and isinstance(values, list) and len(values) > 1:
            log.error("%s is set %d times (%s): give it once", name, len(values), ", ".join(map(repr, values)))


def _check_writable(directory: str) -> None:
    """Raise OSError unless files can be created in directory: an existing store the process
    may only read opens fine, and would then fail every blob download."""
    with tempfile.TemporaryFile(dir=directory):
        pass


class RegistryCache:
    def __init__(self) -> None:
        self.config = Config()
        self.store: Store | None = None
        self.upstream: Upstream | None = None
        self.fills: Fills | None = None
        self.blobserver: BlobServer | None = None
        self.access: Access | None = None
        self.signer = Signer(os.urandom(32))
        self.executor = ThreadPoolExecutor(max_workers=UPSTREAM_WORKERS, thread_name_prefix="regcache-upstream")
        # (host, address) -> how many of its upstream calls may hold a worker at once
        self._endpoint_slots: dict[tuple, asyncio.Semaphore] = {}
        # single-flight for manifests and tag revalidation: key -> future of the leader
        self.manifest_flights: dict[tuple, asyncio.Future] = {}
        self._probing: set[tuple[str, str]] = set()
        # an open registry's anonymous /v2/ answer: target -> (monotonic time, status, headers, body)
        self.ping_cache: dict[Target, tuple[float, int, list, bytes]] = {}
        # statistics, /metrics and the status page (a child addon: mitmproxy loads it too)
        self.monitor = Monitor(self)
        self.addons = [self.monitor, DestinationPolicy(self)]  # DestinationPolicy: no proxying into this host

    # --- options ----------------------------------------------------------------------

    def load(self, loader):
        loader.add_option("regcache_dir", str, DEFAULT_DIR, "Cache directory: the whole state of the cache; copy it to migrate.")
        loader.add_option("regcache_config", str, "", "Optional YAML file with registries, aliases, tag TTL, size limit, fast path.")
        loader.add_option("regcache_offline", bool, False, "Answer only from the cache; never contact an upstream registry.")
        _refuse_repeated_options(loader.master.options)

    def configure(self, updated):
        if "regcache_config" in updated:
            try:
                self.config = load_config(ctx.options.regcache_config or None)
            except ConfigError as e:
                raise exceptions.OptionsError(f"regcache_config: {e}") from None
        if "regcache_dir" in updated or "regcache_config" in updated:
            directory = ctx.options.regcache_dir
            if not directory:
                raise exceptions.OptionsError("regcache_dir must not be empty")
            try:
                if self.store is None or self.store.directory != os.path.abspath(directory):
                    store = Store(directory, self.config.size_limit)
                    try:
                        swept = store.sweep_staging()
                        _check_writable(store.staging_dir)
                    except BaseException:
                        store.close()
                        raise
                    # Only a usable new store replaces the old one: a refused value is rolled
                    # back by mitmproxy, and the cache must go on with the store it had.
                    if self.store is not None:
                        self.store.close()
                    self.store = store
                    if swept:
                        log.info("regcache: removed %d leftover staging file(s) from an earlier run", swept)
                else:
                    self.store.set_size_limit(self.config.size_limit)
            except (OSError, sqlite3.Error) as e:
                # At start-up mitmproxy logs this as an error and exits 1 (its errorcheck addon):
                # never a proxy that forwards everything uncached.
                raise exceptions.OptionsError(f"regcache_dir {directory!r} is not usable: {e}") from None
        if updated & {"regcache_dir", "regcache_config", "ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir"}:
            ssl_context = make_ssl_context(
                ctx.options.ssl_insecure,
                ctx.options.ssl_verify_upstream_trusted_ca,
                ctx.options.ssl_verify_upstream_trusted_confdir,
            )
            self.upstream = Upstream(
                ssl_context, self.config.upstream_timeout, self.config.upstream_backoff, self.config.redirect_allow
            )
            if self.fills is None:
                self.fills = Fills(self.store, self.upstream)
            else:
                self.fills.store, self.fills.upstream = self.store, self.upstream
            if self.blobserver is not None:
                # blob bodies must come from the store the addon now answers from
                self.blobserver.use(self.store, self.fills)
            self.access = Access(self.upstream, self.store, self.config.auth_ttl, self.config.public_ttl,
                                 self.config.trust_clients_offline)
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Eager connections would reach upstream for every hit (and fail when it is down).
            log.info("regcache: setting connection_strategy=lazy so cache hits open no upstream connection")
            ctx.options.update(connection_strategy="lazy")
        if "keep_host_header" in updated and not ctx.options.keep_host_header:
            # Otherwise mitmproxy replaces a mirror client's Host before any hook sees it, and the
            # DNS way in (quay.io pointed at the cache) could not tell quay.io from Docker Hub.
            # requestheaders puts back the Host mitmproxy would have sent.
            log.info("setting keep_host_header=true so mirror listeners see the registry a client names in Host")
            ctx.options.update(keep_host_header=True)

    async def running(self):
        if self.store is None:
            return  # configure refused regcache_dir and logged it: mitmdump is exiting
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        if "keep_host_header" in ctx.options and not ctx.options.keep_host_header:
            ctx.options.update(keep_host_header=True)
        self.blobserver = BlobServer(self.store, self.fills, self.signer)
        fast_port = self.config.fastpath_port if self.config.fastpath != "off" else None
        try:
            await self.blobserver.start(self.config.fastpath_bind, fast_port)
        except OSError as e:
            where = f"{self.config.fastpath_bind or '*'}:{fast_port}"
            if self.config.explicit & {"fastpath_port", "fastpath_bind"}:
                # Asked for by name: an error during start-up makes mitmdump exit 1 (errorcheck).
                log.error("cannot listen on the fast path %s (fastpath_port/fastpath_bind in %s): %s",
                          where, ctx.options.regcache_config, e)
            else:
                log.warning("fast path disabled, cannot listen on its default port %s: %s", where, e)
            await self.blobserver.start(None, None)
        log.info(
            "regcache: cache %s, %s, in-band blob server 127.0.0.1:%d%s",
            self.store.directory,
            "OFFLINE (cache only)" if ctx.options.regcache_offline else "online",
            self.blobserver.inband_port,
            f", fast path port {self.blobserver.fastpath_port}" if self.blobserver.fastpath_port else "",
        )

    async def done(self):
        if self.blobserver:
            await self.blobserver.stop()
        if self.fills:
            self.fills.shutdown()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.store:
            self.store.close()

    # --- which connections to intercept ---------------------------------------------------

    def tls_clienthello(self, data):
        """Leave TLS of non-registry hosts alone: their own certificate reaches the client."""
        mode = data.context.client.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode):
            # A mirror listener answers for every name it is reached by (a registry pointed at
            # it by DNS, or its own name): never passed through. mitmproxy's certificate names
            # the client's SNI. With keep_host_header (see configure) mitmproxy no longer names
            # the listener's upstream in the upstream SNI; name it, as it would have.
            if data.context.server.sni is None and mode.scheme in _TLS_SCHEMES:
                data.context.server.sni = mode.address[0]
            return
        sni = data.client_hello.sni
        if sni is None:
            server = data.context.server.address
            sni = server[0] if server else None
        if sni and not self.config.is_registry_host(sni):
            data.ignore_connection = True

    # --- request routing ----------------------------------------------------------------

    def identify(self, flow: http.HTTPFlow) -> Identity | None:
        """Raises oci.ProtocolError when a mirror client names a host that is not a registry."""
        mode = flow.client_conn.proxy_mode
        path = flow.request.path.split("?", 1)[0]
        if isinstance(mode, mode_specs.ReverseMode):
            return self._identify_on_mirror(flow, mode, path)
        host = flow.request.pretty_host
        if isinstance(mode, mode_specs.TransparentMode):
            host = flow.client_conn.sni or host
        if not host or not self.config.is_registry_host(host):
            return None
        address = flow.server_conn.address[0] if isinstance(mode, mode_specs.TransparentMode) and flow.server_conn.address else None
        target = Target(host.lower(), flow.request.port, flow.request.scheme, address)
        own_endpoint = (target.scheme, target.port) == ("https", 443) or self.config.is_plain_http(host)
        return Identity(self.config.registry_for_host(host), target, path, cacheable=own_endpoint)

    def _identify_on_mirror(self, flow: http.HTTPFlow, mode: mode_specs.ReverseMode, path: str) -> Identity:
        """The registry is, in order: ?ns= (containerd), a path prefix (/v2/quay.io/...), a Host
        or SNI that names a registry (the DNS way in), else the listener's own upstream.

        ?ns= and prefixes name only registries of the configured list; a Host or SNI that names
        no registry is the cache's own name or address (the cache cannot know every name it
        is reached by), so the request is the listener's own upstream's.
        """
        default = self.config.registry_for_host(mode.address[0])
        # The registry the client's /v2/ ping (never prefixed) went to: its token is for that one.
        base = self._registry_named_by_host(flow) or default
        registry, forward_credentials = base, True
        ns = flow.request.query.get("ns")
        if ns is not None:
            if not self.config.is_listed_registry(ns):
                message = f"{ns[:100]!r} is not a registry this cache serves"
                raise oci.ProtocolError(404, "NAME_UNKNOWN", message, {"ns": ns[:256]})
            registry = self.config.registry_for_host(ns)
        else:
            m = _PREFIXED.match(path)
            if m and self.config.is_listed_registry(m.group("registry")):
                registry = self.config.registry_for_host(m.group("registry"))
                path = "/v2/" + m.group("rest")
                forward_credentials = registry == base
        if registry == default:
            target = Target(mode.address[0], mode.address[1], "https" if mode.scheme in _TLS_SCHEMES else "http")
        else:
            # The registry's real API host, as the cache host's own DNS resolves it.
            api = oci.api_host(registry)
            name, _, port = api.rpartition(":")
            target = Target(name, int(port)) if name and port.isdigit() else Target(api)
        return Identity(registry, target, path, forward_credentials=forward_credentials)

    def _registry_named_by_host(self, flow: http.HTTPFlow) -> str | None:
        """The registry a mirror client named by Host (or SNI): the hosts file or DNS of the
        client pointed that registry's name at the cache. None for any other name."""
        host_header = flow.metadata.get(CLIENT_HOST, flow.request.host_header)
        names = []
        if host_header:
            try:
                names.append(url.parse_authority(host_header, check=False)[0])
            except ValueError:
                pass
        names.append(flow.client_conn.sni)
        for name in names:
            if name and self.config.is_listed_registry(name):
                return self.config.registry_for_host(name)
        return None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode):
            # keep_host_header is on (see configure): keep the client's Host for identify, and
            # send upstream the Host mitmproxy sends without keep_host_header.
            flow.metadata[CLIENT_HOST] = flow.request.host_header
            scheme = "https" if mode.scheme in _TLS_SCHEMES else "http"
            flow.request.host_header = url.hostport(scheme, mode.address[0], mode.address[1])
        # Pushes and other large uploads stream through instead of being buffered.
        if flow.request.method in ("PUT", "PATCH", "POST"):
            flow.request.stream = True

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self.store is None:
            return
        if self._is_fastpath_request(flow):
            self._route_to_blobserver(flow, None)
            return
        try:
            ident = self.identify(flow)
        except oci.ProtocolError as e:
            self._answer_error(flow, e.status, e.code, e.message, e.detail)
            log.warning("refused %s %s: %s", flow.request.method, flow.request.path[:200], e.message)
            return
        if ident is None or not ident.path.startswith("/v2"):
            return
        if not ident.cacheable:
            # e.g. http://quay.io/... or quay.io:9999 through the proxy: what that endpoint says is
            # this client's business alone; it passes through and never touches the shared cache.
            log.info("regcache: passing %s through uncached: not the registry's HTTPS endpoint", flow.request.pretty_url[:200])
            if ctx.options.regcache_offline:
                self._answer_error(flow, 503, "UNAVAILABLE", "regcache is offline and does not forward requests")
            return
        flow.metadata["regcache"] = (ident, None)
        if ident.path in ("/v2", "/v2/") and flow.request.method in ("GET", "HEAD"):
            await self._ping(flow, ident)
            return
        try:
            route = oci.parse_route(ident.registry, ident.path)
        except oci.ProtocolError as e:
            self._answer_error(flow, e.status, e.code, e.message, e.detail)
            log.warning("regcache: rejected %s %s%s: %s", flow.request.method, ident.registry, ident.path[:200], e.message)
            return
        if route is None or flow.request.method not in ("GET", "HEAD"):
            self._retarget(flow, ident)
            return
        flow.metadata["regcache"] = (ident, route)
        try:
            if route.kind == oci.BLOB:
                await self._blob(flow, ident, route)
            else:
                await self._manifest(flow, ident, route)
        except Exception as e:  # noqa: BLE001 - never let a cache bug break a pull
            log.exception("regcache: internal error on %s %s", flow.request.method, flow.request.pretty_url)
            self._answer_error(flow, 500, "UNKNOWN", f"regcache internal error: {e.__class__.__name__}")

    async def _ping(self, flow: http.HTTPFlow, ident: Identity) -> None:
        """The /v2/ version check every client starts with.

        Relayed from upstream (its 401 starts the client's token flow); answered by regcache
        itself when offline or when upstream is unreachable, so cached images stay pullable.
        """
        anonymous = "authorization" not in flow.request.headers and flow.request.method == "GET"
        cached = self.ping_cache.get(ident.target) if anonymous else None
        if not ctx.options.regcache_offline and cached and time.monotonic() - cached[0] <= self.config.tag_ttl:
            # A warm pull within the tag TTL opens no upstream connection. Only an open
            # registry's 200 is kept: it is also what regcache answers when upstream is down,
            # whereas a kept 401 would send clients to a token service that may be down too.
            self._relay(flow, *cached[1:])
            return
        if not ctx.options.regcache_offline:
            try:
                status, headers, body = await self._upstream_call(ident.target, self._fetch, flow.request.method, ident.target, "/v2/", _header_list(flow))
            except (UpstreamUnavailable, ValueError) as e:
                log.warning("regcache: %s unreachable (%s); answering /v2/ from the cache", ident.target.host, e)
            else:
                if status < 500 and status != 429:
                    if anonymous and status == 200:
                        self.ping_cache[ident.target] = (time.monotonic(), status, headers, body)
                    self._relay(flow, status, headers, body)
                    return
        self._answer(flow, 200, b"{}", [("Content-Type", "application/json")])

    def _retarget(self, flow: http.HTTPFlow, ident: Identity) -> None:
        """Pass a request through; in mirror mode send it to the registry it is for."""
        if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            if ctx.options.regcache_offline:
                self._answer_error(flow, 503, "UNAVAILABLE", "regcache is offline and does not forward requests")
                return
            target = ident.target
            if not ident.forward_credentials:
                flow.request.headers.pop("authorization", None)
            flow.request.scheme, flow.request.host, flow.request.port = target.scheme, target.host, target.port
            flow.request.headers["host"] = target.host
            if ident.path != flow.request.path.split("?", 1)[0]:
                query = flow.request.path.partition("?")[2]
                flow.request.path = ident.path + ("?" + query if query else "")
        elif ctx.options.regcache_offline and flow.request.path.startswith("/v2"):
            self._answer_error(flow, 503, "UNAVAILABLE", "regcache is offline and does not forward requests")

    # --- answers -------------------------------------------------------------------------

    def _answer(self, flow, status: int, body: bytes, headers: list[tuple[str, str]], cache_status: str | None = None) -> None:
        hdrs = list(headers) + [API_VERSION]
        if cache_status:
            hdrs.append(("X-Cache", cache_status))
        flow.response = http.Response.make(status, body, [(k.encode(), v.encode()) for k, v in hdrs])

    def _answer_error(self, flow, status: int, code: str, message: str, detail=None, extra=()) -> None:
        self._answer(flow, status, oci.error_body(code, message, detail), [("Content-Type", "application/json"), *extra])

    def _relay(self, flow, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Answer exactly as upstream did (401 with its WWW-Authenticate, 404, 429...)."""
        keep = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")]
        self._answer(flow, status, body, keep)

    # --- blobs -------------------------------------------------------------------------------

    async def _blob(self, flow: http.HTTPFlow, ident: Identity, route: oci.Route) -> None:
        digest = str(route.digest)
        if flow.request.method == "HEAD":
            size = self.store.blob_size(digest)
            if size is not None:
                if not await self._may_serve(flow, ident, route, digest):
                    return
                self._answer_head(flow, size, digest)
                self._log(flow, ident, route, "HIT", 0)
            elif ctx.options.regcache_offline:
                self._answer_error(flow, 404, "BLOB_UNKNOWN", "blob unknown to the cache (offline)", {"digest": digest})
                self._log(flow, ident, route, "UNKNOWN", 0)
            else:
                await self._blob_head_miss(flow, ident, route)
            return
        if self.store.has_blob(digest):
            if await self._may_serve(flow, ident, route, digest):
                self._serve_blob(flow, ident, route, "HIT")
            return
        if ctx.options.regcache_offline:
            self._answer_error(flow, 404, "BLOB_UNKNOWN", "blob unknown to the cache (offline)", {"digest": digest})
            self._log(flow, ident, route, "UNKNOWN", 0)
            return
        fill = self.fills.get(digest)
        leader = fill is None or (fill.done and not fill.ok)
        if leader:
            headers = [h for h in _header_list(flow) if h[0].lower() != "range"]
            fill = self.fills.start(route.digest, ident.registry, route.name, ident.target, f"/v2/{route.name}/blobs/{digest}", headers)
        await fill.headers_ready.wait()
        if fill.no_room:
            # Caching is impossible right now; the pull must still work: straight upstream.
            log.warning("regcache: passing %s/%s blob %s through uncached: cache disk full", ident.registry, route.name, digest)
            self._retarget(flow, ident)
            self._log(flow, ident, route, "UNCACHED", None)
            return
        if fill.status != 200:
            if fill.status in (401, 403) and not leader:
                # The leader's credentials were refused; this client may hold better ones.
                fill = self.fills.start(route.digest, ident.registry, route.name, ident.target, f"/v2/{route.name}/blobs/{digest}", [h for h in _header_list(flow) if h[0].lower() != "range"])
                await fill.headers_ready.wait()
            if fill.status != 200:
                self._blob_fill_failed(flow, ident, route, fill)
                return
        if leader:
            # Upstream served this digest under this repository: it holds it.
            self.store.add_members(ident.registry, route.name, [digest])
            self.store.log_miss({"registry": ident.registry, "repo": route.name, "reference": digest, "digest": digest, "kind": "blob", "media_type": fill.content_type, "size": fill.size, "outcome": "MISS"})
            self._probe_public_later(ident, route)
        elif not await self._may_serve(flow, ident, route, digest):
            return  # a follower rides on another client's download only with its own access
        self._serve_blob(flow, ident, route, "MISS")

    async def _blob_head_miss(self, flow, ident: Identity, route: oci.Route) -> None:
        """A HEAD miss goes upstream as a HEAD (never a GET), through regcache's own client so
        a dead upstream gets a fast OCI error and its back-off applies."""
        path = f"/v2/{route.name}/blobs/{route.digest}"
        try:
            status, up_headers, _ = await self._upstream_call(ident.target, self._fetch, "HEAD", ident.target, path, _header_list(flow, ("authorization", "user-agent")))
        except (UpstreamUnavailable, ValueError) as e:
            self._answer_error(flow, 503, "UNAVAILABLE", f"upstream unavailable and blob not cached: {e}", {"digest": str(route.digest)})
            self._log(flow, ident, route, "UNAVAILABLE", None)
            return
        if status == 200:
            self.store.add_members(ident.registry, route.name, [str(route.digest)])
        keep = [(k, v) for k, v in up_headers if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "etag", "accept-ranges")]
        self._answer(flow, status, b"", keep, "MISS" if status == 200 else None)
        length = next((v for k, v in up_headers if k.lower() == "content-length"), None)
        if length is not None:
            flow.response.headers["content-length"] = length
        self._log(flow, ident, route, "MISS" if status == 200 else f"UPSTREAM_{status}", None)

    def _blob_fill_failed(self, flow, ident, route, fill) -> None:
        if fill.upstream_headers:
            self._relay(flow, fill.status, fill.upstream_headers, fill.error_body)
        elif fill.status == 502:
            self._answer_error(flow, 503, "UNAVAILABLE", f"upstream {ident.target.host} unavailable and blob not cached", {"digest": str(route.digest)})
        else:
            self._answer_error(flow, 500, "UNKNOWN", f"blob fetch failed: {fill.failure}")
        log.warning("regcache: blob %s %s/%s not served: %s", route.digest, ident.registry, route.name, fill.failure)

    def _answer_head(self, flow, size: int, digest: str) -> None:
        self._answer(flow, 200, b"", [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", digest), ("Accept-Ranges", "bytes")], "HIT")
        flow.response.headers["content-length"] = str(size)

    def _serve_blob(self, flow, ident, route, cache_status: str) -> None:
        digest = str(route.digest)
        if self._use_fastpath(flow, ident, route):
            host = self.config.fastpath_host or self._local_address_for(flow)
            netloc = f"[{host}]" if ":" in host else host
            signed = self.signer.sign(digest, flow.client_conn.peername[0])  # good for this client only
            location = f"http://{netloc}:{self.blobserver.fastpath_port}{signed}"
            self._answer(flow, 307, b"", [("Location", location), ("Docker-Content-Digest", digest)], cache_status)
            self._log(flow, ident, route, cache_status, None, "fastpath")
        else:
            self._route_to_blobserver(flow, Ticket(digest, cache_status, flow.request.headers.get("range")))
            self._log(flow, ident, route, cache_status, None, "inband")

    def _local_address_for(self, flow) -> str:
        """The address of ours the client reaches us by.

        In transparent mode the socket's own address is the original destination (the
        registry's), so ask the routing table which local address faces the client.
        """
        if not isinstance(flow.client_conn.proxy_mode, mode_specs.TransparentMode):
            return flow.client_conn.sockname[0]
        peer = flow.client_conn.peername[0]
        family = socket.AF_INET6 if ":" in peer else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))  # UDP connect sends nothing; it only picks the route
            return s.getsockname()[0]

    def _use_fastpath(self, flow, ident: Identity, route: oci.Route) -> bool:
        if self.config.fastpath == "off" or not (self.blobserver and self.blobserver.fastpath_port):
            return False
        if not self.config.fastpath_private and not self.access.known_public(ident.registry, route.name)[0]:
            return False
        if self.config.fastpath == "always":
            return True
        # auto: only where the client reaches regcache directly, not through HTTPS_PROXY
        return isinstance(flow.client_conn.proxy_mode, (mode_specs.TransparentMode, mode_specs.ReverseMode))

    def _is_fastpath_request(self, flow) -> bool:
        """A fast-path redirect that came back through the proxy (client without NO_PROXY)."""
        return bool(
            self.blobserver
            and self.blobserver.fastpath_port
            and flow.request.scheme == "http"
            and flow.request.port == self.blobserver.fastpath_port
            and flow.request.path.startswith(FASTPATH_PREFIX)
        )

    def _route_to_blobserver(self, flow, ticket: Ticket | None) -> None:
        """Let the blob server answer the flow: a ticket, or (None) the flow's fast-path URL."""
        if ticket is None:
            # The blob server would see our loopback address, not the client's: check the URL
            # against the client it was issued to here and hand over a one-use ticket instead.
            client = flow.client_conn.peername[0]
            digest, why = self.signer.verify(flow.request.path, client)
            if digest is None:
                log.warning("refused fast-path request from %s through the proxy: %s", client, why)
                self._answer_error(flow, 403, "DENIED", why)
                return
            ticket = Ticket(digest, "HIT", flow.request.headers.get("range"))
            log.info("regcache: fast-path URL for %s came back through the proxy from %s; served in-band", digest, client)
        flow.request.path = self.blobserver.issue(ticket)
        flow.request.scheme = "http"
        flow.request.host = "127.0.0.1"
        flow.request.port = self.blobserver.inband_port
        flow.request.headers.pop("authorization", None)
        flow.metadata["regcache.blobserver"] = True
        if flow.server_conn.via is not None:
            flow.server_conn.via = None  # the loopback hop never goes through an upstream proxy

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Everything regcache does not answer itself streams through unbuffered: blob bodies
        # from the blob server, and pass-through traffic (HEAD misses, pushes, tokens).
        # regcache fetches the manifests it caches itself, so it never needs a body here.
        flow.response.stream = True

    # --- manifests ------------------------------------------------------------------------------

    async def _manifest(self, flow: http.HTTPFlow, ident: Identity, route: oci.Route) -> None:
        accepted = oci.accepted_media_types(flow.request.headers.get_all("accept"))
        offline = ctx.options.regcache_offline
        if route.digest is not None:
            manifest = self.store.get_manifest(route.reference)
            if manifest is not None:
                if not await self._may_serve(flow, ident, route, manifest.digest):
                    return
                self._answer_manifest(flow, manifest, "HIT")
                self._log(flow, ident, route, "HIT", len(manifest.body))
            elif offline:
                self._answer_error(flow, 404, "MANIFEST_UNKNOWN", "manifest unknown to the cache (offline)", {"digest": route.reference})
                self._log(flow, ident, route, "UNKNOWN", 0)
            else:
                await self._manifest_miss(flow, ident, route, accepted)
            return
        entry = self.store.find_tag(ident.registry, route.name, route.reference, accepted)
        manifest = self.store.get_manifest(entry.digest) if entry else None
        if manifest is not None:
            age = time.time() - entry.checked_at
            if (offline or age <= self.config.tag_ttl) and not await self._may_serve(flow, ident, route, manifest.digest):
                return
            if offline:
                status = "HIT" if age <= self.config.tag_ttl else "STALE"
                self._answer_manifest(flow, manifest, status)
                self._log(flow, ident, route, status, len(manifest.body))
                return
            if age <= self.config.tag_ttl:
                self._answer_manifest(flow, manifest, "HIT")
                self._log(flow, ident, route, "HIT", len(manifest.body))
                return
            await self._revalidate(flow, ident, route, accepted, manifest)
            return
        if offline:
            self._answer_error(flow, 404, "MANIFEST_UNKNOWN", "manifest unknown to the cache (offline)", {"tag": route.reference})
            self._log(flow, ident, route, "UNKNOWN", 0)
            return
        await self._manifest_miss(flow, ident, route, accepted)

    def _answer_manifest(self, flow, manifest: Manifest, cache_status: str) -> None:
        headers = [("Content-Type", manifest.media_type), ("Docker-Content-Digest", manifest.digest)]
        if flow.request.method == "HEAD":
            self._answer(flow, 200, b"", headers, cache_status)
            flow.response.headers["content-length"] = str(len(manifest.body))
        else:
            self._answer(flow, 200, manifest.body, headers, cache_status)

    async def _upstream_call(self, target: Target, fn, *args):
        """Run a blocking upstream call in a worker, at most UPSTREAM_PER_ENDPOINT per endpoint."""
        endpoint = (target.host, target.port, target.connect_address)
        slots = self._endpoint_slots.get(endpoint)
        if slots is None:
            if len(self._endpoint_slots) > 4096:  # endpoints are client-chosen: forget idle ones
                self._endpoint_slots = {k: v for k, v in self._endpoint_slots.items() if v.locked()}
            slots = self._endpoint_slots[endpoint] = asyncio.Semaphore(UPSTREAM_PER_ENDPOINT)
        async with slots:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _single_flight(self, key: tuple, target: Target, fn, *args):
        """Run fn once for concurrent callers with the same key; all get its result."""
        future = self.manifest_flights.get(key)
        if future is not None:
            return await asyncio.shield(future), False
        future = asyncio.get_running_loop().create_future()
        self.manifest_flights[key] = future
        try:
            result = await self._upstream_call(target, fn, *args)
            future.set_result(result)
            return result, True
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved
            raise
        finally:
            del self.manifest_flights[key]

    def _fetch(self, method: str, target: Target, path: str, headers) -> tuple[int, list, bytes]:
        """Blocking: one small upstream request (manifest, ping); (status, headers, body)."""
        resp = self.upstream.request(method, target, path, headers)
        try:
            limit = oci.MAX_MANIFEST_BYTES if resp.status == 200 else MAX_ERROR_BODY
            body = b"" if method == "HEAD" else resp.read_all(limit)
            return resp.status, resp.headers, body
        finally:
            resp.close()

    async def _manifest_upstream(self, flow, ident: Identity, route: oci.Route, accepted, method: str):
        """One upstream manifest request shared by concurrent identical requests.

        Returns (status, headers, body, leader). A follower whose leader was refused (401/403)
        asks again with its own credentials. Raises UpstreamUnavailable/ValueError.
        """
        path = f"/v2/{route.name}/manifests/{route.reference}"
        headers = [h for h in _header_list(flow) if h[0].lower() != "range"]
        key = (method, ident.registry, route.name, route.reference, tuple(sorted(accepted or ())))
        (status, up_headers, body), leader = await self._single_flight(key, ident.target, self._fetch, method, ident.target, path, headers)
        shared_digest = _answered_digest(route, method, status, up_headers, body) if not leader else None
        if not leader and (status in (401, 403) or (status == 200 and shared_digest is None)):
            # The leader's credentials were refused (this client may hold better ones), or the
            # shared answer names no digest to check this client's access against: ask as itself.
            status, up_headers, body = await self._upstream_call(ident.target, self._fetch, method, ident.target, path, headers)
            leader = True  # this answer is the client's own
        elif not leader and status == 200:
            # Another client's answer: upstream says the repository holds it, but whether
            # *this* client may have it is decided as for a cache hit.
            self.store.add_members(ident.registry, route.name, [shared_digest])
            if not await self._may_serve(flow, ident, route, shared_digest):
                return None
        return status, up_headers, body, leader

    async def _manifest_miss(self, flow, ident: Identity, route: oci.Route, accepted) -> None:
        if flow.request.method == "HEAD":
            await self._manifest_head_miss(flow, ident, route, accepted)
            return
        try:
            answer = await self._manifest_upstream(flow, ident, route, accepted, "GET")
        except (UpstreamUnavailable, ValueError) as e:
            self._answer_error(flow, 503, "UNAVAILABLE", f"upstream unavailable and manifest not cached: {e}", {"reference": route.reference})
            log.warning("regcache: manifest %s/%s:%s not served: %s", ident.registry, route.name, route.reference, e)
            return
        if answer is None:
            return  # refused to this client
        status, up_headers, body, leader = answer
        if status != 200:
            self._relay(flow, status, up_headers, body)
            self._log(flow, ident, route, f"UPSTREAM_{status}", len(body))
            return
        header = dict((k.lower(), v) for k, v in up_headers)
        media_type = oci.manifest_media_type(body, header.get("content-type"))
        digest = oci.sha256_digest(body)
        claimed = header.get("docker-content-digest")
        if route.digest is not None and not route.digest.matches(body):
            self._answer_error(flow, 502, "MANIFEST_INVALID", "upstream manifest does not match its digest", {"digest": route.reference})
            log.warning("regcache: upstream sent a manifest for %s that hashes differently; not cached", route.reference)
            return
        if route.digest is not None:
            digest = route.reference
        elif claimed and claimed.startswith("sha256:") and claimed != digest:
            self._answer_error(flow, 502, "MANIFEST_INVALID", "upstream manifest does not match its Docker-Content-Digest")
            log.warning("regcache: manifest %s/%s:%s hashes to %s but upstream claims %s; not cached", ident.registry, route.name, route.reference, digest, claimed)
            return
        if leader:
            self._probe_public_later(ident, route)
            try:
                self.store.put_manifest(digest, media_type, body)
                self.store.learn_manifest(ident.registry, route.name, digest, body)
                if route.is_tag:
                    self.store.set_tag(ident.registry, route.name, route.reference, media_type, digest)
            except Exception as e:  # noqa: BLE001 - a full disk must not fail the pull
                log.warning("regcache: manifest %s of %s/%s served but not stored: %s", digest, ident.registry, route.name, e)
            self.store.log_miss({"registry": ident.registry, "repo": route.name, "reference": route.reference, "digest": digest, "kind": "manifest", "media_type": media_type, "size": len(body), "outcome": "MISS"})
        self._answer_manifest(flow, Manifest(digest, media_type, body), "MISS")
        self._log(flow, ident, route, "MISS", len(body))

    async def _manifest_head_miss(self, flow, ident: Identity, route: oci.Route, accepted) -> None:
        """A HEAD stays a HEAD upstream (free of Docker Hub's pull limit); its answer still
        teaches the tag's digest, so the GET by digest that follows completes the entry."""
        try:
            answer = await self._manifest_upstream(flow, ident, route, accepted, "HEAD")
        except (UpstreamUnavailable, ValueError) as e:
            self._answer_error(flow, 503, "UNAVAILABLE", f"upstream unavailable and manifest not cached: {e}", {"reference": route.reference})
            return
        if answer is None:
            return  # refused to this client
        status, up_headers, _, _ = answer
        header = {k.lower(): v for k, v in up_headers}
        digest, content_type = header.get("docker-content-digest"), header.get("content-type")
        if status == 200 and oci.valid_digest(digest):
            self.store.add_members(ident.registry, route.name, [digest])
        if status == 200 and route.is_tag and digest and content_type:
            try:
                media_type = oci.manifest_media_type(b"", content_type)
                if oci.client_accepts(media_type, accepted):
                    self.store.set_tag(ident.registry, route.name, route.reference, media_type, oci.parse_digest(digest).__str__())
            except (oci.ProtocolError, Exception) as e:  # noqa: BLE001
                log.warning("regcache: tag %s/%s:%s not recorded: %s", ident.registry, route.name, route.reference, e)
        keep = [(k, v) for k, v in up_headers if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "etag")]
        self._answer(flow, status, b"", keep, "MISS" if status == 200 else None)
        if "content-length" in header:
            flow.response.headers["content-length"] = header["content-length"]
        self._log(flow, ident, route, "MISS" if status == 200 else f"UPSTREAM_{status}", None)

    async def _revalidate(self, flow, ident: Identity, route: oci.Route, accepted, cached: Manifest) -> None:
        """A tag past its TTL: HEAD upstream (free of Docker Hub's pull limit) and compare digests."""
        try:
            answer = await self._manifest_upstream(flow, ident, route, accepted, "HEAD")
        except (UpstreamUnavailable, ValueError) as e:
            await self._serve_stale(flow, ident, route, cached, str(e))
            return
        if answer is None:
            return  # refused to this client
        status, up_headers, _, _ = answer
        if status == 200:
            header = dict((k.lower(), v) for k, v in up_headers)
            if header.get("docker-content-digest") == cached.digest:
                self.store.set_tag(ident.registry, route.name, route.reference, cached.media_type, cached.digest)
                self._answer_manifest(flow, cached, "REVALIDATED")
                self._log(flow, ident, route, "REVALIDATED", len(cached.body))
                return
            await self._manifest_miss(flow, ident, route, accepted)
            return
        if status >= 500 or status == 429:
            await self._serve_stale(flow, ident, route, cached, f"upstream answered {status}")
            return
        # 401/403/404: the client hears what upstream said (its token flow, or a deleted tag).
        self._relay(flow, status, up_headers, b"")
        if flow.request.method == "GET" and status in (401, 403, 404):
            body = oci.error_body({401: "UNAUTHORIZED", 403: "DENIED", 404: "MANIFEST_UNKNOWN"}[status], f"upstream answered {status}")
            flow.response.content = body
            flow.response.headers["content-type"] = "application/json"
        self._log(flow, ident, route, f"UPSTREAM_{status}", 0)

    async def _serve_stale(self, flow, ident, route, cached: Manifest, why: str) -> None:
        if not await self._may_serve(flow, ident, route, cached.digest):
            return
        self._answer_manifest(flow, cached, "STALE")
        flow.response.headers["Warning"] = '110 regcache "Response is stale"'
        log.warning("regcache: serving stale %s/%s:%s (%s): %s", ident.registry, route.name, route.reference, cached.digest, why)
        self._log(flow, ident, route, "STALE", len(cached.body))

    # --- access ---------------------------------------------------------------------------------

    async def _may_serve(self, flow, ident: Identity, route: oci.Route, digest: str) -> bool:
        """The one access rule (access.py) for every answer built from cached or shared bytes;
        a refusal is answered as upstream would answer this client."""
        kind = "blobs" if route.kind == oci.BLOB else "manifests"
        question = Question(ident.target, ident.registry, route.name, digest, f"/v2/{route.name}/{kind}/{digest}",
                            tuple(_header_list(flow, ("authorization", "accept"))))
        offline = ctx.options.regcache_offline
        # Known answers (a public repository that holds the digest, a remembered grant) cost no
        # thread hop: a hit never waits behind upstream I/O.
        verdict = self.access.decide_cached(question, offline)
        if verdict is None:
            verdict = await self._upstream_call(ident.target, self.access.decide, question, offline)
        if verdict.allow:
            return True
        if verdict.status == 404:
            code = "BLOB_UNKNOWN" if route.kind == oci.BLOB else "MANIFEST_UNKNOWN"
        else:
            code = {401: "UNAUTHORIZED", 403: "DENIED"}.get(verdict.status, "NAME_UNKNOWN")
        self._answer_error(flow, verdict.status, code, verdict.reason, {"digest": digest}, extra=verdict.headers or [])
        log.warning("regcache: not serving cached %s/%s %s to this client: %s", ident.registry, route.name, digest, verdict.reason)
        return False

    def _probe_public_later(self, ident: Identity, route: oci.Route) -> None:
        """Learn whether a repository is public while it is being cached, so later hits
        (and hits while upstream is down) need no upstream request to decide."""
        public, checked = self.access.known_public(ident.registry, route.name)
        if public is not None and time.time() - checked < self.access.public_ttl:
            return
        key = (ident.registry, route.name)
        if key in self._probing:
            return  # one probe per repository at a time, however many blobs miss at once
        self._probing.add(key)
        kind = "blobs" if route.kind == oci.BLOB else "manifests"
        path = f"/v2/{route.name}/{kind}/{route.reference}"

        def probe():
            try:
                self.access.probe_public(ident.target, ident.registry, route.name, path)
            except Exception as e:  # noqa: BLE001 - best effort; decide() probes again if needed
                log.debug("regcache: public probe of %s/%s failed: %s", ident.registry, route.name, e)
            finally:
                self._probing.discard(key)

        self.executor.submit(probe)

    # --- logging ---------------------------------------------------------------------------------

    def _log(self, flow, ident: Identity, route: oci.Route, outcome: str, size: int | None, via: str | None = None) -> None:
        log.info(
            "regcache: %s %s registry=%s repo=%s %s=%s outcome=%s%s%s",
            flow.request.method,
            route.kind,
            ident.registry,
            route.name,
            "digest" if route.digest else "tag",
            route.reference,
            outcome,
            f" bytes={size}" if size is not None else "",
            f" via={via}" if via else "",
        )
        self.monitor.record(flow, ident, route, outcome, size)


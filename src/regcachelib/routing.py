"""Which registry and repository a flow addresses, in every proxy mode: the Routing addon.

Its `request` hook turns a client's /v2 request into a `RegistryRequest` (request.py) stored
once in `flow.metadata[REQUEST]`, answers path errors and offline refusals, and sends what
regcache does not cache (pushes, tag lists, another endpoint of a registry) through to upstream
— in mirror mode to the registry it is for.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs

from . import oci
from .config import Config
from .request import FORWARDED, REQUEST, RegistryRequest
from .upstream import Target

log = logging.getLogger(__name__)

# A path-prefix mirror names the registry as the first path component: /v2/quay.io/org/img/...
_PREFIXED = re.compile(r"^/v2/(?P<registry>[^/]+\.[^/]+|[^/]+:\d+|localhost)/(?P<rest>.+)$")
# flow.metadata key: the Host a client sent to a mirror listener (mitmproxy rewrites the header).
CLIENT_HOST = "regcache.client_host"
TLS_SCHEMES = ("https", "tls", "http3", "quic", "dtls")
# Host names are client-chosen: what is remembered about them is bounded.
MAX_HOSTS = 4096


@functools.lru_cache(maxsize=4096)
def _parse_route(registry: str, path: str) -> oci.Route | None:
    # Pure, and asked again for every pull of the same image: parsed once per path.
    # (A malformed path raises every time: exceptions are not cached.)
    return oci.parse_route(registry, path)


@dataclass(frozen=True)
class _HostFacts:
    """What the config says about a host name, worked out once (the registries list is
    matched pattern by pattern)."""

    listed: bool  # a registry by the list and aliases alone
    registry_host: bool  # intercepted as a registry (intercept_all widens this one)
    registry: str  # its canonical registry name
    plain_http: bool  # its own endpoint is plain HTTP


@dataclass(frozen=True)
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


def answer(flow: http.HTTPFlow, status: int, body: bytes, headers, cache_status: str | None = None) -> None:
    """Set the flow's response: regcache's own answer, always with the registry API version."""
    hdrs = [*headers, ("Docker-Distribution-API-Version", "registry/2.0")]
    if cache_status:
        hdrs.append(("X-Cache", cache_status))
    flow.response = http.Response.make(status, body, [(k.encode(), v.encode()) for k, v in hdrs])


def answer_error(flow: http.HTTPFlow, error: oci.RegistryError) -> None:
    """The one translation of a RegistryError into a response."""
    answer(flow, error.status, error.body(), [("Content-Type", "application/json"), *error.headers])


def offline_refusal() -> oci.RegistryError:
    return oci.RegistryError.of("UNAVAILABLE", "regcache is offline and does not forward requests")


def pass_through(flow: http.HTTPFlow, ident: Identity | RegistryRequest, forward_credentials: bool,
                 offline: bool) -> None:
    """Let a request go to upstream as mitmproxy forwards it; in mirror mode to the registry it
    is for (the listener's own upstream may be another). Offline, refuse it instead."""
    if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
        if offline:
            answer_error(flow, offline_refusal())
            return
        target = ident.target
        if not forward_credentials:
            flow.request.headers.pop("authorization", None)
        flow.request.scheme, flow.request.host, flow.request.port = target.scheme, target.host, target.port
        flow.request.headers["host"] = target.host
        if ident.path != flow.request.path.split("?", 1)[0]:
            query = flow.request.path.partition("?")[2]
            flow.request.path = ident.path + ("?" + query if query else "")
    elif offline and flow.request.path.startswith("/v2"):
        answer_error(flow, offline_refusal())


class Routing:
    """Child addon of RegistryCache: which registry request a flow is, stored in its metadata."""

    def __init__(self, cache) -> None:
        self.cache = cache  # the parent: it knows the blob server's fast-path URLs
        self.config = Config()
        self._hosts: dict[str, _HostFacts] = {}
        self._authorities: dict[str, str | None] = {}  # Host header -> its host

    def use(self, services) -> None:
        self.config = services.config
        self._hosts = {}  # facts of the config in force only

    def _facts(self, host: str) -> _HostFacts:
        facts = self._hosts.get(host)
        if facts is None:
            config = self.config
            facts = _HostFacts(config.is_listed_registry(host), config.is_registry_host(host),
                               config.registry_for_host(host), config.is_plain_http(host))
            if len(self._hosts) >= MAX_HOSTS:
                self._hosts = {}
            self._hosts[host] = facts
        return facts

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if self.cache.is_fastpath_request(flow):
            return  # the blob addon's: a fast-path URL that came back through the proxy
        offline = ctx.options.regcache_offline
        try:
            ident = self.identify(flow)
        except oci.RegistryError as e:
            answer_error(flow, e)
            log.warning("refused %s %s: %s", flow.request.method, flow.request.path[:200], e.message)
            return
        if ident is None or not ident.path.startswith("/v2"):
            return
        if not ident.cacheable:
            # e.g. http://quay.io/... or quay.io:9999 through the proxy: what that endpoint says
            # is this client's business alone; it passes through and never touches the cache.
            log.info("passing %s through uncached: not the registry's HTTPS endpoint",
                     flow.request.pretty_url[:200])
            if offline:
                answer_error(flow, offline_refusal())
            return
        ping = ident.path in ("/v2", "/v2/") and flow.request.method in ("GET", "HEAD")
        route = None
        if not ping:
            try:
                route = _parse_route(ident.registry, ident.path)
            except oci.RegistryError as e:
                answer_error(flow, e)
                log.warning("rejected %s %s%s: %s", flow.request.method, ident.registry,
                            ident.path[:200], e.message)
                return
            if route is None or flow.request.method not in ("GET", "HEAD"):
                pass_through(flow, ident, ident.forward_credentials, offline)
                return
        flow.metadata[REQUEST] = self._request(flow, ident, route, offline)

    def _request(self, flow: http.HTTPFlow, ident: Identity, route: oci.Route | None, offline: bool):
        headers = [(k, v) for k, v in flow.request.headers.items(multi=True) if k.lower() in FORWARDED]
        if not ident.forward_credentials:
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        mode = flow.client_conn.proxy_mode
        return RegistryRequest(
            registry=ident.registry,
            target=ident.target,
            path=ident.path,
            method=flow.request.method,
            route=route,
            headers=tuple(headers),
            client=flow.client_conn.peername[0] if flow.client_conn.peername else "",
            offline=offline,
            direct=isinstance(mode, (mode_specs.TransparentMode, mode_specs.ReverseMode)),
            forward_credentials=ident.forward_credentials,
            plain_http=not flow.client_conn.tls_established,
        )

    # --- which registry -------------------------------------------------------------------------

    def identify(self, flow: http.HTTPFlow) -> Identity | None:
        """Raises RegistryError when a mirror client names a host that is not a registry."""
        mode = flow.client_conn.proxy_mode
        path = flow.request.path.split("?", 1)[0]
        if isinstance(mode, mode_specs.ReverseMode):
            return self._identify_on_mirror(flow, mode, path)
        host = flow.request.pretty_host
        if isinstance(mode, mode_specs.TransparentMode):
            host = flow.client_conn.sni or host
        facts = self._facts(host) if host else None
        if facts is None or not facts.registry_host:
            return None
        transparent = isinstance(mode, mode_specs.TransparentMode)
        address = flow.server_conn.address[0] if transparent and flow.server_conn.address else None
        target = Target(host.lower(), flow.request.port, flow.request.scheme, address)
        own_endpoint = (target.scheme, target.port) == ("https", 443) or facts.plain_http
        return Identity(facts.registry, target, path, cacheable=own_endpoint)

    def _identify_on_mirror(self, flow: http.HTTPFlow, mode: mode_specs.ReverseMode, path: str) -> Identity:
        """The registry is, in order: ?ns= (containerd), a path prefix (/v2/quay.io/...), a Host
        or SNI that names a registry (the DNS way in), else the listener's own upstream.

        ?ns= and prefixes name only registries of the configured list; a Host or SNI that names
        no registry is the cache's own name or address (the cache cannot know every name it
        is reached by), so the request is the listener's own upstream's.
        """
        default = self._facts(mode.address[0]).registry
        # The registry the client's /v2/ ping (never prefixed) went to: its token is for that one.
        base = self._registry_named_by_host(flow) or default
        registry, forward_credentials = base, True
        ns = flow.request.query.get("ns") if "?" in flow.request.path else None
        if ns is not None:
            facts = self._facts(ns)
            if not facts.listed:
                message = f"{ns[:100]!r} is not a registry this cache serves"
                raise oci.RegistryError.of("NAME_UNKNOWN", message, {"ns": ns[:256]})
            registry = facts.registry
        else:
            m = _PREFIXED.match(path)
            facts = self._facts(m.group("registry")) if m else None
            if facts is not None and facts.listed:
                registry = facts.registry
                path = "/v2/" + m.group("rest")
                forward_credentials = registry == base
        if registry == default:
            target = Target(mode.address[0], mode.address[1], "https" if mode.scheme in TLS_SCHEMES else "http")
        else:
            # The registry's real API host, as the cache host's own DNS resolves it.
            api = oci.api_host(registry)
            name, _, port = api.rpartition(":")
            target = Target(name, int(port)) if name and port.isdigit() else Target(api)
        return Identity(registry, target, path, forward_credentials=forward_credentials)

    def _registry_named_by_host(self, flow: http.HTTPFlow) -> str | None:
        """The registry a mirror client named by Host (or SNI): the hosts file or DNS of the
        client pointed that registry's name at the cache. None for any other name."""
        host_header = flow.metadata.get(CLIENT_HOST)
        if host_header is None:
            host_header = flow.request.host_header
        for name in (self._host_named_by(host_header) if host_header else None, flow.client_conn.sni):
            if name:
                facts = self._facts(name)
                if facts.listed:
                    return facts.registry
        return None

    def _host_named_by(self, host_header: str) -> str | None:
        """The host of a Host header (without its port), parsed once per distinct header."""
        try:
            return self._authorities[host_header]
        except KeyError:
            pass
        try:
            name = url.parse_authority(host_header, check=False)[0]
        except ValueError:
            name = None
        if len(self._authorities) >= MAX_HOSTS:
            self._authorities = {}
        self._authorities[host_header] = name
        return name

"""Which connections regcache intercepts, what streams through, and the Host a mirror client
sent: the Interception addon."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs

from .config import Config
from .routing import CLIENT_HOST, TLS_SCHEMES


class Interception:
    """Child addon of RegistryCache: which connections are intercepted, what streams, the Host
    a mirror client sent."""

    def __init__(self) -> None:
        self.config = Config()

    def use(self, services) -> None:
        self.config = services.config

    def tls_clienthello(self, data) -> None:
        """Leave TLS of non-registry hosts alone: their own certificate reaches the client."""
        mode = data.context.client.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode):
            # A mirror listener answers for every name it is reached by (a registry pointed at
            # it by DNS, or its own name): never passed through. mitmproxy's certificate names
            # the client's SNI. With keep_host_header (see RegistryCache) mitmproxy no longer
            # names the listener's upstream in the upstream SNI; name it, as it would have.
            if data.context.server.sni is None and mode.scheme in TLS_SCHEMES:
                data.context.server.sni = mode.address[0]
            return
        sni = data.client_hello.sni
        if sni is None:
            server = data.context.server.address
            sni = server[0] if server else None
        if sni and not self.config.is_registry_host(sni):
            data.ignore_connection = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode):
            # keep_host_header is on: keep the client's Host for routing, and send upstream the
            # Host mitmproxy sends without keep_host_header.
            flow.metadata[CLIENT_HOST] = flow.request.host_header
            scheme = "https" if mode.scheme in TLS_SCHEMES else "http"
            flow.request.host_header = url.hostport(scheme, mode.address[0], mode.address[1])
        # Pushes and other large uploads stream through instead of being buffered.
        if flow.request.method in ("PUT", "PATCH", "POST"):
            flow.request.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Everything regcache does not answer itself streams through unbuffered: blob bodies
        # from the blob server, and pass-through traffic (HEAD misses, pushes, tokens).
        # regcache fetches the manifests it caches itself, so it never needs a body here.
        flow.response.stream = True

"""The egress proxy for what mitmproxy relays itself: child addons of RegistryCache.

regcache's own upstream client goes through config.upstream_proxy (upstream.py). What mitmproxy
forwards without regcache answering -- pass-through requests (pushes, token fetches, uncached
endpoints), TLS it does not intercept (non-registry hosts in a CONNECT or transparent
connection) -- must leave the same way, or it would try the direct route the operator closed.

mitmproxy (tested with 11.0) lets an addon send a server connection through an HTTP
proxy by setting `server_conn.via` to ("http", (host, port)) before the connection opens. For
an HTTP flow that is done in `requestheaders`/`request`: the HTTP layer then puts an
HttpUpstreamProxy tunnel under it and CONNECTs (for plain HTTP too), and `http_connect_upstream`
lets the CONNECT carry Proxy-Authorization. A connection that is not HTTP to mitmproxy
(passed-through TLS, raw TCP) has no flow to carry `via`: EgressTunnel puts the same tunnel
layer above the layer mitmproxy chose for it in `next_layer` (HttpUpstreamProxy lives in a
private module of mitmproxy: an upgrade that moves it breaks the import, loudly, at start-up).

Not covered: `--mode upstream:` (mitmproxy's own; it already sends everything to its proxy),
UDP/QUIC (an HTTP proxy carries no datagrams). SOCKS, WireGuard and local listeners' non-HTTP
traffic is tunnelled like a transparent connection's (untested).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.layers import HttpLayer, UDPLayer
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy

from .config import Config
from .egress import EgressProxy

log = logging.getLogger(__name__)

BLOBSERVER = "regcache.blobserver"  # flow metadata set by RegistryCache.route_to_blobserver


def _via(proxy: EgressProxy) -> tuple[str, tuple[str, int]]:
    return "http", proxy.address


class EgressRoute:
    """Sends the HTTP flows mitmproxy forwards through the egress proxy (upstream_no_proxy's
    hosts and regcache's own blob server excepted)."""

    def __init__(self) -> None:
        self.config = Config()

    def use(self, services) -> None:
        self.config = services.config

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed upload connects right after its headers: decided here already.
        self._route(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        # Again after every other child: a mirror's pass-through may have changed the host.
        self._route(flow)

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        proxy = self.config.upstream_proxy
        if proxy is not None and proxy.authorization and not _upstream_mode(flow.client_conn):
            flow.request.headers["Proxy-Authorization"] = proxy.authorization

    def _route(self, flow: http.HTTPFlow) -> None:
        proxy = self.config.upstream_proxy
        if proxy is None or flow.response is not None or not flow.live or _upstream_mode(flow.client_conn):
            return
        if flow.metadata.get(BLOBSERVER):
            return  # route_to_blobserver sent it to 127.0.0.1 without a via
        if proxy.used_for(flow.request.host):
            flow.server_conn.via = _via(proxy)
        elif flow.server_conn.via == _via(proxy):
            flow.server_conn.via = None


class EgressTunnel:
    """Puts connections mitmproxy relays without HTTP (passed-through TLS, raw TCP) into a
    CONNECT tunnel through the egress proxy."""

    def __init__(self) -> None:
        self.config = Config()

    def use(self, services) -> None:
        self.config = services.config

    def next_layer(self, nextlayer) -> None:
        proxy = self.config.upstream_proxy
        if proxy is None:
            return
        context = nextlayer.context
        server = context.server
        if server.address is None or server.via is not None or server.timestamp_start is not None:
            return
        if not isinstance(context.client.proxy_mode, mode_specs.RegularMode | mode_specs.TransparentMode
                          | mode_specs.Socks5Mode | mode_specs.WireGuardMode | mode_specs.LocalMode):
            return  # a mirror's target is HTTP (EgressRoute); upstream mode is mitmproxy's own
        if server.transport_protocol != "tcp" or any(isinstance(layer, HttpUpstreamProxy) for layer in context.layers):
            return
        if not proxy.used_for(server.address[0]):
            return
        if nextlayer.layer is None:
            # Script addons see next_layer before mitmproxy's own NextLayer addon: let it choose
            # now (it leaves a layer already chosen alone when its turn comes).
            builtin = ctx.master.addons.get("nextlayer")
            if builtin is not None:
                builtin.next_layer(nextlayer)
        chosen = nextlayer.layer
        if chosen is None or isinstance(chosen, HttpLayer | UDPLayer | HttpUpstreamProxy):
            return  # undecided yet (more data needed); HTTP: per flow (EgressRoute); UDP: cannot
        server.via = _via(proxy)
        tunnel = HttpUpstreamProxy.make(context, True)[0]
        # The tunnel sits above the chosen layer: TLS layers find their neighbours by position.
        if chosen in context.layers:
            context.layers.remove(tunnel)
            context.layers.insert(context.layers.index(chosen), tunnel)
        tunnel.child_layer = chosen
        nextlayer.layer = tunnel
        log.debug("relaying %s:%d through the egress proxy %s", *server.address, proxy)


def _upstream_mode(client) -> bool:
    return isinstance(client.proxy_mode, mode_specs.UpstreamMode)

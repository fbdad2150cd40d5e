"""Where the proxy may connect: never into the cache host itself.

A forward proxy connects wherever its clients ask. Unchecked, that makes it a road into the
machine it runs on (services bound to 127.0.0.1, such as regcache's own status page) and to
link-local services (cloud metadata at 169.254.169.254). `DestinationPolicy`, a child addon
of RegistryCache, refuses by default connections to

    loopback      127.0.0.0/8, ::1
    link-local    169.254.0.0/16, fe80::/10
    unspecified   0.0.0.0/8, ::        (Linux connects these to the host itself)
    the cache host's own addresses (every address on its interfaces)

unless the config's `proxy_allow` lists them. Private networks (10/8 ...) are not refused:
registries on a company network are normal.

The decision is made on the address mitmproxy actually connects to (`server_connect`): a
name is resolved there, checked, and the connection pinned to the checked address, so a
name that resolves elsewhere a moment later (DNS rebinding) cannot slip through. That hook
covers every road: plain HTTP, CONNECT tunnels, TLS passed through untouched, websockets,
transparent mode. Client requests are also checked up front (`http_connect`,
`requestheaders`) so the client gets a 403 that says why, and so regcache's own upstream
client does not act on a request for a refused address either (names of the configured
registries are left to server_connect: see _lookup_needed).

Allowed without asking: regcache's own in-band blob server (127.0.0.1:<port>, where
RegistryCache routes blob requests), and the target a reverse (mirror) or upstream-proxy
listener was configured with — the operator chose it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import socket
import struct
import time

from mitmproxy import http
from mitmproxy.proxy import mode_specs

from . import oci

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# How long the list of the host's own addresses is trusted before it is read again
# (interfaces come and go: DHCP, VPNs, containers).
LOCAL_ADDRESSES_TTL = 10.0
_UNSPECIFIED_V4 = ipaddress.ip_network("0.0.0.0/8")


def classify(address: IPAddress, local: set[IPAddress] | frozenset[IPAddress]) -> str | None:
    """Why the proxy must not connect to this address by default, or None."""
    address = _unmapped(address)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or (isinstance(address, ipaddress.IPv4Address) and address in _UNSPECIFIED_V4):
        return "an unspecified address (the host itself)"
    if address in local:
        return "an address of the cache host itself"
    return None


def _netlink_addresses() -> set[IPAddress]:
    """Every address on this host's interfaces (in this network namespace), from the kernel.

    One RTM_GETADDR dump over rtnetlink: exact, IPv4 and IPv6, secondary addresses included,
    and it needs neither /proc nor the `ip` tool inside a slim container.
    """
    header, ifaddrmsg, rtattr = struct.Struct("=LHHLL"), struct.Struct("=BBBBI"), struct.Struct("=HH")
    rtm_newaddr, rtm_getaddr, nlmsg_error, nlmsg_done = 20, 22, 2, 3
    ifa_address, ifa_local = 1, 2
    request = header.pack(header.size + ifaddrmsg.size, rtm_getaddr, 0x1 | 0x300, 1, 0)  # NLM_F_REQUEST | NLM_F_DUMP
    request += ifaddrmsg.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    addresses: set[IPAddress] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:  # 0: NETLINK_ROUTE
        sock.settimeout(2.0)
        sock.bind((0, 0))
        sock.send(request)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + header.size <= len(data):
                length, kind = header.unpack_from(data, offset)[:2]
                if length < header.size:
                    raise OSError("malformed netlink message")
                if kind == nlmsg_done:
                    return addresses
                if kind == nlmsg_error:
                    raise OSError("netlink address dump failed")
                if kind == rtm_newaddr:
                    family = data[offset + header.size]
                    attributes: dict[int, bytes] = {}
                    position, end = offset + header.size + ifaddrmsg.size, offset + length
                    while position + rtattr.size <= end:
                        attr_length, attr_type = rtattr.unpack_from(data, position)
                        if attr_length < rtattr.size:
                            break
                        attributes[attr_type] = data[position + rtattr.size:position + attr_length]
                        position += (attr_length + 3) & ~3
                    # IFA_LOCAL is our end of a point-to-point link; IFA_ADDRESS otherwise
                    raw = attributes.get(ifa_local) or attributes.get(ifa_address)
                    if family in (socket.AF_INET, socket.AF_INET6) and raw and len(raw) in (4, 16):
                        addresses.add(ipaddress.ip_address(raw))
                offset += (length + 3) & ~3


def local_addresses() -> set[IPAddress]:
    try:
        return _netlink_addresses()
    except (OSError, AttributeError, ValueError) as e:  # AttributeError: no AF_NETLINK (not Linux)
        log.debug("interface addresses not readable over netlink (%s); using the host name's", e)
    found: set[IPAddress] = set()
    try:
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
            found.add(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
    except (OSError, ValueError):
        pass
    return found


class DestinationPolicy:
    """Child addon of RegistryCache: refuses proxy connections into the cache host."""

    def __init__(self, cache):
        self.cache = cache  # the RegistryCache: its config (proxy_allow) and its blob server
        self._local: frozenset[IPAddress] = frozenset()
        self._local_read_at = float("-inf")

    # --- mitmproxy events -------------------------------------------------------------------

    def configure(self, updated):
        self._local_read_at = float("-inf")  # re-read the interfaces on the next check

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await self._refuse_request(flow)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        # RegistryCache routes a fast-path redirect that came back through the proxy to its
        # blob server itself; its destination (our own address) is never connected to.
        if not self.cache.is_fastpath_request(flow):
            await self._refuse_request(flow)

    async def server_connect(self, data) -> None:
        server = data.server
        if server.address is None or self._exempt(data.client, server.address):
            return
        host, port = server.address
        if self._allowed_name(host, port):
            return
        try:
            addresses = await self._resolve(host, port, server.transport_protocol)
        except OSError as e:
            # Not left to the connect's own lookup: that one might answer differently.
            server.error = f"cannot resolve {host}: {e}"
            return
        reason = self._refusal(host, port, addresses)
        if reason is not None:
            server.error = f"regcache does not proxy there: {reason}"
            log.warning("refused a proxy connection from %s to %s: %s",
                        _peer(data.client), _hostport(host, port), reason)
            return
        if str(addresses[0]) != host:
            # Connect to exactly the address that was checked, not to a second lookup's answer
            # (DNS rebinding). The connection keeps the address: mitmproxy forbids changing it
            # once open, and a later request to the name simply opens (and checks) its own.
            server.address = (str(addresses[0]), port)

    # --- the policy --------------------------------------------------------------------------

    async def _refuse_request(self, flow: http.HTTPFlow) -> None:
        """Answer a client's request for a refused destination with a 403 before anything
        connects (mitmproxy to it, or regcache's own client for a registry request)."""
        if flow.response is not None or isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            return  # a mirror's destination is its configured target, not the client's choice
        host, port = flow.request.host, flow.request.port
        # No exemption for the in-band blob server here: only regcache's own routing (after
        # this hook) may send a flow there, never a client by asking for 127.0.0.1:<port>.
        if self._allowed_name(host, port):
            return
        if _literal(host) is None and not self._lookup_needed(host):
            return
        try:
            addresses = await self._resolve(host, port, "tcp")
        except OSError:
            return  # nothing to connect to; server_connect stops a lookup that answers later
        reason = self._refusal(host, port, addresses)
        if reason is None:
            return
        flow.request.stream = False  # a refused upload is answered, not streamed anywhere
        detail = {"host": host, "port": port}
        flow.response = http.Response.make(
            403,
            oci.error_body("DENIED", f"regcache does not proxy there: {reason}", detail),
            {"Content-Type": "application/json"},
        )
        log.warning("refused %s %s from %s: %s (proxy_allow in the config can allow it)",
                    flow.request.method, _hostport(host, port), _peer(flow.client_conn), reason)

    def _exempt(self, client, address: tuple[str, int]) -> bool:
        address = tuple(address)
        blobserver = self.cache.blobserver
        if blobserver is not None and blobserver.inband_port and address == ("127.0.0.1", blobserver.inband_port):
            return True  # regcache's own in-band blob server, where it routes blob requests
        proxy = self.cache.config.upstream_proxy
        if proxy is not None and address == proxy.address:
            return True  # the operator's egress proxy (upstream_proxy), wherever it listens
        mode = client.proxy_mode
        # The target a mirror or upstream-proxy listener was started with: the operator's choice.
        return isinstance(mode, (mode_specs.ReverseMode, mode_specs.UpstreamMode)) and address == tuple(mode.address)

    def _allowed_name(self, host: str, port: int) -> bool:
        return any(rule.allows_name(host, port) for rule in self.cache.config.proxy_allow)

    def _refusal(self, host: str, port: int, addresses: list[IPAddress]) -> str | None:
        """Why (host, port), resolving to addresses, is refused; None if it is not. A name
        with any refused address is refused: which of them a connection ends up on is not
        ours to predict."""
        local = self._local_addresses()
        for address in map(_unmapped, addresses):
            reason = classify(address, local)
            if reason and not any(rule.allows_address(address, port) for rule in self.cache.config.proxy_allow):
                named = "" if str(address) == host else f"{_hostport(host, port)}, "
                return f"{named}{address} is {reason}"
        return None

    def _lookup_needed(self, host: str) -> bool:
        """Whether a request's host name is resolved up front. The registries the operator
        configured are not: regcache answers most of their requests from the cache, and a
        lookup per cache hit costs time (and fails offline); server_connect still checks
        every connection made to them."""
        config = self.cache.config
        name = host.lower().rstrip(".")
        return not (name in config.aliases or any(fnmatch.fnmatchcase(name, p) for p in config.registries))

    def _local_addresses(self) -> frozenset[IPAddress]:
        now = time.monotonic()
        if now - self._local_read_at > LOCAL_ADDRESSES_TTL:
            self._local = frozenset(local_addresses())
            self._local_read_at = now
        return self._local

    @staticmethod
    async def _resolve(host: str, port: int, transport: str) -> list[IPAddress]:
        literal = _literal(host)
        if literal is not None:
            return [literal]
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise OSError(f"no address for {host}")
        return addresses


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0: the scope is not part of it
    except ValueError:
        return None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(client) -> str:
    return client.peername[0] if client.peername else "?"

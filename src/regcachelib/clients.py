"""Who may use the cache at all: the operator's allowlist of client networks.

A cache that listens on all interfaces answers anyone who can reach it — with the images it
holds, with its status page, and as a proxy. `client_networks` in the config limits every
listener (the proxy, mirror and transparent listeners mitmproxy runs, the fast-path port, the
metrics listener) to clients in the listed networks; an empty list (the default) allows all.
Loopback is always allowed: the cache host itself (and mitmproxy's own hop to the in-band blob
server) is the operator's.
"""

from __future__ import annotations

import ipaddress
import logging
import time

log = logging.getLogger(__name__)

# A refused client is logged once per address per this many seconds (scanners retry a lot).
LOG_EVERY = 60.0
_MAX_REMEMBERED = 4096


class ClientNetworks:
    """The allowlist itself: pure, shared by every listener."""

    def __init__(self, networks=()):
        self.networks = tuple(networks)
        self._logged: dict[str, float] = {}

    def allows(self, address: str | None) -> bool:
        if not self.networks:
            return True
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback or any(ip in network for network in self.networks)

    def refused(self, address: str | None, listener: str) -> None:
        """Log a refusal, at most once per address per LOG_EVERY seconds."""
        now = time.monotonic()
        key = address or "?"
        if now - self._logged.get(key, -LOG_EVERY) < LOG_EVERY:
            return
        if len(self._logged) >= _MAX_REMEMBERED:
            self._logged.clear()
        self._logged[key] = now
        log.warning("refused a connection from %s to the %s: not in client_networks", key, listener)


class ClientPolicy:
    """Child addon of RegistryCache: connections to mitmproxy's listeners from clients outside
    client_networks are closed before anything is read from them."""

    def __init__(self, cache):
        self.cache = cache  # the parent: its current config's client networks

    def client_connected(self, client) -> None:
        allowlist = self.cache.client_networks
        peer = client.peername[0] if client.peername else None
        if not allowlist.allows(peer):
            allowlist.refused(peer, "proxy")
            client.error = "not in client_networks"

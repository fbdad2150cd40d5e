"""The way out: an HTTP egress proxy for regcache's upstream connections (pure, no mitmproxy).

Where registries are reachable only through a corporate proxy, every connection regcache opens
upstream -- fills, probes, token fetches, revalidation, warm, blob redirects to a CDN -- goes
through it: HTTPS with CONNECT (the TLS session is still regcache's own, end to end with the
registry), plain HTTP in absolute form. upstream_no_proxy names the hosts reached directly.

Config (see README "Egress proxy")::

    upstream_proxy: http://proxy.corp:3128
    upstream_proxy_auth: {file: /etc/regcache/proxy-auth}   # or {env: REGCACHE_PROXY_AUTH}; "user:password"
    upstream_no_proxy: [registry.corp, .internal.example, 10.0.0.0/8]

The credentials are read once, when the config is loaded; they are kept out of every repr and
log line (they travel only in the Proxy-Authorization header to the proxy).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# What a proxy may send before the blank line that ends its answer to CONNECT.
MAX_CONNECT_RESPONSE = 16 * 1024


class EgressProxyError(OSError):
    """The egress proxy refused or failed a CONNECT (its status in .status, 0 when it sent none)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NoProxyRule:
    """One upstream_no_proxy entry: a network (matches literal addresses) or a domain (itself and
    every name below it, as curl reads NO_PROXY: `corp.example` and `.corp.example` alike)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    domain: str | None = None

    def matches(self, host: str) -> bool:
        host = host.lower().rstrip(".").strip("[]")
        if self.network is not None:
            try:
                return ipaddress.ip_address(host.split("%", 1)[0]) in self.network
            except ValueError:
                return False
        assert self.domain is not None
        return self.domain == "*" or host == self.domain or host.endswith("." + self.domain)


@dataclass(frozen=True)
class EgressProxy:
    host: str
    port: int
    # "Basic <base64>" for Proxy-Authorization, or None. Never in a repr or a log line.
    authorization: str | None = field(default=None, repr=False)
    no_proxy: tuple[NoProxyRule, ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def used_for(self, host: str) -> bool:
        """Whether a connection to host goes through the proxy: not for loopback (regcache's own
        blob server, a registry on the cache host), nor for a host upstream_no_proxy names."""
        name = host.lower().rstrip(".").strip("[]")
        if name == "localhost" or name.endswith(".localhost"):
            return False
        try:
            if ipaddress.ip_address(name.split("%", 1)[0]).is_loopback:
                return False
        except ValueError:
            pass
        return not any(rule.matches(name) for rule in self.no_proxy)

    def open_tunnel(self, host: str, port: int, timeout: float, attach=None) -> socket.socket:
        """A TCP connection to the proxy, CONNECTed to host:port (blocking).

        attach(sock) is called as soon as the socket exists (a deadline's watch). Raises
        EgressProxyError when the proxy cannot be reached or answers anything but 2xx."""
        try:
            sock = socket.create_connection(self.address, timeout)
        except OSError as e:
            raise EgressProxyError(f"egress proxy {self} unreachable: {e.__class__.__name__}: {e}") from e
        try:
            if attach is not None:
                attach(sock)
            name = host if host.isascii() else host.encode("idna").decode("ascii")
            authority = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
            head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            if self.authorization:
                head += f"Proxy-Authorization: {self.authorization}\r\n"
            sock.sendall((head + "\r\n").encode("ascii"))
            status, reason = _read_connect_response(sock, self)
            if not 200 <= status < 300:
                raise EgressProxyError(
                    f"egress proxy {self} refused CONNECT to {authority}: {status} {reason}{_hint(status)}", status)
            return sock
        except EgressProxyError:
            sock.close()
            raise
        except (OSError, UnicodeError) as e:
            sock.close()
            raise EgressProxyError(f"egress proxy {self}: CONNECT to {host}:{port} failed: "
                                   f"{e.__class__.__name__}: {e}") from e


def _hint(status: int) -> str:
    if status == 407:
        return " (the proxy wants credentials: upstream_proxy_auth)"
    if status == 403:
        return " (the proxy's access rules forbid it)"
    if status in (502, 503, 504):
        return " (the proxy could not reach it)"
    return ""


def _read_connect_response(sock: socket.socket, proxy: EgressProxy) -> tuple[int, str]:
    """The status of the proxy's answer to CONNECT; reads exactly up to its blank line, so
    nothing of the TLS handshake that follows is consumed."""
    data = b""
    while not data.endswith(b"\r\n\r\n") and not data.endswith(b"\n\n"):
        byte = sock.recv(1)  # byte by byte: a few dozen bytes, once per new connection
        if not byte:
            raise EgressProxyError(f"egress proxy {proxy} closed the connection during CONNECT")
        data += byte
        if len(data) > MAX_CONNECT_RESPONSE:
            raise EgressProxyError(f"egress proxy {proxy}: answer to CONNECT too long")
    status_line = data.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise EgressProxyError(f"egress proxy {proxy}: not an HTTP answer to CONNECT: {status_line[:100]!r}")
    return int(parts[1]), (parts[2] if len(parts) > 2 else "")


# --- config ---------------------------------------------------------------------------------------


def parse_proxy_url(value) -> tuple[str, int]:
    """'http://proxy.corp:3128' -> ('proxy.corp', 3128); port 80 when none is named."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a URL such as http://proxy.corp:3128")
    parts = urlsplit(value.strip())
    if parts.scheme != "http":
        raise ValueError(f"{value!r}: only http:// egress proxies are supported (CONNECT carries the TLS)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL (it is logged): use upstream_proxy_auth "
                         "with a file or an environment variable")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{value!r}: expected http://host:port, without a path")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{value!r}: invalid port") from None
    if not parts.hostname:
        raise ValueError(f"{value!r}: no host")
    return parts.hostname, port


def parse_proxy_auth(value) -> str:
    """{file: PATH} or {env: NAME} holding 'user:password' -> a Proxy-Authorization value."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("file", "env") \
            or not isinstance(next(iter(value.values())), str):
        raise ValueError("expected {file: /path/to/file} or {env: VARIABLE}, holding user:password")
    (kind, where), = value.items()
    if kind == "file":
        try:
            with open(where, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read {where}: {e.strerror}") from None
        source = where
    else:
        secret = os.environ.get(where, "").strip()
        if not secret:
            raise ValueError(f"environment variable {where} is not set")
        source = f"${where}"
    if ":" not in secret:
        raise ValueError(f"{source} must hold user:password")  # never the value itself
    return "Basic " + base64.b64encode(secret.encode()).decode()


def parse_no_proxy(value) -> tuple[NoProxyRule, ...]:
    """[registry.corp, .corp.example, 10.0.0.0/8, 192.168.1.5, '*']"""
    if not isinstance(value, list):
        raise ValueError("expected a list of host names, .domains or networks, e.g. [.corp.example, 10.0.0.0/8]")
    rules = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"expected a host name, .domain or network, got {item!r}")
        text = item.strip().lower().strip("[]")
        try:
            rules.append(NoProxyRule(network=ipaddress.ip_network(text, strict=False)))
            continue
        except ValueError:
            if "/" in text or ":" in text:
                raise ValueError(f"{item!r}: not a network such as 10.0.0.0/8") from None
        domain = text.lstrip("*").lstrip(".").rstrip(".") if text != "*" else "*"
        if not domain:
            raise ValueError(f"{item!r}: not a host name")
        rules.append(NoProxyRule(domain=domain))
    return tuple(rules)

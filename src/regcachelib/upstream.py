"""Talking to upstream registries: a small blocking HTTP/1.1 client run in worker threads.

Why our own client and not mitmproxy's forwarding: a blob fill must outlive the client that
started it (followers read the same download), must follow CDN redirects server-side without
carrying the registry's credentials along, and must hash off the event loop. A thread that
reads the socket, writes the staging file and hashes does all three; the socket read, the
file write and sha256 of large buffers all release the GIL.
"""

from __future__ import annotations

import base64
import heapq
import http.client
import ipaddress
import json
import logging
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

from .egress import EgressProxy, EgressProxyError

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# Hop-by-hop and transport headers never copied between connections.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "content-length"}
)


class UpstreamError(Exception):
    """An upstream exchange that gave no usable answer."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached (connect error, timeout, TLS failure) or is backed off."""


class UpstreamBodyTooLarge(UpstreamError):
    """Upstream sent a body larger than regcache accepts for it (a manifest, an error document)."""


class Deadline:
    """A point in time after which the sockets of one upstream exchange are shut down.

    Per-read socket timeouts never end an upstream that trickles a byte every few seconds;
    shutting the socket down from another thread ends any blocking read at once.
    """

    def __init__(self, at: float):
        self.at = at
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            socks, self._socks = self._socks, []
        for sock in socks:
            _shutdown(sock)

    def cancel(self) -> None:
        with self._lock:
            self._socks = []

    def detach(self, sock: socket.socket | None) -> None:
        """sock no longer belongs to this exchange (it went back to the pool)."""
        with self._lock:
            self._socks = [s for s in self._socks if s is not sock]

    def __lt__(self, other: "Deadline") -> bool:
        return self.at < other.at


def _shutdown(sock: socket.socket) -> None:
    try:
        # socket.socket's own shutdown, also for an SSLSocket: no TLS close_notify from
        # this thread while another may be inside a read.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """One thread that expires Deadlines (instead of a timer thread per request)."""

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> Deadline:
        deadline = Deadline(time.monotonic() + seconds)
        with self._cond:
            heapq.heappush(self._heap, deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="regcache-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return deadline

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                first = self._heap[0]
                delay = first.at - time.monotonic()
                if delay > 0:
                    self._cond.wait(min(delay, 1.0))
                    continue
                heapq.heappop(self._heap)
            first.expire()


WATCHDOG = Watchdog()


class RedirectRefused(UpstreamUnavailable):
    """A redirect regcache does not follow: to another host over plain HTTP, or to an address
    that is neither public nor in redirect_allow. The upstream itself is fine (no back-off)."""


def redirect_address_allowed(ip: str, allow) -> bool:
    """Whether a redirect may connect to ip: a public address, or one in the allowed networks."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    if any(address in network for network in allow):
        return True
    return address.is_global and not address.is_multicast


def _connect_allowed(host: str, port: int, timeout: float, allow) -> socket.socket:
    """Connect to host only at an address redirect_address_allowed accepts.

    Checked on the addresses actually connected to, not on the name: a name that resolves
    to a public address when looked at and to 127.0.0.1 a moment later (DNS rebinding) still
    never gets a connection to 127.0.0.1.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host}: {e}") from e
    allowed = [info for info in infos if redirect_address_allowed(info[4][0], allow)]
    if not allowed:
        addresses = ", ".join(sorted({info[4][0] for info in infos}))
        raise RedirectRefused(
            f"redirect to {host} refused: it resolves to {addresses}, not a public address (see redirect_allow)"
        )
    error: OSError | None = None
    for family, type_, proto, _, sockaddr in allowed:
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            if not redirect_address_allowed(sock.getpeername()[0], allow):
                raise RedirectRefused(f"redirect to {host} refused: connected to {sock.getpeername()[0]}")
            return sock
        except OSError as e:
            sock.close()
            error = e
        except RedirectRefused:
            sock.close()
            raise
    assert error is not None
    raise error


def _check_redirect_name(host: str, port: int, allow) -> None:
    """Through an egress proxy the proxy resolves and connects, so the address a redirect
    finally reaches is not regcache's to pin. A name that resolves here to a refused address
    is still refused; one that does not resolve here at all (only the proxy's DNS knows it) is
    left to the proxy's own access rules."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return
    refused = sorted({info[4][0] for info in infos if not redirect_address_allowed(info[4][0], allow)})
    if refused:
        raise RedirectRefused(
            f"redirect to {host} refused: it resolves to {', '.join(refused)}, "
            "not a public address (see redirect_allow)"
        )


@dataclass(frozen=True)
class Target:
    """Where a registry's API is: the name it answers to, and optionally where to connect.

    In transparent mode the name comes from SNI/Host while the address is the original
    destination of the redirected connection; elsewhere the name is resolved normally.
    """

    host: str
    port: int = 443
    scheme: str = "https"
    connect_address: str | None = None

    def url(self, path: str) -> str:
        default = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{path}"


@dataclass
class UpstreamResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    url: str  # final URL after redirects (never logged with its query: it may be signed)
    _conn: http.client.HTTPConnection | None = field(default=None, repr=False)
    _resp: http.client.HTTPResponse | None = field(default=None, repr=False)
    _sock: socket.socket | None = field(default=None, repr=False)
    _deadline: Deadline | None = field(default=None, repr=False)
    _pool: "_Pool | None" = field(default=None, repr=False)
    _pool_key: tuple | None = field(default=None, repr=False)
    # the Authorization the request carried (whose rate limit upstream's figures are); never logged
    sent_authorization: str | None = field(default=None, repr=False)

    def end_deadline(self) -> None:
        """The exchange's total deadline no longer applies (a long body with per-read timeouts)."""
        if self._deadline is not None:
            self._deadline.cancel()

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value and value.isascii() and value.isdigit() else None

    def read(self, n: int) -> bytes:
        assert self._resp is not None
        return self._resp.read(n)

    def read1(self, n: int) -> bytes:
        """Up to n bytes, returning as soon as any have arrived."""
        assert self._resp is not None
        return self._resp.read1(n)

    def more_ready(self) -> bool:
        """Whether the next read1 would return without waiting for the network (decrypted
        bytes inside TLS, or bytes in the socket). False when unsure."""
        sock = self._sock
        if sock is None or sock.fileno() < 0:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def read_all(self, limit: int) -> bytes:
        """The whole body, refusing more than limit bytes (manifests, error documents)."""
        assert self._resp is not None
        data = self._resp.read(limit + 1)
        if len(data) > limit:
            raise UpstreamBodyTooLarge(f"upstream body larger than {limit} bytes")
        return data

    def close(self) -> None:
        """Done with this response: its connection goes back to the pool when the body was
        read to its end and the server keeps it open; otherwise it is closed."""
        self.end_deadline()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pool is not None and self._pool_key is not None and self._resp is not None:
            self._pool.release(self._pool_key, conn, self._resp)
        else:
            conn.close()

    def discard(self) -> None:
        """Abandon the body (a failed fill, a client gone): the connection is closed, never reused."""
        self.end_deadline()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _reusable(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> bool:
    """Whether conn may carry another request: its response was read to the very end and
    neither side asked to close. A body left unread would be taken for the next response."""
    if not resp.isclosed() and (resp._method == "HEAD" or (not resp.chunked and resp.length == 0)):
        # Nothing left on the wire (a HEAD, a body read to its Content-Length by read1):
        # read() only marks the response complete.
        resp.read()
    if not resp.chunked and resp.length != 0:
        # read()/read1() also mark a response closed when the server ended it early (a body
        # shorter than its Content-Length): that connection is done for.
        return False
    return resp.isclosed() and not resp.will_close and conn.sock is not None


class _Pool:
    """Idle keep-alive connections per endpoint: a cold pull of many small layers reuses a
    handful of TCP+TLS connections instead of opening one per request.

    Keyed by everything that decided how a connection was made (scheme, host, port, fixed
    address, whether redirect_allow checked the address, TLS context). HTTP/1.1 keeps no
    authentication state on a connection -- credentials travel in each request's headers --
    so one pooled connection may serve requests made with different clients' credentials.
    """

    def __init__(self, per_key: int = 4, idle_timeout: float = 30.0):
        self.per_key = per_key
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple) -> http.client.HTTPConnection | None:
        """The most recently used live idle connection for key, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                since, conn = idle.pop()
                if not idle:
                    del self._idle[key]
            if time.monotonic() - since <= self.idle_timeout and _quiet(conn.sock):
                return conn
            conn.close()

    def release(self, key: tuple, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        try:
            reusable = _reusable(conn, resp)
        except (OSError, http.client.HTTPException):
            reusable = False
        if reusable:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if len(idle) < self.per_key:
                    idle.append((time.monotonic(), conn))
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                conn.close()


def _quiet(sock: socket.socket | None) -> bool:
    """An idle connection has nothing to read; readable means the server closed it (EOF) or
    sent something no request asked for: either way it cannot carry another request."""
    if sock is None or sock.fileno() < 0:
        return False
    try:
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


# Failures of a pooled connection the server had already closed, before any response byte:
# the request never reached it and is sent once more on a fresh connection.
_STALE = (ConnectionError, http.client.RemoteDisconnected, ssl.SSLEOFError, ssl.SSLZeroReturnError)
_IDEMPOTENT = frozenset({"GET", "HEAD"})


class _Connection(http.client.HTTPSConnection):
    """HTTPS to one name, optionally at a fixed address (transparent mode's original dst).

    With redirect_allow (a redirect to another host), only to addresses that rule allows.
    Through an egress proxy (via), a CONNECT tunnel to the name carries the TLS session.
    """

    def __init__(self, host, port, address, context, timeout, deadline: Deadline, redirect_allow=None,
                 via: EgressProxy | None = None):
        super().__init__(host, port, context=context, timeout=timeout)
        self._address = address
        self._context = context
        self._deadline = deadline
        self._redirect_allow = redirect_allow
        self._via = via

    def connect(self):
        if self._via is not None:
            if self._redirect_allow is not None:
                _check_redirect_name(self.host, self.port, self._redirect_allow)
            # By name, not the transparent-mode address: the proxy resolves (and its rules judge names).
            sock = self._via.open_tunnel(self.host, self.port, self.timeout, self._deadline.attach)
        elif self._redirect_allow is None:
            sock = socket.create_connection((self._address or self.host, self.port), self.timeout)
        else:
            sock = _connect_allowed(self._address or self.host, self.port, self.timeout, self._redirect_allow)
        self._deadline.attach(sock)  # the TLS handshake is inside the deadline too
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        # wrap_socket took over the descriptor (sock is detached now): the deadline must shut
        # down the TLS socket for the rest of the exchange.
        self._deadline.attach(self.sock)


class _PlainConnection(http.client.HTTPConnection):
    """Plain HTTP to host:port, or to the egress proxy (via) that takes absolute-form requests."""

    def __init__(self, host, port, timeout, deadline: Deadline, via: EgressProxy | None = None):
        super().__init__(*(via.address if via is not None else (host, port)), timeout=timeout)
        self._deadline = deadline
        self._via = via

    def connect(self):
        try:
            super().connect()
        except OSError as e:
            if self._via is None:
                raise
            raise EgressProxyError(f"egress proxy {self._via} unreachable: {e.__class__.__name__}: {e}") from e
        self._deadline.attach(self.sock)


class Upstream:
    """Blocking client for upstream registries, with a dead-upstream back-off."""

    def __init__(self, ssl_context: ssl.SSLContext, timeout: float = 30.0, backoff: float = 15.0, redirect_allow=None,
                 observe=None, proxy: EgressProxy | None = None):
        self.ssl_context = ssl_context
        self.proxy = proxy  # the egress proxy every connection goes through (but upstream_no_proxy's), or None
        # observe(target, seconds, response): told of every exchange up to its response headers;
        # response None when it failed (metrics.Monitor.observe_upstream).
        self.observe = observe
        # None: follow redirects anywhere (the operator's own `regcache warm`); a list of
        # networks: redirects to another host only over HTTPS to public addresses or these.
        self.redirect_allow = None if redirect_allow is None else tuple(redirect_allow)
        self.timeout = timeout  # per read, and for a whole exchange up to its response headers
        self.backoff = backoff
        # (scheme, host, port, address) of a registry's endpoint -> monotonic time it is retried
        self._down_until: dict[tuple, float] = {}
        self._lock = threading.Lock()
        # registry host -> hosts it redirected us to that then asked for a Bearer token
        # (registry.k8s.io -> *-docker.pkg.dev): the client's token was issued for them.
        self._challenge_hosts: dict[str, set[str]] = {}
        self._pool = _Pool()

    def close(self) -> None:
        """Close the idle pooled connections."""
        self._pool.close()

    # A dead upstream should not make every request wait for a connect timeout. The back-off
    # is kept per endpoint (scheme, host, port, address), for a registry's own endpoint only:
    # a client that names a wrong port or address backs off only that, not the registry.
    def is_backed_off(self, endpoint: tuple) -> bool:
        with self._lock:
            return self._down_until.get(endpoint, 0) > time.monotonic()

    def _mark(self, endpoint: tuple, ok: bool) -> None:
        with self._lock:
            if ok:
                self._down_until.pop(endpoint, None)
            else:
                self._down_until[endpoint] = time.monotonic() + self.backoff
                # Bounded: a client can make regcache try many endpoints.
                if len(self._down_until) > 1024:
                    now = time.monotonic()
                    for key in [k for k, until in self._down_until.items() if until <= now]:
                        del self._down_until[key]

    def backed_off(self) -> list[dict]:
        """The registry endpoints backed off right now, for the status page."""
        now = time.monotonic()
        with self._lock:
            down = [(k, until) for k, until in self._down_until.items() if until > now]
        return [{"scheme": scheme, "host": host, "port": port, "address": address,
                 "retry_in": round(until - now, 1)} for (scheme, host, port, address), until in sorted(down)]

    def request(
        self,
        method: str,
        target: Target,
        path: str,
        headers: list[tuple[str, str]],
        follow_redirects: bool = True,
    ) -> UpstreamResponse:
        """Send a request; follow redirects, dropping credentials when the host changes.

        The caller must read or close the returned response. The whole exchange, up to the
        response's end or its end_deadline(), must finish within the timeout.
        """
        deadline = WATCHDOG.start(self.timeout)
        started = time.monotonic()
        try:
            resp = self._request(method, target, path, headers, follow_redirects, deadline)
        except BaseException as e:
            deadline.cancel()
            if self.observe is not None and isinstance(e, UpstreamUnavailable):
                self.observe(target, time.monotonic() - started, None)
            raise
        resp._deadline = deadline
        resp.sent_authorization = next((v for k, v in headers if k.lower() == "authorization"), None)
        if self.observe is not None:
            self.observe(target, time.monotonic() - started, resp)
        return resp

    def _request(self, method, target: Target, path, headers, follow_redirects, deadline: Deadline) -> UpstreamResponse:
        url = target.url(path)
        origin_host = target.host
        address = target.connect_address
        origin_scheme = urlsplit(url).scheme
        origin_port = target.port
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            host = parts.hostname or ""
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise UpstreamUnavailable(f"invalid redirect target from {origin_host}") from None
            if parts.scheme not in ("http", "https") or not host:
                raise UpstreamUnavailable(f"invalid redirect target from {origin_host}")
            # The registry itself was chosen by configuration; where it redirects to was not.
            elsewhere = (host, parts.scheme, port) != (origin_host, origin_scheme, origin_port)
            checked = self.redirect_allow is not None and elsewhere
            if checked and parts.scheme != "https":
                log.warning("not following %s's redirect to %s: plain HTTP to another host", origin_host, host)
                raise RedirectRefused(f"{origin_host} redirected to plain-HTTP {host}; not followed")
            endpoint = (parts.scheme, host, port, address) if _hop == 0 else None
            if endpoint and self.is_backed_off(endpoint):
                raise UpstreamUnavailable(f"{host} is backed off after a recent failure")
            send_headers = [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]
            trusted = host == origin_host or host in self._challenge_hosts.get(origin_host, ())
            if not trusted or parts.scheme != origin_scheme:
                # Credentials are meant for the registry (and a host it delegates its token
                # challenge to) only; a CDN gets none of them.
                send_headers = [(k, v) for k, v in send_headers if k.lower() not in ("authorization", "cookie")]
            netloc = host if port in (80, 443) else f"{host}:{port}"
            send_headers.append(("Host", netloc))
            allow = self.redirect_allow if checked and parts.scheme == "https" else None
            via = self.proxy if self.proxy is not None and self.proxy.used_for(host) else None
            pool_key = (parts.scheme, host, port, address, allow is not None, id(self.ssl_context), via)
            req_path = parts.path + ("?" + parts.query if parts.query else "")
            if via is not None and parts.scheme == "http":
                # absolute form, the way a proxy takes plain HTTP; its credentials travel per request
                req_path = f"http://{netloc}{req_path or '/'}"
                if via.authorization:
                    send_headers.append(("Proxy-Authorization", via.authorization))
            conn = self._pool.take(pool_key) if method in _IDEMPOTENT else None
            while True:
                reused = conn is not None
                if conn is None:
                    if parts.scheme == "https":
                        conn = _Connection(host, port, address, self.ssl_context, self.timeout, deadline, allow, via)
                    else:
                        conn = _PlainConnection(address or host, port, self.timeout, deadline, via)
                else:
                    # A reused socket is inside this exchange's deadline like a new one.
                    conn._deadline = deadline
                    deadline.attach(conn.sock)
                try:
                    conn.putrequest(method, req_path or "/", skip_host=True, skip_accept_encoding=True)
                    for k, v in send_headers:
                        conn.putheader(k, v)
                    conn.endheaders()
                    sock = conn.sock  # getresponse() drops it from a connection that will close
                    resp = conn.getresponse()
                    break
                except RedirectRefused as e:
                    conn.close()
                    log.warning("not following %s's redirect: %s", origin_host, e)
                    raise
                except (OSError, http.client.HTTPException, ssl.SSLError) as e:
                    deadline.detach(conn.sock)
                    conn.close()
                    if reused and isinstance(e, _STALE) and not deadline.expired:
                        # The server closed the idle connection; the request never reached it.
                        log.debug("%s: pooled connection closed by the server (%s); reconnecting", host, e)
                        conn = None
                        continue
                    if isinstance(e, EgressProxyError):
                        # the route out failed, not (necessarily) the registry: say which
                        log.warning("%s:%d not reached: %s", host, port, e)
                        if endpoint and e.status not in (403, 407):
                            self._mark(endpoint, False)
                        if deadline.expired:
                            raise UpstreamUnavailable(f"{host}: no answer within {self.timeout:g}s ({e})") from e
                        raise UpstreamUnavailable(str(e)) from e
                    if endpoint:
                        self._mark(endpoint, False)
                    if deadline.expired:
                        raise UpstreamUnavailable(f"{host}: no answer within {self.timeout:g}s") from e
                    raise UpstreamUnavailable(f"{host}: {e.__class__.__name__}: {e}") from e
            if endpoint:
                self._mark(endpoint, True)
            challenged = parse_bearer_challenge(resp.getheader("www-authenticate"))
            if resp.status == 401 and host != origin_host and challenged:
                # The registry redirected us to a host that challenges for a token: clients
                # will present that host's token to the registry, so it may travel there.
                with self._lock:
                    self._challenge_hosts.setdefault(origin_host, set()).add(host)
            location = resp.getheader("location")
            if follow_redirects and resp.status in REDIRECTS and location:
                # Drained, the registry's connection can serve the next request; the next hop
                # (a CDN) is another pool key.
                try:
                    resp.read(64 * 1024)
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    raise UpstreamUnavailable(f"{host}: redirect body: {e.__class__.__name__}: {e}") from e
                deadline.detach(sock)
                self._pool.release(pool_key, conn, resp)
                url = urljoin(url, location)
                # The original destination address only applies to the registry's own name.
                if urlsplit(url).hostname != target.host:
                    address = None
                if resp.status == 303:
                    method = "GET"
                continue
            return UpstreamResponse(resp.status, resp.reason, resp.getheaders(), url, conn, resp, sock,
                                    _pool=self._pool, _pool_key=pool_key)
        raise UpstreamUnavailable(f"too many redirects from {target.host}")


# The most regcache reads of a small upstream answer: a manifest (the OCI spec's cap), an error.
MAX_SMALL_BODY = 4 * 1024 * 1024
MAX_ERROR_BODY = 64 * 1024


def fetch(upstream: Upstream, method: str, target: Target, path: str, headers) -> tuple[int, list, bytes]:
    """Blocking: one small upstream exchange (manifest, ping, HEAD); (status, headers, body).

    Raises UpstreamError."""
    resp = upstream.request(method, target, path, headers)
    try:
        limit = MAX_SMALL_BODY if resp.status == 200 else MAX_ERROR_BODY
        body = b"" if method == "HEAD" else resp.read_all(limit)
        return resp.status, resp.headers, body
    finally:
        resp.close()


def make_ssl_context(insecure: bool, ca_file: str | None, ca_path: str | None) -> ssl.SSLContext:
    """Upstream TLS trust, from the same mitmproxy options that govern its own connections."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file or ca_path:
        return ssl.create_default_context(cafile=ca_file or None, capath=ca_path or None)
    import certifi  # mitmproxy's own default trust store

    return ssl.create_default_context(cafile=certifi.where())


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str | None) -> dict[str, str] | None:
    """The parameters of a `WWW-Authenticate: Bearer realm=...,service=...,scope=...` header."""
    if not header or not header.lower().startswith("bearer "):
        return None
    return dict(_CHALLENGE_PARAM.findall(header[7:]))


def fetch_bearer_token(upstream: Upstream, challenge: str | None, repo: str,
                       credentials: tuple[str, str] | None = None, allow_http: bool = False) -> str | None:
    """Blocking: a pull token from the challenge's realm (docker token protocol), or None.

    Anonymous unless credentials are given: regcache never forwards a client's credentials
    to a token realm; only its own configured ones (warm) go there.
    """
    params = parse_bearer_challenge(challenge)
    if not params or "realm" not in params:
        return None
    realm = urlsplit(params["realm"])
    if realm.scheme not in (("https", "http") if allow_http else ("https",)) or not realm.hostname:
        return None
    query = {"scope": params.get("scope") or f"repository:{repo}:pull"}
    if "service" in params:
        query["service"] = params["service"]
    target = Target(realm.hostname, realm.port or (443 if realm.scheme == "https" else 80), realm.scheme)
    headers = []
    if credentials:
        basic = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        headers.append(("Authorization", "Basic " + basic))
    resp = upstream.request("GET", target, (realm.path or "/") + "?" + urlencode(query), headers)
    try:
        if resp.status != 200:
            return None
        doc = json.loads(resp.read_all(256 * 1024) or b"{}")
    except (ValueError, UpstreamBodyTooLarge):
        return None
    finally:
        resp.close()
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    return token or None

"""Serving blob bodies from disk with bounded memory.

mitmproxy cannot stream a response body from a file by itself (http.Response.make holds the
whole body in memory). So blob bodies come from this small HTTP/1.1 server inside the addon,
on the same event loop:

- in-band: the addon points a flow at 127.0.0.1:<port>/_regcache/t/<ticket> and mitmproxy
  streams the reply to the client;
- fast path: the addon answers the client with a 307 to /_regcache/blobs/<digest>?exp=&sig=
  on a port the client reaches directly; the body goes out with os.sendfile (zero-copy).

Both serve a stored blob or follow an in-flight fill, honouring a single Range.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from . import oci
from .fill import Fill, Fills
from .store import Store

log = logging.getLogger(__name__)

TICKET_PREFIX = "/_regcache/t/"
FASTPATH_PREFIX = "/_regcache/blobs/"
MAX_REQUEST_HEAD = 16 * 1024
TICKET_TTL = 60.0
# sendfile in slices so a slow client cannot pin a huge count on one call
SLICE = 8 * 1024 * 1024


@dataclass
class Ticket:
    """What the addon decided for one in-band blob GET."""

    digest: str
    cache_status: str  # HIT | MISS
    range_header: str | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)


class Signer:
    """Short-lived URLs for the fast path: HMAC-SHA256 over digest and expiry."""

    def __init__(self, key: bytes, ttl: float = 300.0):
        self.key = key
        self.ttl = ttl

    def _mac(self, digest: str, expires: int) -> str:
        return hmac.new(self.key, f"{digest}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, digest: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.ttl)
        return f"{FASTPATH_PREFIX}{digest}?exp={expires}&sig={self._mac(digest, expires)}"

    def check(self, path: str, now: float | None = None) -> str | None:
        """The digest a fast-path URL grants, or None if it is forged, altered or expired."""
        parts = urlsplit(path)
        if not parts.path.startswith(FASTPATH_PREFIX):
            return None
        digest = parts.path[len(FASTPATH_PREFIX):]
        query = parse_qs(parts.query)
        try:
            expires = int(query["exp"][0])
            sig = query["sig"][0]
        except (KeyError, ValueError, IndexError):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        if not sig.isascii() or not hmac.compare_digest(sig, self._mac(digest, expires)):
            return None
        return digest


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise _BadRequest("malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest("malformed header")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class BlobServer:
    def __init__(self, store: Store, fills: Fills, signer: Signer):
        self.store = store
        self.fills = fills
        self.signer = signer
        self.tickets: dict[str, Ticket] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self.inband_port = 0
        self.fastpath_port = 0
        self.stats = None  # stats.Stats: counts body bytes sent (from a stored file or a download)

    async def start(self, fastpath_host: str | None, fastpath_port: int | None) -> None:
        inband = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=MAX_REQUEST_HEAD)
        self.servers.append(inband)
        self.inband_port = inband.sockets[0].getsockname()[1]
        if fastpath_port is not None:
            fast = await asyncio.start_server(self._handle, fastpath_host or None, fastpath_port, limit=MAX_REQUEST_HEAD)
            self.servers.append(fast)
            self.fastpath_port = fast.sockets[0].getsockname()[1]

    def use(self, store: Store, fills: Fills) -> None:
        """Serve from another store (regcache_dir changed while running). Tickets already
        issued name digests the addon found in the store it used then: the new store answers
        them, or they get a 404 like any blob it does not hold."""
        self.store = store
        self.fills = fills

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        self.servers.clear()

    def issue(self, ticket: Ticket) -> str:
        now = time.monotonic()
        # Tickets unclaimed for a minute belong to flows that never reached us.
        for tid in [t for t, tk in self.tickets.items() if now - tk.created > TICKET_TTL]:
            del self.tickets[tid]
        tid = os.urandom(16).hex()
        self.tickets[tid] = ticket
        return TICKET_PREFIX + tid

    # --- connection handling ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    req = await _read_request(reader)
                except _BadRequest as e:
                    await self._send_error(writer, 400, "Bad Request", "UNSUPPORTED", str(e), close=True)
                    return
                if req is None:
                    return
                method, target, headers = req
                keep_alive = headers.get("connection", "").lower() != "close"
                if not await self._respond(method, target, headers, writer):
                    return
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one bad connection must not disturb others
            log.exception("regcache: blob server connection failed")
        finally:
            writer.close()

    async def _send_error(self, writer, status, reason, code, message, close=False, extra=()) -> None:
        body = oci.error_body(code, message)
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra]
        if close:
            headers.append(("Connection", "close"))
        writer.write(_head(status, reason, headers) + body)
        await writer.drain()

    async def _respond(self, method: str, target: str, headers: dict[str, str], writer) -> bool:
        """Answer one request; False means the connection must be closed."""
        if method not in ("GET", "HEAD"):
            await self._send_error(writer, 405, "Method Not Allowed", "UNSUPPORTED", "only GET and HEAD", close=True)
            return False
        path = urlsplit(target).path if target.startswith("http") else target
        if target.startswith("http"):
            target = target[target.index("/", target.index("//") + 2):]
        extra: list[tuple[str, str]] = []
        if path.startswith(TICKET_PREFIX):
            ticket = self.tickets.pop(path[len(TICKET_PREFIX):].split("?", 1)[0], None)
            if ticket is None:
                await self._send_error(writer, 404, "Not Found", "BLOB_UNKNOWN", "unknown or used ticket")
                return True
            digest, range_header, cache_status = ticket.digest, ticket.range_header, ticket.cache_status
            extra = ticket.extra_headers
        else:
            digest = self.signer.check(target)
            if digest is None:
                await self._send_error(writer, 403, "Forbidden", "DENIED", "missing, forged or expired blob URL")
                return True
            range_header = headers.get("range")
            cache_status = "HIT"
        return await self._send_blob(writer, method, digest, range_header, cache_status, extra)

    async def _send_blob(self, writer, method, digest, range_header, cache_status, extra) -> bool:
        fill = self.fills.get(digest)
        f = None
        if fill is not None and fill.ok and not fill.verified:
            if fill.size is not None:
                f = _open_quiet(fill.staging_path)
            if f is None:
                # No length to promise yet, or the file is being renamed into the store
                # right now: the store answers once the fill is over.
                await fill_done(fill)
        if f is None:
            failure = fill.failure if fill is not None else None
            fill = None
            f = self.store.open_blob(digest)
            if f is None and failure:
                await self._send_error(writer, 502, "Bad Gateway", "BLOB_UNKNOWN", f"upstream download failed: {failure}", extra=extra)
                return True
        if f is None:
            await self._send_error(writer, 404, "Not Found", "BLOB_UNKNOWN", "blob unknown to the cache", extra=extra)
            return True
        if fill is not None:
            cache_status = "MISS"  # following a download in progress (a fast-path URL says HIT)
        with f:
            size = fill.size if fill is not None else os.fstat(f.fileno()).st_size
            try:
                rng = oci.parse_range(range_header, size)
            except oci.ProtocolError as e:
                await self._send_error(writer, 416, "Range Not Satisfiable", e.code, e.message, extra=[("Content-Range", f"bytes */{size}")])
                return True
            start, end = rng if rng else (0, size)
            headers = [
                ("Content-Type", "application/octet-stream"),
                ("Docker-Content-Digest", digest),
                ("Accept-Ranges", "bytes"),
                ("X-Cache", cache_status),
                ("Content-Length", str(end - start)),
                *extra,
            ]
            if rng:
                headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
            writer.write(_head(206 if rng else 200, "Partial Content" if rng else "OK", headers))
            await writer.drain()
            if method == "HEAD":
                return True
            return await self._send_body(writer, f, fill, start, end)

    async def _send_body(self, writer, f, fill: Fill | None, start: int, end: int) -> bool:
        loop = asyncio.get_running_loop()
        offset = start
        while offset < end:
            limit = end if fill is None else min(end, fill.available())
            if limit <= offset:
                assert fill is not None
                if fill.failure is not None:
                    # Ending short is the only honest signal left once headers are out.
                    log.warning("regcache: aborting response for %s: %s", fill.digest, fill.failure)
                    return False
                await fill.wait_for_change()
                continue
            count = min(limit - offset, SLICE)
            sent = await loop.sendfile(writer.transport, f, offset, count, fallback=True)
            offset += sent
            if self.stats is not None:
                self.stats.served_bytes(sent, from_store=fill is None)
        return True


async def fill_done(fill: Fill) -> None:
    while not fill.done:
        await fill.wait_for_change()


def _open_quiet(path: str | None):
    if not path:
        return None
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None  # already committed (or failed): the store decides

"""Helpers of the unit tests: a tiny local upstream registry, a raw HTTP client, helpers.

Everything runs on 127.0.0.1 inside this process: no network namespaces, no TLS, no mitmproxy
proxy server.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from regcachelib import oci
from regcachelib.store import Store


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stage_and_commit(store: Store, data: bytes) -> str:
    """Put a blob into a store the way a fill does: staging file, then commit."""
    digest = sha256(data)
    path, f = store.new_staging_file(digest)
    with f:
        f.write(data)
    store.commit_blob(digest, path, len(data))
    return digest


# --- a local upstream registry -------------------------------------------------------------


@dataclass
class Reply:
    """What the local upstream answers for one path.

    body: the bytes sent; length: the Content-Length announced (default len(body), -1: none);
    gate_after: send this many body bytes, then wait for Upstream.gate before the rest.
    """

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    length: int | None = None
    gate_after: int | None = None
    close_after: int | None = None  # send only this many bytes, then close the connection


class LocalUpstream:
    """A threaded http.server that counts what it is asked.

    keep_alive: answer HTTP/1.1 and keep connections open between requests (else HTTP/1.0,
    one request per connection); `connections` counts the TCP connections accepted.
    """

    def __init__(self, keep_alive: bool = False) -> None:
        self.routes: dict[str, Reply] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.connections = 0
        self.open_sockets: set = set()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self):
                super().setup()
                with upstream.lock:
                    upstream.connections += 1
                    upstream.open_sockets.add(self.connection)

            def finish(self):
                with upstream.lock:
                    upstream.open_sockets.discard(self.connection)
                super().finish()

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, method: str) -> None:
                with upstream.lock:
                    upstream.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}))
                reply = upstream.routes.get(self.path.split("?", 1)[0])
                if reply is None:
                    body = oci.error_body("NOT_FOUND", "no such thing")
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if method == "GET":
                        self.wfile.write(body)
                    return
                self.send_response(reply.status)
                for k, v in reply.headers:
                    self.send_header(k, v)
                length = reply.length if reply.length is not None else len(reply.body)
                if length >= 0:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if method != "GET":
                    return
                body = reply.body if reply.close_after is None else reply.body[: reply.close_after]
                try:
                    if reply.gate_after is not None:
                        self.wfile.write(body[: reply.gate_after])
                        upstream.gate.wait(20)
                        self.wfile.write(body[reply.gate_after :])
                    else:
                        self.wfile.write(body)
                except OSError:
                    pass
                if not keep_alive or reply.close_after is not None or length < 0:
                    self.close_connection = True

            def do_GET(self):
                self._answer("GET")

            def do_HEAD(self):
                self._answer("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and p.split("?", 1)[0] == path)

    def drop_connections(self) -> None:
        """Close every open connection, as a server does with idle keep-alive connections."""
        with self.lock:
            socks = list(self.open_sockets)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.drop_connections()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


# --- a raw HTTP/1.1 client ----------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None


async def http_request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET", timeout: float = 15) -> RawResponse:
    """One request with Connection: close; the body is whatever arrives until EOF.

    Unlike http.client this never raises on a short body: the tests look at its length.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        hdrs: dict[str, str] = {}
        for line in header_lines:
            if line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        body = b"" if method == "HEAD" else await asyncio.wait_for(reader.read(), timeout)
        return RawResponse(status, hdrs, body)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


def random_bytes(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)

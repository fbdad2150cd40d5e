"""The load client of the request-rate section (bench/rates.py), run in the client namespace.

``python bench/rateclient.py PLAN.json``: opens N keep-alive HTTP/1.1 connections to one target
(plain TCP, TLS, or CONNECT through an HTTP proxy then TLS, as an HTTPS_PROXY client does), then
runs the plan's phases on those same connections. Before each phase it prints
``{"event": "ready", ...}`` and waits for a line on stdin, so the driver can read the server's
CPU counters (and attach a profiler) exactly around the phase; after it, one JSON result line.

Every connection sends its next request as soon as the last response is complete (closed-loop,
like wrk). A 3xx answer to a GET is followed once on a second keep-alive connection of the same
worker (the mirror's 307 to the fast path), and the pair counts as one request. Bodies are counted,
never kept (an asyncio.Protocol, no stream buffers): the client's own CPU per request stays small,
and it reports that CPU so a reader can see what the load generator took from the shared cores.
Each connection starts requests until the phase's seconds are over; the ones in flight then are
awaited (connections stay clean for the next phase), and the rate is every completed request over the
whole wall time. Counting only what completed within the window would be biased when latency nears
the window (512 connections of 1 MiB each take seconds per round), and the server stays loaded with
all connections until their last requests, which come in one round.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit

ACCEPT = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
REDIRECTS = (301, 302, 303, 307, 308)


class ClosedError(Exception):
    pass


class HttpConn(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; ``request`` returns (status, body bytes, Location)."""

    def __init__(self):
        self.transport = None
        self.head = bytearray()
        self.state = "idle"  # idle | head | body | chunk-size | chunk-data | chunk-crlf | trailer
        self.left = 0
        self.status = 0
        self.nbytes = 0
        self.location = ""
        self.close_after = False
        self.is_head = False
        self.done: asyncio.Future | None = None
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ClosedError(f"connection closed in state {self.state}: {exc}"))

    def data_received(self, data: bytes):
        try:
            self._feed(memoryview(data))
        except Exception as e:  # noqa: BLE001 - a protocol error fails this request, not the client
            if self.done is not None and not self.done.done():
                self.done.set_exception(e)
            self.transport.close()

    # -- parsing
    def _feed(self, data: memoryview) -> None:
        while data:
            if self.state in ("head", "trailer", "chunk-size"):
                # a head, a chunk-size line or the trailer: small, collected in self.head
                before = len(self.head)
                chunk = bytes(data[:16384])
                self.head += chunk
                if self.state == "chunk-size":
                    k = self.head.find(b"\r\n")
                    end = k + 2 if k >= 0 else -1
                elif self.state == "trailer" and self.head.startswith(b"\r\n"):
                    end = 2
                else:
                    k = self.head.find(b"\r\n\r\n")
                    end = k + 4 if k >= 0 else -1
                if end < 0:
                    if len(self.head) > 65536:
                        raise ClosedError(f"no end of line in {len(self.head)} bytes in state {self.state}")
                    data = data[len(chunk):]
                    continue
                data = data[end - before:]
                line = bytes(self.head[:end])
                self.head.clear()
                if self.state == "head":
                    self._parse_head(line)
                elif self.state == "trailer":
                    self._finish()
                else:
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        self.state = "trailer"
                    else:
                        self.left, self.state = size, "chunk-data"
            elif self.state in ("body", "chunk-data", "chunk-crlf"):
                # body bytes are counted, not kept
                take = min(self.left, len(data))
                self.left -= take
                data = data[take:]
                if self.state != "chunk-crlf":
                    self.nbytes += take
                if self.left == 0:
                    if self.state == "body":
                        self._finish()
                    elif self.state == "chunk-data":
                        self.state, self.left = "chunk-crlf", 2
                    else:
                        self.state = "chunk-size"
            else:
                raise ClosedError(f"{len(data)} unexpected bytes from the server while idle")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
        self.location = fields.get("location", "")
        self.close_after = fields.get("connection", "").lower() == "close"
        if self.is_head or self.status in (204, 304) or 100 <= self.status < 200:
            self._finish()
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
        elif "content-length" in fields:
            self.left = int(fields["content-length"])
            self.state = "body"
            if self.left == 0:
                self._finish()
        else:
            raise ClosedError(f"HTTP {self.status} without Content-Length or chunked encoding")

    def _finish(self) -> None:
        self.state = "idle"
        if self.done is not None and not self.done.done():
            self.done.set_result((self.status, self.nbytes, self.location))
        if self.close_after:
            self.transport.close()

    # -- use
    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def request(self, method: str, path: str, host: str) -> tuple[int, int, str]:
        if not self.usable:
            raise ClosedError("connection closed")
        self.head.clear()
        self.state, self.nbytes, self.left, self.is_head, self.close_after = "head", 0, 0, method == "HEAD", False
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {ACCEPT}\r\n"
                             f"User-Agent: regcache-bench-rateclient\r\n\r\n".encode())
        return await self.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def tls_context() -> ssl.SSLContext:
    # A benchmark, not a test: the servers' certificates come from throw-away CAs.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def open_conn(target: dict, ctx: ssl.SSLContext) -> HttpConn:
    """A connection as the plan's target says: tcp, tls, or CONNECT through ``proxy`` then TLS."""
    loop = asyncio.get_running_loop()
    sni = target.get("sni") or None
    if target.get("proxy"):
        phost, pport = target["proxy"].rsplit(":", 1)
        sock = socket.create_connection((phost, int(pport)))
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # CONNECT by hand: a few bytes, read until the blank line
        connect = target["connect"]
        await loop.sock_sendall(sock, f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ClosedError("proxy closed the connection during CONNECT")
            reply += chunk
        if not reply.split(b"\r\n", 1)[0].split()[1].startswith(b"2"):
            raise ClosedError(f"CONNECT refused: {reply[:200]!r}")
        _, proto = await loop.create_connection(HttpConn, sock=sock, ssl=ctx,
                                                server_hostname=sni or connect.rsplit(":", 1)[0])
        return proto
    use_tls = target.get("tls", False)
    _, proto = await loop.create_connection(HttpConn, target["host"], target["port"], ssl=ctx if use_tls else None,
                                            server_hostname=(sni or "") if use_tls else None)
    return proto


class Worker:
    """One client slot: its main connection, and one to wherever redirects lead."""

    def __init__(self, target: dict, ctx: ssl.SSLContext):
        self.target = target
        self.ctx = ctx
        self.conn: HttpConn | None = None
        self.side: HttpConn | None = None
        self.side_origin = ""
        self.reconnects = 0

    async def main_conn(self) -> HttpConn:
        if self.conn is None or not self.conn.usable:
            if self.conn is not None:
                self.reconnects += 1
            self.conn = await open_conn(self.target, self.ctx)
        return self.conn

    async def side_conn(self, url) -> HttpConn:
        origin = f"{url.scheme}://{url.netloc}"
        if self.side is None or not self.side.usable or origin != self.side_origin:
            if self.side is not None:
                self.side.close()
                self.reconnects += 1
            tls = url.scheme == "https"
            t = {"host": url.hostname, "port": url.port or (443 if tls else 80), "tls": tls}
            self.side, self.side_origin = await open_conn(t, self.ctx), origin
        return self.side

    async def one(self, method: str, path: str, follow: bool) -> tuple[int, int]:
        conn = await self.main_conn()
        status, nbytes, location = await conn.request(method, path, self.target["host_header"])
        if follow and status in REDIRECTS and location:
            url = urlsplit(location)
            side = await self.side_conn(url)
            path = url.path + (f"?{url.query}" if url.query else "")
            status, nbytes, _ = await side.request(method, path, url.netloc)
        return status, nbytes

    def close(self) -> None:
        for c in (self.conn, self.side):
            if c is not None:
                c.close()


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_phase(workers: list[Worker], phase: dict) -> dict:
    method, path, follow, seconds = phase["method"], phase["path"], phase.get("follow", False), phase["seconds"]
    expect_bytes = phase.get("expect_bytes")  # a blob GET: a shorter or longer body is an error, not a request
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    nbytes_total = [0]
    reconnects0 = sum(w.reconnects for w in workers)
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def loop(w: Worker):
        while True:
            start = time.perf_counter()
            if start >= deadline:
                return
            try:
                status, nbytes = await w.one(method, path, follow)
            except (OSError, ClosedError, ValueError, IndexError, ssl.SSLError) as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                await asyncio.sleep(0.01)
                continue
            end = time.perf_counter()
            if expect_bytes is not None and status == 200 and nbytes != expect_bytes:
                errors.append(f"body of {nbytes} bytes, not {expect_bytes}")
                continue
            latencies.append(end - start)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            nbytes_total[0] += nbytes

    cpu0 = cpu_now()
    await asyncio.gather(*(loop(w) for w in workers))
    wall = time.perf_counter() - t0
    cpu = cpu_now() - cpu0
    latencies.sort()

    def pct(p: float):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else None

    return {
        "event": "result", "phase": phase["name"], "requests": len(latencies), "bytes": nbytes_total[0],
        "seconds": seconds,
        "rps": len(latencies) / wall, "bytes_per_s": nbytes_total[0] / wall, "completed": len(latencies), "wall": wall,
        "statuses": statuses, "errors": len(errors), "first_errors": errors[:3],
        "reconnects": sum(w.reconnects for w in workers) - reconnects0,
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else None,
        "client_cpu_s": cpu, "client_cpu_share": cpu / wall if wall else 0.0,
    }


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main_async(plan: dict) -> int:
    loop = asyncio.get_running_loop()
    target, n = plan["target"], plan["conns"]
    ctx = tls_context()
    workers = [Worker(target, ctx) for _ in range(n)]
    t0 = time.perf_counter()
    cpu0 = cpu_now()
    errors: list[str] = []

    async def connect(w: Worker):
        # the connection is set up and carries one request before any phase: handshakes are not measured
        for _ in range(3):
            try:
                await w.one("GET", plan.get("connect_path", "/v2/"), False)
                return
            except (OSError, ClosedError, ValueError, IndexError, ssl.SSLError) as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                w.conn = None
                await asyncio.sleep(0.05)

    # connect in batches: 512 handshakes at once would only queue behind each other in the server's accept
    for i in range(0, n, 64):
        await asyncio.gather(*(connect(w) for w in workers[i:i + 64]))
    say({"event": "connected", "conns": sum(1 for w in workers if w.conn and w.conn.usable),
         "seconds": time.perf_counter() - t0,
         "client_cpu_s": cpu_now() - cpu0, "errors": len(errors), "first_errors": errors[:3]})
    for phase in plan["phases"]:
        say({"event": "ready", "phase": phase["name"]})
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            break
        say(await run_phase(workers, phase))
    say({"event": "ready", "phase": "close"})
    await loop.run_in_executor(None, sys.stdin.readline)
    for w in workers:
        w.close()
    await asyncio.sleep(0.1)
    say({"event": "done"})
    return 0


def main() -> int:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    return asyncio.run(main_async(plan))


if __name__ == "__main__":
    sys.exit(main())

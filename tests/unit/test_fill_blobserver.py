"""fill.py + blobserver.py + upstream.py end to end, in process, against a local HTTP upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from regcachelib import blobserver, oci
from regcachelib.blobserver import FASTPATH_PREFIX, BlobServer, Signer, Ticket
from regcachelib.fill import CHUNK, HOLDBACK, Fill, Fills
from regcachelib.concurrency import Workers
from regcachelib.config import Config
from regcachelib.services import Services, build_services
from regcachelib.store import Store
from regcachelib.upstream import Target, Upstream

from .helpers import Reply, http_request, random_bytes, sha256, stage_and_commit, wait_until

SIZE = 300 * 1024
DATA = random_bytes(SIZE, seed=7)
DIGEST = sha256(DATA)
BLOB_PATH = f"/v2/org/img/blobs/{DIGEST}"


@dataclass
class Stack:
    """The blob services and the blob server, built as RegistryCache builds them."""

    services: Services
    server: BlobServer
    target: Target
    issued: list = field(default_factory=list)


@contextlib.asynccontextmanager
async def blob_stack(directory: str, upstream_port: int):
    store = Store(directory)
    workers = Workers(fill_workers=8)
    upstream = Upstream(ssl.create_default_context(), timeout=5.0, backoff=0.0)
    services = build_services(Config(), store, upstream, workers, lambda: 0)
    server = BlobServer(services.store, services.fills, Signer(os.urandom(32)))
    await server.start(None, None)
    try:
        yield Stack(services, server, Target(host="127.0.0.1", port=upstream_port, scheme="http"))
    finally:
        await server.stop()
        workers.shutdown()
        store.close()


def fill_for(stack: Stack, digest: str = DIGEST, headers=()) -> Fill:
    """What a blob GET miss does: join the fill in flight or lead a new one."""
    path = f"/v2/org/img/blobs/{digest}"
    return stack.services.fills.join(oci.parse_digest(digest), "quay.io", "org/img", stack.target, path,
                                     list(headers))[0]


async def get(stack: Stack, digest: str = DIGEST, range_header: str | None = None, method: str = "GET"):
    """A blob GET miss as a client sees it: the fill, then the in-band blob server's answer."""
    fill = fill_for(stack, digest)
    await asyncio.wait_for(fill.headers_ready.wait(), 10)
    assert fill.status == 200, (fill.status, fill.failure)
    path = stack.server.issue(Ticket(digest, "MISS", range_header))
    stack.issued.append(path)
    return await http_request(stack.server.inband_port, path, method=method)


async def readers_connected(stack: Stack, n: int) -> None:
    """Until n tickets were issued and every one has been claimed by its connection."""
    await wait_until(lambda: len(stack.issued) >= n and not stack.server.tickets)


async def settle(stack: Stack, digest: str = DIGEST) -> None:
    """Wait until the fill's worker has finished (and cleaned up) and been forgotten."""
    await wait_until(lambda: stack.services.fills.get(digest) is None)


def staging(stack: Stack) -> list[str]:
    return os.listdir(stack.services.store.staging_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def stack_factory(tmp_path, upstream_server):
    return lambda: blob_stack(str(tmp_path / "cache"), upstream_server.port)


# --- the good path ---------------------------------------------------------------------------------


def test_fill_serves_verified_bytes_and_stores_them(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(body=DATA)

    async def main():
        async with stack_factory() as stack:
            resp = await get(stack)
            assert resp.status == 200
            assert resp.body == DATA and sha256(resp.body) == DIGEST
            assert resp.content_length == SIZE
            assert resp.headers["docker-content-digest"] == DIGEST
            assert resp.headers["x-cache"] == "MISS"
            await settle(stack)
            assert stack.services.store.has_blob(DIGEST)
            assert staging(stack) == []
            # later readers are served from the store, with no upstream request
            hit = await http_request(stack.server.inband_port, stack.server.issue(Ticket(DIGEST, "HIT")))
            assert (hit.status, hit.body, hit.headers["x-cache"]) == (200, DATA, "HIT")
            head = await http_request(stack.server.inband_port, stack.server.issue(Ticket(DIGEST, "HIT")), method="HEAD")
            assert head.status == 200 and head.content_length == SIZE and head.body == b""

    run(main())
    assert upstream_server.count("GET", BLOB_PATH) == 1


def test_ten_concurrent_readers_share_one_upstream_get(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(body=DATA, gate_after=100 * 1024)

    async def main():
        async with stack_factory() as stack:
            readers = [asyncio.create_task(get(stack)) for _ in range(10)]
            # every reader holds its ticket and is being served while upstream is still sending
            await readers_connected(stack, 10)
            fill = stack.services.fills.get(DIGEST)
            assert fill is not None and not fill.done
            upstream_server.gate.set()
            results = await asyncio.gather(*readers)
            for resp in results:
                assert resp.status == 200
                assert resp.body == DATA
            await settle(stack)
            assert stack.services.store.has_blob(DIGEST)

    run(main())
    assert upstream_server.count("GET", BLOB_PATH) == 1


BIG = random_bytes(5 * 1024 * 1024 // 2, seed=11)  # 2.5 MiB: more than one CHUNK
BIG_DIGEST = sha256(BIG)


def test_range_on_a_follower(stack_factory, upstream_server):
    size = len(BIG)
    upstream_server.routes[f"/v2/org/img/blobs/{BIG_DIGEST}"] = Reply(body=BIG, gate_after=3 * CHUNK // 2)

    async def main():
        async with stack_factory() as stack:
            head_part = await asyncio.wait_for(get(stack, BIG_DIGEST, range_header="bytes=1000-1999"), 10)
            # answered from the growing staging file before upstream finished
            assert not upstream_server.gate.is_set()
            assert not stack.services.fills.get(BIG_DIGEST).done
            assert head_part.status == 206
            assert head_part.headers["content-range"] == f"bytes 1000-1999/{size}"
            assert head_part.content_length == 1000
            assert head_part.body == BIG[1000:2000]
            # the tail lies in the held-back bytes: it only comes once the digest verified
            tail = asyncio.create_task(get(stack, BIG_DIGEST, range_header="bytes=-100"))
            await asyncio.sleep(0.2)
            assert not tail.done()
            upstream_server.gate.set()
            tail = await tail
            assert tail.status == 206
            assert tail.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
            assert tail.body == BIG[-100:]
            await settle(stack, BIG_DIGEST)
            assert stack.services.store.has_blob(BIG_DIGEST)

    run(main())
    assert upstream_server.count("GET", f"/v2/org/img/blobs/{BIG_DIGEST}") == 1


def test_follower_gets_delivered_bytes_without_waiting_for_a_whole_chunk(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(body=DATA, gate_after=100 * 1024)

    async def main():
        async with stack_factory() as stack:
            try:
                part = await asyncio.wait_for(get(stack, range_header="bytes=1000-1999"), 1.5)
                assert part.status == 206 and part.body == DATA[1000:2000]
            finally:
                upstream_server.gate.set()
                await settle(stack)

    run(main())


def test_stored_blob_ranges_and_416(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(body=DATA)

    async def main():
        async with stack_factory() as stack:
            assert (await get(stack)).body == DATA
            await settle(stack)
            port = stack.server.inband_port
            r = await http_request(port, stack.server.issue(Ticket(DIGEST, "HIT", "bytes=10-")))
            assert r.status == 206 and r.body == DATA[10:]
            assert r.headers["content-range"] == f"bytes 10-{SIZE - 1}/{SIZE}"
            r = await http_request(port, stack.server.issue(Ticket(DIGEST, "HIT", "bytes=0-1,5-6")))
            assert r.status == 200 and r.body == DATA
            r = await http_request(port, stack.server.issue(Ticket(DIGEST, "HIT", f"bytes={SIZE}-")))
            assert r.status == 416
            assert r.headers["content-range"] == f"bytes */{SIZE}"
            assert b'"errors"' in r.body

    run(main())


def test_signed_fast_path_urls(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(body=DATA)

    async def main():
        async with stack_factory() as stack:
            assert (await get(stack)).body == DATA
            await settle(stack)
            port = stack.server.inband_port
            url = stack.server.signer.sign(DIGEST, "127.0.0.1")
            r = await http_request(port, url)
            assert (r.status, r.body, r.headers["x-cache"]) == (200, DATA, "HIT")
            r = await http_request(port, url, headers={"Range": "bytes=5-9"})
            assert (r.status, r.body) == (206, DATA[5:10])
            r = await http_request(port, url.replace("sig=", "sig=0"))
            assert r.status == 403 and b"DENIED" in r.body
            r = await http_request(port, f"{FASTPATH_PREFIX}{DIGEST}")
            assert r.status == 403
            r = await http_request(port, "/_regcache/t/" + "0" * 32)
            assert r.status == 404 and b"BLOB_UNKNOWN" in r.body
            # a ticket is good for one request only
            ticket = stack.server.issue(Ticket(DIGEST, "HIT"))
            assert (await http_request(port, ticket)).status == 200
            assert (await http_request(port, ticket)).status == 404
            r = await http_request(port, url, method="DELETE")
            assert r.status == 405

    run(main())


# --- the fast-path port against hostile clients ----------------------------------------------------


# larger than what loopback socket buffers take in, so a client that reads nothing stays mid-response
HUGE = os.urandom(32 * 1024 * 1024)


class FastPath:
    """A BlobServer with its fast-path port on 127.0.0.1, serving DATA and HUGE from the store."""

    def __init__(self, directory: str, max_connections: int):
        self.store = Store(directory)
        self.fills = Fills(self.store, Upstream(ssl.create_default_context(), timeout=5.0, backoff=0.0), max_workers=2)
        self.signer = Signer(os.urandom(32))
        self.server = BlobServer(self.store, self.fills, self.signer, max_fastpath_connections=max_connections)

    async def __aenter__(self) -> FastPath:
        for body in (DATA, HUGE):
            stage_and_commit(self.store, body)
        await self.server.start("127.0.0.1", 0)
        self.port = self.server.fastpath_port
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()
        self.fills.shutdown()
        self.store.close()

    async def half_head(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection that sends part of a request head and then nothing."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"GET {FASTPATH_PREFIX}{DIGEST}?exp=1".encode())
        await writer.drain()
        return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


@pytest.fixture
def fastpath(tmp_path):
    return lambda max_connections=512: FastPath(str(tmp_path / "cache"), max_connections)


def test_fast_path_url_works_only_for_its_client_and_before_expiry(fastpath, caplog):
    async def main():
        async with fastpath() as fp:
            mine = fp.signer.sign(DIGEST, "127.0.0.1")
            r = await http_request(fp.port, mine)
            assert (r.status, r.body) == (200, DATA)
            for _ in range(3):
                r = await http_request(fp.port, fp.signer.sign(DIGEST, "127.0.0.2"))
                assert r.status == 403 and json.loads(r.body)["errors"][0]["code"] == "DENIED"
            expired = fp.signer.sign(DIGEST, "127.0.0.1", now=time.time() - blobserver.FASTPATH_URL_TTL - 2)
            r = await http_request(fp.port, expired)
            assert r.status == 403 and json.loads(r.body)["errors"][0]["message"] == "URL expired"

    with caplog.at_level("INFO", logger="regcachelib.blobserver"):
        run(main())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == ["refused fast-path request from 127.0.0.1: URL forged, altered or issued to another client"]


def test_proxied_clients_url_from_another_address_is_sent_back_to_its_https_url(fastpath, caplog):
    """The client's HTTP_PROXY is another proxy: its fast-path URL arrives from that proxy's
    address. Not a 403 that fails the pull: a 307 back to the https URL the client asked for
    (once), and the client is marked for in-band answers."""
    asked = f"https://registry-1.docker.io/v2/library/small/blobs/{DIGEST}"

    async def main():
        async with fastpath() as fp:
            url = fp.signer.sign(DIGEST, "10.0.0.2", way_back=asked)
            r = await http_request(fp.port, url)
            assert (r.status, r.headers["location"], r.body) == (307, asked, b"")
            assert fp.signer.sent_back("10.0.0.2") and not fp.signer.sent_back("127.0.0.1")
            r = await http_request(fp.port, url)
            assert r.status == 403  # once: the way back is used up

    with caplog.at_level("INFO", logger="regcachelib.blobserver"):
        run(main())
    assert any("fast-path URL came from 127.0.0.1, not from the proxied client" in r.getMessage()
               for r in caplog.records)


def test_request_head_must_arrive_in_time(fastpath, monkeypatch):
    monkeypatch.setattr(blobserver, "HEAD_TIMEOUT", 0.5)

    async def main():
        async with fastpath() as fp:
            silent, _w1 = await asyncio.open_connection("127.0.0.1", fp.port)
            trickling, w2 = await fp.half_head()
            assert await closed_by_server(silent, 3) and await closed_by_server(trickling, 3)
            assert not fp.server.fast_connections
            # a client that sends its request at once is not affected
            r = await http_request(fp.port, fp.signer.sign(DIGEST, "127.0.0.1"))
            assert (r.status, r.body) == (200, DATA)

    run(main())


def test_keep_alive_connection_is_closed_after_idle_timeout(fastpath, monkeypatch):
    monkeypatch.setattr(blobserver, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(blobserver, "IDLE_TIMEOUT", 1.0)

    async def main():
        async with fastpath() as fp:
            reader, writer = await asyncio.open_connection("127.0.0.1", fp.port)
            request = f"HEAD {fp.signer.sign(DIGEST, '127.0.0.1')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            writer.write(request)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            # longer than the head deadline, within the idle timeout: the connection is still good
            await asyncio.sleep(0.6)
            writer.write(request)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            assert not await closed_by_server(reader, 0.5)
            assert await closed_by_server(reader, 2)
            writer.close()

    run(main())


def test_connection_cap_gives_the_slot_of_an_idle_connection_to_a_new_client(fastpath, caplog):
    async def main():
        async with fastpath(max_connections=4) as fp:
            hostile = [await fp.half_head() for _ in range(10)]
            await wait_until(lambda: len(fp.server.fast_connections) == 4)
            # the oldest six were closed to make room, the newest four are still open
            closed = [await closed_by_server(r, 0.5) for r, _ in hostile]
            assert closed == [True] * 6 + [False] * 4
            r = await http_request(fp.port, fp.signer.sign(DIGEST, "127.0.0.1"))
            assert (r.status, r.body) == (200, DATA)
            assert len(fp.server.fast_connections) <= 4
            for _, w in hostile:
                w.close()

    with caplog.at_level("INFO", logger="regcachelib.blobserver"):
        run(main())
    cap_lines = [r.getMessage() for r in caplog.records if "the cap" in r.getMessage()]
    assert len(cap_lines) == 1, cap_lines  # 7 evictions, one line per LOG_INTERVAL


def test_connection_cap_closes_newcomers_when_every_slot_is_busy(fastpath):
    async def main():
        async with fastpath(max_connections=2) as fp:
            # two clients mid-response: they requested the blob and read nothing of it
            busy = []
            big = fp.signer.sign(sha256(HUGE), "127.0.0.1")
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", fp.port)
                writer.write(f"GET {big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                busy.append((reader, writer))
            await wait_until(lambda: len(fp.server.fast_connections) == 2
                             and all(c.busy for c in fp.server.fast_connections.values()))
            newcomer, w = await asyncio.open_connection("127.0.0.1", fp.port)
            assert await closed_by_server(newcomer, 2)
            w.close()
            # the busy ones were not disturbed
            for reader, writer in busy:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(len(HUGE)) == HUGE
                writer.close()

    run(main())


def test_accept_failing_for_want_of_descriptors_is_logged_once_per_interval(fastpath, caplog):
    others = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: others.append(context["message"]))
        async with fastpath():
            for _ in range(50):  # what asyncio reports once a second per listener while fds are out
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
            loop.call_exception_handler({"message": "something else"})
        # stopping the server gives the loop its handler back
        loop.call_exception_handler({"message": "after stop"})

    with caplog.at_level("INFO", logger="regcachelib.blobserver"):
        run(main())
    lines = [r for r in caplog.records if "accepting connections failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert others == ["something else", "after stop"]


# --- what must never happen: a wrong or short blob delivered whole, or stored --------------------


CORRUPT = DATA[:150_000] + bytes([DATA[150_000] ^ 0xFF]) + DATA[150_001:]


@pytest.mark.parametrize(
    "bad_reply",
    [
        pytest.param(Reply(body=CORRUPT, gate_after=100 * 1024), id="corrupt-same-length"),
        pytest.param(Reply(body=DATA, length=SIZE, close_after=200 * 1024, gate_after=100 * 1024), id="short-body-then-close"),
    ],
)
def test_bad_upstream_body_ends_readers_short_and_stores_nothing(stack_factory, upstream_server, bad_reply):
    upstream_server.routes[BLOB_PATH] = bad_reply

    async def main():
        async with stack_factory() as stack:
            readers = [asyncio.create_task(get(stack)) for _ in range(3)]
            await readers_connected(stack, 3)
            upstream_server.gate.set()
            for resp in await asyncio.gather(*readers):
                assert resp.status == 200  # headers were out before the failure was known
                assert resp.content_length == SIZE
                assert len(resp.body) < SIZE, "a reader received a complete body of a bad blob"
                assert len(resp.body) <= SIZE - HOLDBACK
            await settle(stack)
            assert not stack.services.store.has_blob(DIGEST)
            assert stack.services.store.open_blob(DIGEST) is None
            assert staging(stack) == []

            # the next attempt, with upstream healthy again, succeeds
            upstream_server.routes[BLOB_PATH] = Reply(body=DATA)
            resp = await get(stack)
            assert resp.status == 200 and resp.body == DATA
            await settle(stack)
            assert stack.services.store.has_blob(DIGEST)
            assert staging(stack) == []

    run(main())
    assert upstream_server.count("GET", BLOB_PATH) == 2


def test_late_reader_after_failure_gets_no_bad_bytes(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(body=CORRUPT)

    async def main():
        async with stack_factory() as stack:
            fill = fill_for(stack)
            await settle(stack)
            assert fill.done and not fill.ok and "digest mismatch" in fill.failure
            r = await http_request(stack.server.inband_port, stack.server.issue(Ticket(DIGEST, "MISS")))
            assert r.status == 404 and b"BLOB_UNKNOWN" in r.body
            assert staging(stack) == []

    run(main())


def test_small_blob_is_held_back_entirely_until_verified(stack_factory, upstream_server):
    small = random_bytes(HOLDBACK // 2, seed=3)
    bad = bytes([small[0] ^ 1]) + small[1:]
    digest = sha256(small)
    path = f"/v2/org/img/blobs/{digest}"
    upstream_server.routes[path] = Reply(body=bad, gate_after=len(bad) - 1)

    async def main():
        async with stack_factory() as stack:
            reader = asyncio.create_task(get(stack, digest))
            await readers_connected(stack, 1)
            upstream_server.gate.set()
            resp = await reader
            assert resp.body == b""
            await settle(stack, digest)
            assert not stack.services.store.has_blob(digest)

    run(main())


@pytest.mark.parametrize("good", [True, False], ids=["good", "corrupt"])
def test_upstream_without_content_length(stack_factory, upstream_server, good):
    upstream_server.routes[BLOB_PATH] = Reply(body=DATA if good else CORRUPT, length=-1, gate_after=100 * 1024)

    async def main():
        async with stack_factory() as stack:
            reader = asyncio.create_task(get(stack))
            await readers_connected(stack, 1)
            upstream_server.gate.set()
            resp = await reader
            if good:
                assert (resp.status, resp.body) == (200, DATA)
            else:
                # the size was unknown, so the reader waited for the end: nothing of the bad blob went out
                assert resp.status in (404, 502) and DATA[:100] not in resp.body
                assert json.loads(resp.body)["errors"][0]["code"] == "BLOB_UNKNOWN"
            await settle(stack)
            assert stack.services.store.has_blob(DIGEST) is good
            assert staging(stack) == []

    run(main())


# --- upstream answers that are not a blob ----------------------------------------------------------


def test_upstream_error_is_kept_for_relaying(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(status=401, body=b'{"errors":[{"code":"UNAUTHORIZED"}]}', headers=[("WWW-Authenticate", 'Bearer realm="https://auth.example/token"')])

    async def main():
        async with stack_factory() as stack:
            fill = fill_for(stack)
            await asyncio.wait_for(fill.headers_ready.wait(), 10)
            assert fill.status == 401 and not fill.ok
            assert b"UNAUTHORIZED" in fill.error_body
            assert ("WWW-Authenticate", 'Bearer realm="https://auth.example/token"') in fill.upstream_headers
            await settle(stack)
            assert staging(stack) == [] and not stack.services.store.has_blob(DIGEST)

    run(main())


def test_unreachable_upstream_is_502(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    async def main():
        async with blob_stack(str(tmp_path / "cache"), port) as stack:
            fill = fill_for(stack)
            await asyncio.wait_for(fill.headers_ready.wait(), 10)
            assert fill.status == 502 and "unavailable" in fill.failure

    run(main())


def test_redirect_to_another_host_drops_credentials(stack_factory, upstream_server):
    cdn_path = "/cdn/blob?X-Amz-Signature=abc"
    upstream_server.routes[BLOB_PATH] = Reply(status=307, headers=[("Location", f"http://localhost:{upstream_server.port}{cdn_path}")])
    upstream_server.routes["/cdn/blob"] = Reply(body=DATA)

    async def main():
        async with stack_factory() as stack:
            fill = fill_for(stack, headers=[("Authorization", "Bearer secret"), ("Cookie", "c=1"), ("Accept", "*/*")])
            await asyncio.wait_for(fill.headers_ready.wait(), 10)
            assert fill.status == 200
            await settle(stack)
            assert stack.services.store.has_blob(DIGEST)

    run(main())
    (registry_req,) = [h for m, p, h in upstream_server.requests if p == BLOB_PATH]
    (cdn_req,) = [h for m, p, h in upstream_server.requests if p.startswith("/cdn/")]
    assert registry_req["authorization"] == "Bearer secret"
    assert "authorization" not in cdn_req and "cookie" not in cdn_req
    assert cdn_req["accept"] == "*/*"


def test_fill_with_unexpected_error_still_releases_waiters(stack_factory, upstream_server):
    upstream_server.routes[BLOB_PATH] = Reply(status=307, headers=[("Location", "http://127.0.0.1:notaport/blob")])

    async def main():
        async with stack_factory() as stack:
            fill = fill_for(stack)
            await asyncio.wait_for(fill.headers_ready.wait(), 2)
            assert fill.status != 200 and fill.failure

    run(main())


def test_token_travels_to_the_host_a_registry_delegates_its_challenge_to(upstream_server):
    """registry.k8s.io redirects every /v2 request to *-docker.pkg.dev, which asks for a Bearer
    token: the token the client got from that challenge must reach pkg.dev on redirects (else
    every pull fails), while a host that never challenged still gets no credentials."""
    from regcachelib.upstream import Target, Upstream, make_ssl_context

    port = upstream_server.port
    upstream_server.routes["/v2/"] = Reply(status=307, headers=[("Location", f"http://localhost:{port}/delegate/v2/")])
    upstream_server.routes["/delegate/v2/"] = Reply(status=401, headers=[("WWW-Authenticate", f'Bearer realm="http://localhost:{port}/token",service="pkg"')])
    upstream_server.routes["/v2/img/manifests/1"] = Reply(status=307, headers=[("Location", f"http://localhost:{port}/delegate/v2/img/manifests/1")])
    upstream_server.routes["/delegate/v2/img/manifests/1"] = Reply(body=b"{}")

    up = Upstream(make_ssl_context(False, None, None), timeout=5)
    target = Target("127.0.0.1", port, "http")
    auth = [("Authorization", "Bearer pkg-token")]
    # before the challenge is seen, another host gets nothing
    up.request("GET", target, "/v2/img/manifests/1", auth).close()
    # the ping: the registry delegates its challenge to "localhost"
    assert up.request("GET", target, "/v2/", []).status == 401
    up.request("GET", target, "/v2/img/manifests/1", auth).close()
    delegated = [h for m, p, h in upstream_server.requests if p == "/delegate/v2/img/manifests/1"]
    assert "authorization" not in delegated[0]
    assert delegated[1]["authorization"] == "Bearer pkg-token"


# --- small stored bodies go out with their head; a file shorter than promised ends short ----------


async def keep_alive_gets(port: int, paths: list[str], headers: str = "") -> list[tuple[int, dict, bytes]]:
    """GETs one after another on one kept-alive connection, each body read by its Content-Length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for path in paths:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 10)
            answers.append((int(head[0].split()[1]), fields, body))
        # nothing more than the promised bytes came: the next read waits (or sees the close)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
    finally:
        writer.close()
    return answers


@pytest.mark.parametrize("size", [0, 10, blobserver.SMALL_BODY, blobserver.SMALL_BODY + 1])
def test_stored_blobs_small_and_not_share_a_kept_alive_connection(tmp_path, size):
    body = random_bytes(size, seed=size)

    async def main():
        async with FastPath(str(tmp_path / "cache"), 8) as fp:
            stage_and_commit(fp.store, body)
            url = fp.signer.sign(sha256(body), "127.0.0.1")
            data_url = fp.signer.sign(DIGEST, "127.0.0.1")
            answers = await keep_alive_gets(fp.port, [url, data_url, url])
            assert [(s, b) for s, _, b in answers] == [(200, body), (200, DATA), (200, body)]
            assert answers[0][1]["docker-content-digest"] == sha256(body)
            if size > 2:
                (status, fields, part), = await keep_alive_gets(fp.port, [url], f"Range: bytes=1-{size - 2}\r\n")
                assert (status, part, fields["content-range"]) == (206, body[1:-1], f"bytes 1-{size - 2}/{size}")
            head = await http_request(fp.port, url, method="HEAD")
            assert (head.status, head.headers["content-length"]) == (200, str(size))

    run(main())


@pytest.mark.parametrize("size", [1000, 1024 * 1024])
def test_a_file_shorter_than_its_length_ends_the_response_short(tmp_path, monkeypatch, caplog, size):
    """Were a stored file cut short after its size was read, the response ends short (small:
    no head at all) and the connection closes: no hang, no spinning on a file at its end."""
    body = random_bytes(size, seed=3)

    class LongerStat:
        def __init__(self, st):
            self.st_size = st.st_size + 4096

    class OsWithLongerFiles:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fstat(fd):
            return LongerStat(os.fstat(fd))

    async def main():
        async with FastPath(str(tmp_path / "cache"), 8) as fp:
            stage_and_commit(fp.store, body)
            monkeypatch.setattr(blobserver, "os", OsWithLongerFiles())
            request = http_request(fp.port, fp.signer.sign(sha256(body), "127.0.0.1"))
            if size <= blobserver.SMALL_BODY:
                with pytest.raises(asyncio.IncompleteReadError):  # closed without a head
                    await asyncio.wait_for(request, 10)
            else:
                r = await asyncio.wait_for(request, 10)
                assert r.status == 200 and r.headers["content-length"] == str(size + 4096) and r.body == body
            assert "file ends at" in caplog.text

    run(main())


@pytest.mark.skipif(shutil.which("ss") is None or not os.path.isdir("/proc/self/fd"), reason="needs ss and /proc")
def test_listen_backlogs_are_raised_for_every_listener_of_the_process():
    """A fleet starting at once overflows asyncio's default accept queue of 100 (mitmproxy's
    listeners use it too): every listening socket of the process gets LISTEN_BACKLOG."""

    def backlog(port: int) -> int:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
        return int(out.split()[2])  # State Recv-Q Send-Q: a listener's Send-Q is its backlog

    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # backlog 100, like mitmproxy's
        port = server.sockets[0].getsockname()[1]
        try:
            assert backlog(port) == 100
            assert blobserver.raise_listen_backlogs() >= 1
            assert backlog(port) == blobserver.LISTEN_BACKLOG
            # the listener still accepts
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        finally:
            server.close()

    asyncio.run(main())


def test_a_kept_alive_connection_is_uncorked_after_a_large_body(tmp_path):
    """A stored body above SMALL_BODY goes out with TCP_CORK; the next answer on the same
    connection (a small blob: head and body in one short write) must not wait for the kernel
    to flush a cork left on (200 ms)."""
    big = random_bytes(4 * 1024 * 1024, seed=11)
    small = random_bytes(100, seed=12)

    async def main():
        async with FastPath(str(tmp_path / "cache"), 8) as fp:
            for body in (big, small):
                stage_and_commit(fp.store, body)
            big_url = fp.signer.sign(sha256(big), "127.0.0.1")
            small_url = fp.signer.sign(sha256(small), "127.0.0.1")
            reader, writer = await asyncio.open_connection("127.0.0.1", fp.port)
            try:
                waits = []
                for url, body in ((big_url, big), (small_url, small), (small_url, small)):
                    started = time.monotonic()
                    writer.write(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
                    length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
                    assert await asyncio.wait_for(reader.readexactly(length), 10) == body
                    waits.append(time.monotonic() - started)
            finally:
                writer.close()
            assert max(waits[1:]) < 0.15, waits

    run(main())

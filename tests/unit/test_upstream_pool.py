"""Upstream keeps HTTP/1.1 connections open per endpoint and reuses them (regcache #11, #12).

A cold pull of an image with many small layers must not open a TCP+TLS connection per request.
"""

from __future__ import annotations

import json
import ssl
import threading

import pytest

from regcachelib import upstream as upstream_mod
from regcachelib.upstream import Target, Upstream, fetch

from .helpers import LocalUpstream, Reply

MANIFEST = json.dumps({"schemaVersion": 2, "layers": [{"size": i} for i in range(40)]}).encode()


@pytest.fixture
def server():
    s = LocalUpstream(keep_alive=True)
    s.routes["/v2/r/manifests/1"] = Reply(200, MANIFEST, [("Content-Type", "application/json")])
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def client():
    c = Upstream(ssl.create_default_context(), timeout=5.0, backoff=0.0)
    try:
        yield c
    finally:
        c.close()


def target(server: LocalUpstream) -> Target:
    return Target("127.0.0.1", server.port, "http")


def test_sequential_requests_share_one_connection(server, client):
    for _ in range(10):
        status, _, body = fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
        assert (status, body) == (200, MANIFEST)
        fetch(client, "HEAD", target(server), "/v2/r/manifests/1", [])
    assert server.connections == 1


def test_blob_read_with_read1_to_its_end_is_reused(server, client):
    server.routes["/v2/r/blobs/b"] = Reply(200, b"x" * 300_000)
    for _ in range(3):
        resp = client.request("GET", target(server), "/v2/r/blobs/b", [])
        got = b""
        while chunk := resp.read1(65536):
            got += chunk
        resp.close()
        assert got == b"x" * 300_000
    assert server.connections == 1


def test_a_body_not_read_to_its_end_is_never_reused(server, client):
    server.routes["/v2/r/blobs/b"] = Reply(200, b"y" * 200_000)
    resp = client.request("GET", target(server), "/v2/r/blobs/b", [])
    assert resp.read(10) == b"yyyyyyyyyy"
    resp.close()  # the rest of the body is still on the wire: it must not become the next "response"
    status, _, body = fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    assert (status, body) == (200, MANIFEST)
    assert server.connections == 2


def test_discard_closes_even_a_finished_response(server, client):
    resp = client.request("GET", target(server), "/v2/r/manifests/1", [])
    assert resp.read_all(1 << 20) == MANIFEST
    resp.discard()
    resp.close()  # after discard: nothing left to release
    fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    assert server.connections == 2


def test_connection_close_is_honoured(server, client):
    server.routes["/v2/r/manifests/2"] = Reply(200, MANIFEST, [("Connection", "close")])
    for _ in range(3):
        status, _, body = fetch(client, "GET", target(server), "/v2/r/manifests/2", [])
        assert (status, body) == (200, MANIFEST)
    assert server.connections == 3


def test_idle_connection_closed_by_the_server_is_replaced(server, client):
    fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    server.drop_connections()
    status, _, body = fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    assert (status, body) == (200, MANIFEST)
    assert server.connections == 2


def test_request_on_a_connection_closed_under_it_is_retried_once(server, client, monkeypatch):
    # The server closes the idle connection just as it is taken: the failure shows only when
    # the request is sent or the status line read.
    monkeypatch.setattr(upstream_mod, "_quiet", lambda sock: True)
    fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    server.drop_connections()
    status, _, body = fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    assert (status, body) == (200, MANIFEST)
    assert server.connections == 2
    assert server.count("GET", "/v2/r/manifests/1") == 2


def test_idle_timeout(server, client, monkeypatch):
    fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    monkeypatch.setattr(client._pool, "idle_timeout", 0.0)
    fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    assert server.connections == 2


def test_redirect_drains_and_reuses_the_registry_connection(server, client):
    server.routes["/v2/r/blobs/c"] = Reply(307, b"moved" * 10, [("Location", "/cdn/c")])
    server.routes["/cdn/c"] = Reply(200, b"z" * 1000)
    for _ in range(5):
        status, _, body = fetch(client, "GET", target(server), "/v2/r/blobs/c", [])
        assert (status, body) == (200, b"z" * 1000)
    assert server.connections <= 2


def test_concurrent_threads_get_their_own_bodies(server, client):
    for i in range(8):
        server.routes[f"/v2/r/manifests/t{i}"] = Reply(200, f"manifest {i} ".encode() * (i + 100))
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(20):
            status, _, body = fetch(client, "GET", target(server), f"/v2/r/manifests/t{i}", [])
            if (status, body) != (200, f"manifest {i} ".encode() * (i + 100)):
                errors.append(f"thread {i}: {status} {body[:40]!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert server.connections <= 8 + 4


def test_http_1_0_server_gets_a_connection_per_request(client):
    plain = LocalUpstream()
    plain.routes["/x"] = Reply(200, b"abc")
    try:
        for _ in range(3):
            assert fetch(client, "GET", Target("127.0.0.1", plain.port, "http"), "/x", [])[2] == b"abc"
        assert plain.connections == 3
    finally:
        plain.close()


def test_a_body_cut_short_by_the_server_is_not_pooled(server, client):
    server.routes["/v2/r/blobs/short"] = Reply(200, b"s" * 100_000, close_after=1000)
    resp = client.request("GET", target(server), "/v2/r/blobs/short", [])
    got = b""
    while chunk := resp.read1(65536):
        got += chunk
    resp.close()
    assert got == b"s" * 1000
    assert client._pool._idle == {}


def test_the_exchange_deadline_covers_a_reused_socket_and_lets_go_of_it_on_release(server, client):
    fetch(client, "GET", target(server), "/v2/r/manifests/1", [])
    resp = client.request("GET", target(server), "/v2/r/manifests/1", [])
    assert server.connections == 1  # reused
    deadline = resp._deadline
    assert resp._sock in deadline._socks  # a stuck upstream is cut off at the deadline on this socket too
    resp.read_all(1 << 20)
    resp.close()
    assert deadline._socks == []  # expiring later must not shut down the pooled connection

"""egress.py and its config keys: the egress proxy's settings, its credentials, its CONNECT."""

from __future__ import annotations

import base64
import socket
import threading

import pytest

from regcachelib.config import ConfigError, parse_config
from regcachelib.egress import EgressProxy, EgressProxyError, parse_no_proxy


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "cfg.yaml")
    return str(ei.value)


def test_config_builds_the_proxy_with_credentials_from_a_file_never_shown(tmp_path):
    secret = tmp_path / "proxy-auth"
    secret.write_text("alice:s3cret\n")
    cfg = parse_config(f"upstream_proxy: http://proxy.corp:3128\nupstream_proxy_auth: {{file: {secret}}}\n"
                       "upstream_no_proxy: [.corp.example, 10.0.0.0/8]\n")
    proxy = cfg.upstream_proxy
    assert proxy.address == ("proxy.corp", 3128) and str(proxy) == "http://proxy.corp:3128"
    assert proxy.authorization == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert "s3cret" not in repr(proxy) and "s3cret" not in repr(cfg) and proxy.authorization not in repr(cfg)


def test_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("PROXY_AUTH", "bob:pw")
    cfg = parse_config("upstream_proxy: http://10.1.1.1:8080\nupstream_proxy_auth: {env: PROXY_AUTH}\n")
    assert cfg.upstream_proxy.authorization == "Basic " + base64.b64encode(b"bob:pw").decode()


@pytest.mark.parametrize("text, expected", [
    ("upstream_proxy: http://user:pw@proxy:3128\n", "credentials do not belong in the URL"),
    ("upstream_proxy: https://proxy:3128\n", "only http:// egress proxies"),
    ("upstream_proxy: http://proxy:3128/path\n", "without a path"),
    ("upstream_no_proxy: [.corp]\n", "upstream_no_proxy without upstream_proxy"),
    ("upstream_proxy: http://p:1\nupstream_proxy_auth: {env: REGCACHE_UNSET_VARIABLE}\n", "is not set"),
    ("upstream_proxy: http://p:1\nupstream_proxy_auth: alice:pw\n", "expected {file:"),
    ("upstream_proxy: http://p:1\nupstream_no_proxy: [10.0.0.0/33]\n", "not a network"),
])
def test_bad_settings_are_refused_with_their_location(text, expected):
    message = error_of(text)
    assert expected in message and message.startswith("cfg.yaml:"), message
    assert ":pw@" not in message  # a password in the URL is not repeated in the error


def test_a_secret_without_colon_is_refused_without_showing_it(tmp_path):
    secret = tmp_path / "auth"
    secret.write_text("justatoken")
    message = error_of(f"upstream_proxy: http://p:1\nupstream_proxy_auth: {{file: {secret}}}\n")
    assert "user:password" in message and "justatoken" not in message


def test_no_proxy_rules_and_loopback():
    proxy = EgressProxy("proxy", 3128, no_proxy=parse_no_proxy(["corp.example", ".internal", "10.0.0.0/8", "::1"]))
    for direct in ("corp.example", "reg.corp.example", "a.b.internal", "10.2.3.4", "127.0.0.1", "localhost", "[::1]"):
        assert not proxy.used_for(direct), direct
    for proxied in ("registry-1.docker.io", "notcorp.example", "11.0.0.1", "internal.example"):
        assert proxy.used_for(proxied), proxied
    assert not EgressProxy("p", 1, no_proxy=parse_no_proxy(["*"])).used_for("quay.io")


class FakeProxy:
    """A TCP server that answers one CONNECT with `answer` and then sends `after`."""

    def __init__(self, answer: bytes, after: bytes = b""):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.request = b""
        self.answer, self.after = answer, after
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            conn.sendall(self.answer + self.after)
            conn.recv(1)  # until the client closes


def test_connect_sends_credentials_and_leaves_the_tunnel_bytes_unread():
    fake = FakeProxy(b"HTTP/1.1 200 Connection established\r\n\r\n", after=b"\x16\x03\x01TLS")
    proxy = EgressProxy("127.0.0.1", fake.port, authorization="Basic Zm9vOmJhcg==")
    sock = proxy.open_tunnel("registry.example", 443, 5.0)
    with sock:
        assert sock.recv(100) == b"\x16\x03\x01TLS"  # the server's first bytes are the TLS layer's
    assert fake.request.startswith(b"CONNECT registry.example:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n" in fake.request


@pytest.mark.parametrize("status, hint",
                         [(403, "access rules"), (407, "upstream_proxy_auth"), (502, "could not reach")])
def test_a_refused_connect_says_who_refused_what(status, hint):
    fake = FakeProxy(f"HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n".encode())
    proxy = EgressProxy("127.0.0.1", fake.port)
    with pytest.raises(EgressProxyError) as ei:
        proxy.open_tunnel("quay.io", 443, 5.0)
    assert ei.value.status == status
    message = str(ei.value)
    assert f"egress proxy http://127.0.0.1:{fake.port} refused CONNECT to quay.io:443: {status} Nope" in message
    assert hint in message


def test_an_unreachable_proxy_is_named():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(EgressProxyError, match=rf"egress proxy http://127.0.0.1:{port} unreachable"):
        EgressProxy("127.0.0.1", port).open_tunnel("quay.io", 443, 2.0)


def test_relayed_flows_go_via_the_proxy_but_not_to_the_blob_server_or_no_proxy_hosts():
    from mitmproxy.test import tflow

    from regcachelib.egressroute import EgressRoute

    route = EgressRoute()
    route.config = parse_config("upstream_proxy: http://proxy.corp:3128\nupstream_no_proxy: [.corp.example]\n")
    via = ("http", ("proxy.corp", 3128))

    def routed(host: str, blobserver: bool = False):
        flow = tflow.tflow()
        flow.request.host = host
        if blobserver:
            flow.metadata["regcache.blobserver"] = True
        route.requestheaders(flow)
        route.request(flow)
        return flow.server_conn.via

    assert routed("quay.io") == via
    assert routed("registry.corp.example") is None
    assert routed("127.0.0.1", blobserver=True) is None
    # a mirror's pass-through changes the host in `request`: decided again there
    flow = tflow.tflow()
    flow.request.host = "quay.io"
    route.requestheaders(flow)
    flow.request.host = "mirror.corp.example"
    route.request(flow)
    assert flow.server_conn.via is None
    route.config = parse_config("")
    assert routed("quay.io") is None

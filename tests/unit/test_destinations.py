"""destinations.py: the proxy refuses to connect into the cache host (loopback, link-local,
unspecified, its own addresses) unless proxy_allow says otherwise.

Driven through RegistryCache's real addon list (DestinationPolicy is its child addon): hooks
are invoked on the parent, as mitmproxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket

import pytest
from mitmproxy import connection, hooks
from mitmproxy.proxy.layers.http import HttpConnectHook, HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.proxy.server_hooks import ServerConnectHook, ServerConnectionHookData
from mitmproxy.test import taddons, tflow, tutils

from regcachelib import addon as addon_module
from regcachelib import destinations
from regcachelib.addon import RegistryCache
from regcachelib.blobserver import FASTPATH_PREFIX, Ticket
from regcachelib.config import ConfigError, parse_config
from regcachelib.destinations import DestinationPolicy, classify

from .test_addon import add_proxyserver_options

PUBLIC = "198.51.100.7"  # TEST-NET-2: never an address of the test machine


@pytest.fixture(autouse=True)
def cache_dir_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(addon_module, "DEFAULT_DIR", str(tmp_path / "cache"))


@contextlib.asynccontextmanager
async def running(tmp_path, config: str = "fastpath: false\n"):
    cfg = tmp_path / "regcache.yaml"
    cfg.write_text(config)
    rc = RegistryCache()
    with taddons.context(rc) as tctx:
        add_proxyserver_options(tctx)
        tctx.configure(rc, regcache_dir=str(tmp_path / "cache"), regcache_config=str(cfg))
        await tctx.master.addons.invoke_addon(rc, hooks.RunningHook())  # the children too
        try:
            yield rc, tctx
        finally:
            await tctx.master.addons.invoke_addon(rc, hooks.DoneHook())


def proxy_flow(host: str, port: int, path: str = "/status.json", method: str = "GET", mode: str = "regular",
               scheme: str = "http"):
    req = tutils.treq(host=host, port=port, scheme=scheme.encode(), method=method.encode(), path=path.encode(),
                      authority=b"", content=b"")
    flow = tflow.tflow(req=req)
    flow.client_conn.proxy_mode = ProxyMode.parse(mode)
    return flow


def connect_flow(host: str, port: int):
    req = tutils.treq(host=host, port=port, scheme=b"", method=b"CONNECT", path=b"",
                      authority=f"{host}:{port}".encode(), content=b"")
    flow = tflow.tflow(req=req)
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    return flow


async def request_headers(rc, tctx, flow):
    await tctx.master.addons.invoke_addon(rc, HttpRequestHeadersHook(flow))
    return flow


async def server_connect(rc, tctx, host: str, port: int, mode: str = "regular"):
    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse(mode)
    server = connection.Server(address=(host, port))
    data = ServerConnectionHookData(client=client, server=server)
    await tctx.master.addons.invoke_addon(rc, ServerConnectHook(data))
    return data


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def refusal(flow) -> dict:
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers["content-type"] == "application/json"
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "DENIED"
    return error


# --- what is refused ----------------------------------------------------------------------


@pytest.mark.parametrize("address, refused", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("169.254.169.254", True), ("fe80::1", True), ("0.0.0.0", True), ("0.1.2.3", True), ("::", True),
    ("10.77.1.5", False), ("192.168.1.1", False), ("172.16.0.1", False), ("fd00::5", False), (PUBLIC, False),
])
def test_classify_refuses_loopback_link_local_unspecified(address, refused):
    assert (classify(ipaddress.ip_address(address), frozenset()) is not None) == refused


def test_classify_refuses_the_hosts_own_private_address():
    own = ipaddress.ip_address("10.77.0.1")
    assert classify(own, frozenset({own})) == "an address of the cache host itself"
    assert classify(ipaddress.ip_address("10.77.0.2"), frozenset({own})) is None


def test_local_addresses_lists_this_hosts_interfaces():
    found = destinations.local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found
    # the address this host uses towards the outside is one of them
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((PUBLIC, 9))  # picks a route; sends nothing
        except OSError:
            pytest.skip("no route out of this machine")
        assert ipaddress.ip_address(s.getsockname()[0]) in found


# --- requests get a 403 -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "169.254.169.254", "0.0.0.0", "::1"])
def test_request_to_loopback_or_link_local_is_answered_403(tmp_path, host):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            flow = await request_headers(rc, tctx, proxy_flow(host, 9090))
            error = refusal(flow)
            assert any(why in error["message"] for why in ("loopback", "link-local", "unspecified"))
            assert error["detail"] == {"host": host, "port": 9090}
            await tctx.master.addons.invoke_addon(rc, HttpRequestHook(flow))
            assert flow.response.status_code == 403  # RegistryCache leaves an answered flow alone
    run(go())


def test_request_to_the_hosts_own_address_is_refused(tmp_path):
    own = next(a for a in destinations.local_addresses() if not a.is_loopback and not a.is_link_local)

    async def go():
        async with running(tmp_path) as (rc, tctx):
            error = refusal(await request_headers(rc, tctx, proxy_flow(str(own), 8080)))
            assert "address of the cache host itself" in error["message"]
    run(go())


def test_request_to_private_or_public_network_passes(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            for host in ("10.77.1.5", PUBLIC):
                assert (await request_headers(rc, tctx, proxy_flow(host, 80))).response is None
    run(go())


def test_refused_upload_is_answered_not_streamed(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            flow = await request_headers(rc, tctx, proxy_flow("127.0.0.1", 5000, "/v2/x/blobs/uploads/", "POST"))
            refusal(flow)
            assert not flow.request.stream  # mitmproxy cannot stream a request it has answered
    run(go())


def test_connect_to_loopback_is_answered_403(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            flow = connect_flow("127.0.0.1", 9090)
            await tctx.master.addons.invoke_addon(rc, HttpConnectHook(flow))
            refusal(flow)
            ok = connect_flow("10.77.1.5", 443)
            await tctx.master.addons.invoke_addon(rc, HttpConnectHook(ok))
            assert ok.response is None
    run(go())


def test_transparent_mode_checks_the_original_destination(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            flow = proxy_flow("127.0.0.1", 443, "/", mode="transparent", scheme="https")
            refusal(await request_headers(rc, tctx, flow))
    run(go())


def test_mirror_request_is_not_the_clients_choice(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            flow = proxy_flow("127.0.0.1", 5000, "/v2/", mode="reverse:http://127.0.0.1:5000")
            flow = await request_headers(rc, tctx, flow)
            assert flow.response is None
    run(go())


def test_fastpath_redirect_back_through_the_proxy_passes(tmp_path):
    """fastpath: always and a client without NO_PROXY: the redirect to our own address comes
    back through the proxy; RegistryCache serves it from its blob server."""
    own = next(a for a in destinations.local_addresses() if not a.is_loopback and not a.is_link_local)

    async def go():
        async with running(tmp_path, "fastpath: always\nfastpath_port: 0\nfastpath_bind: 127.0.0.1\n") as (rc, tctx):
            port = rc.blobserver.fastpath_port
            flow = await request_headers(rc, tctx, proxy_flow(str(own), port, FASTPATH_PREFIX + "x"))
            assert flow.response is None
            refusal(await request_headers(rc, tctx, proxy_flow(str(own), port, "/other")))
    run(go())


# --- proxy_allow -------------------------------------------------------------------------------


def test_proxy_allow_opens_exactly_what_it_names(tmp_path):
    async def go():
        config = "fastpath: false\nproxy_allow: ['127.0.0.1:9090', 'localhost:5000', '169.254.0.0/16']\n"
        async with running(tmp_path, config) as (rc, tctx):
            for host, port in (("127.0.0.1", 9090), ("localhost", 5000), ("169.254.169.254", 80)):
                assert (await request_headers(rc, tctx, proxy_flow(host, port))).response is None, (host, port)
                assert (await server_connect(rc, tctx, host, port)).server.error is None, (host, port)
            for host, port in (("127.0.0.1", 9091), ("localhost", 9091), ("::1", 9090)):
                refusal(await request_headers(rc, tctx, proxy_flow(host, port)))
                assert (await server_connect(rc, tctx, host, port)).server.error is not None, (host, port)
    run(go())


def test_proxy_allow_is_validated_with_its_location():
    config = parse_config("proxy_allow: ['10.0.0.0/8', '[::1]:5000', 'registry.corp', '*.corp:5000', '127.0.0.1']\n")
    assert [str(r.network or r.host) for r in config.proxy_allow] == [
        "10.0.0.0/8", "::1/128", "registry.corp", "*.corp", "127.0.0.1/32"]
    assert [r.port for r in config.proxy_allow] == [None, 5000, None, 5000, None]
    for bad in ("proxy_allow: ['10.0.0.1/8']", "proxy_allow: ['host:0']", "proxy_allow: ['300.1.1.1']",
                "proxy_allow: ['not a host']", "proxy_allow: 127.0.0.1", "proxy_allow: [5]"):
        with pytest.raises(ConfigError, match=r"<config>:1:\d+: proxy_allow"):
            parse_config(bad)


# --- server_connect: the connection itself -----------------------------------------------------


def test_server_connect_refuses_loopback_by_name_and_address(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            for host in ("127.0.0.1", "localhost", "::1"):
                data = await server_connect(rc, tctx, host, 9090)
                assert "does not proxy" in data.server.error, host
    run(go())


def test_server_connect_pins_the_checked_address(tmp_path, monkeypatch):
    """DNS rebinding: the name is resolved once, checked, and connected to as that address,
    which the open connection keeps (mitmproxy refuses to change an open connection's address)."""
    answers = iter([[ipaddress.ip_address(PUBLIC)], [ipaddress.ip_address("127.0.0.1")]])

    async def rebinding(host, port, transport):
        return next(answers)

    async def go():
        async with running(tmp_path) as (rc, tctx):
            monkeypatch.setattr(DestinationPolicy, "_resolve", staticmethod(rebinding))
            data = await server_connect(rc, tctx, "rebind.example", 443)
            assert data.server.error is None and data.server.address == (PUBLIC, 443)
            again = await server_connect(rc, tctx, "rebind.example", 443)  # now it says 127.0.0.1
            assert "127.0.0.1 is a loopback address" in again.server.error
    run(go())


def test_server_connect_fails_when_the_name_does_not_resolve(tmp_path, monkeypatch):
    async def unresolvable(host, port, transport):
        raise OSError("Name or service not known")

    async def go():
        async with running(tmp_path) as (rc, tctx):
            monkeypatch.setattr(DestinationPolicy, "_resolve", staticmethod(unresolvable))
            data = await server_connect(rc, tctx, "nowhere.example", 443)
            assert data.server.error.startswith("cannot resolve nowhere.example")
    run(go())


def test_server_connect_allows_the_inband_blob_server_and_a_mirrors_target(tmp_path):
    async def go():
        async with running(tmp_path) as (rc, tctx):
            inband = rc.blobserver.inband_port
            assert (await server_connect(rc, tctx, "127.0.0.1", inband)).server.error is None
            # a client cannot ask for it itself: only regcache's routing sends flows there
            refusal(await request_headers(rc, tctx, proxy_flow("127.0.0.1", inband, "/anything")))
            assert (await server_connect(rc, tctx, "127.0.0.1", inband + 1 if inband < 65535 else 1)).server.error
            mirror = await server_connect(rc, tctx, "127.0.0.1", 5000, mode="reverse:http://127.0.0.1:5000")
            assert mirror.server.error is None
            other = await server_connect(rc, tctx, "127.0.0.1", 5001, mode="reverse:http://127.0.0.1:5000")
            assert other.server.error is not None  # a mirror retargeted elsewhere is checked as usual
            upstream = await server_connect(rc, tctx, "127.0.0.1", 3128, mode="upstream:http://127.0.0.1:3128")
            assert upstream.server.error is None
    run(go())


def test_blob_routed_inband_passes_the_policy(tmp_path):
    """A registry blob request through HTTPS_PROXY is routed to the in-band blob server on
    127.0.0.1 by RegistryCache itself; the policy must let that connection through."""
    async def go():
        async with running(tmp_path) as (rc, tctx):
            blob = "/v2/library/x/blobs/sha256:" + "a" * 64
            flow = await request_headers(rc, tctx, proxy_flow("registry-1.docker.io", 443, blob, scheme="https"))
            assert flow.response is None
            rc.route_to_blobserver(flow, Ticket("sha256:" + "a" * 64, "HIT", None))
            assert (flow.request.host, flow.request.port) == ("127.0.0.1", rc.blobserver.inband_port)
            assert (await server_connect(rc, tctx, flow.request.host, flow.request.port)).server.error is None
    run(go())

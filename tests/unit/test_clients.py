"""client_networks: who may use the cache at all, through the real addon tree."""

from __future__ import annotations

import pytest
from mitmproxy.proxy.server_hooks import ClientConnectedHook
from mitmproxy.test import tflow

from regcachelib.clients import ClientNetworks
from regcachelib.config import ConfigError, parse_config

from .test_destinations import run, running


def test_empty_allowlist_allows_everyone():
    assert ClientNetworks().allows("203.0.113.9")


@pytest.mark.parametrize("address, allowed", [
    ("10.1.2.3", True), ("10.2.0.1", False), ("::ffff:10.1.0.7", True), ("fd00::1", False),
    ("127.0.0.1", True), ("::1", True), (None, False), ("not-an-address", False),
])
def test_allowlist_admits_its_networks_and_loopback(address, allowed):
    networks = parse_config("client_networks: [10.1.0.0/16]\n").client_networks
    assert ClientNetworks(networks).allows(address) is allowed


def test_client_networks_must_be_networks():
    with pytest.raises(ConfigError, match="client_networks"):
        parse_config("client_networks: [not-a-network]\n")


async def connected(rc, tctx, address: str):
    client = tflow.tclient_conn()
    client.peername = (address, 40000)
    await tctx.master.addons.invoke_addon(rc, ClientConnectedHook(client))
    return client


def test_a_client_outside_client_networks_is_disconnected(tmp_path, caplog):
    async def go():
        async with running(tmp_path, "fastpath: false\nclient_networks: [10.1.0.0/16]\n") as (rc, tctx):
            assert (await connected(rc, tctx, "10.1.4.5")).error is None
            assert (await connected(rc, tctx, "127.0.0.1")).error is None
            for _ in range(3):
                assert (await connected(rc, tctx, "192.0.2.7")).error == "not in client_networks"
        async with running(tmp_path, "fastpath: false\n") as (rc, tctx):
            assert (await connected(rc, tctx, "192.0.2.7")).error is None  # no list: everyone
    run(go())
    refusals = [r for r in caplog.records if "not in client_networks" in r.getMessage()]
    assert len(refusals) == 1  # logged once per address, not per connection

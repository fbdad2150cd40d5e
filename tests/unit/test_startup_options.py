"""addon.py start-up and option changes, through mitmproxy's taddons: the blob server follows
regcache_dir, a refused directory keeps the store in force, an option given twice is an error,
and only what a config file names counts as asked for."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from regcachelib import addon as addon_module
from regcachelib.addon import RegistryCache
from regcachelib.blobserver import Ticket
from regcachelib.config import parse_config

from .helpers import http_request, stage_and_commit


@pytest.fixture(autouse=True)
def cache_dir_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(addon_module, "DEFAULT_DIR", str(tmp_path / "default-cache"))


def add_proxyserver_options(tctx) -> None:
    """connection_strategy belongs to mitmproxy's Proxyserver addon, which taddons does not load."""
    if "connection_strategy" not in tctx.options:
        tctx.options.add_option("connection_strategy", str, "eager", "", choices=("eager", "lazy"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_changing_regcache_dir_while_running_moves_the_blob_server_too(tmp_path):
    async def main():
        cfg = tmp_path / "regcache.yaml"
        cfg.write_text("fastpath: false\n")
        rc = RegistryCache()
        with taddons.context(rc) as tctx:
            add_proxyserver_options(tctx)
            tctx.configure(rc, regcache_dir=str(tmp_path / "one"), regcache_config=str(cfg))
            await rc.running()
            try:
                in_one = stage_and_commit(rc.store, b"only in one")
                tctx.configure(rc, regcache_dir=str(tmp_path / "two"))
                in_two = stage_and_commit(rc.store, b"only in two")
                # blob bodies come from the store the addon now answers from, not the old one
                resp = await http_request(rc.blobserver.inband_port, rc.blobserver.issue(Ticket(in_two, "HIT")))
                assert (resp.status, resp.body) == (200, b"only in two")
                resp = await http_request(rc.blobserver.inband_port, rc.blobserver.issue(Ticket(in_one, "HIT")))
                assert resp.status == 404
                assert rc.blobserver.fills is rc.fills and rc.fills.store is rc.store
            finally:
                await rc.done()

    run(main())


def test_a_refused_regcache_dir_keeps_the_store_in_force(tmp_path):
    async def main():
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        rc = RegistryCache()
        with taddons.context(rc) as tctx:
            tctx.configure(rc, regcache_dir=str(tmp_path / "one"))
            digest = stage_and_commit(rc.store, b"kept")
            with pytest.raises(exceptions.OptionsError, match="is not usable"):
                tctx.configure(rc, regcache_dir=str(blocker / "cache"))
            assert tctx.options.regcache_dir == str(tmp_path / "one")
            assert rc.store.has_blob(digest)  # still open and answering
            await rc.done()

    run(main())


def test_a_regcache_option_given_twice_is_an_error_at_load(tmp_path, caplog):
    """mitmproxy would refuse it after load, where nobody sees it, and never run regcache."""
    rc = RegistryCache()
    with taddons.context() as tctx:
        twice = (f"regcache_dir={tmp_path / 'a'}", f"regcache_dir={tmp_path / 'b'}")
        tctx.options.set(*twice, "regcache_offline=true", defer=True)
        with caplog.at_level(logging.ERROR):
            with pytest.raises(exceptions.OptionsError):  # mitmproxy's own refusal, after load
                tctx.master.addons.register(rc)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"regcache_dir is set 2 times ('{tmp_path / 'a'}', '{tmp_path / 'b'}'): give it once"]


def test_only_settings_the_file_names_are_explicit():
    assert parse_config("fastpath: true\n").explicit == {"fastpath"}
    assert parse_config("fastpath_port: 5080\nsize_limit: 1GiB\n").explicit == {"fastpath_port", "size_limit"}
    assert parse_config("").explicit == set()

"""Which HTTP version TLS clients get: HTTP/1.1 unless the operator sets mitmproxy's http2 option.

Blob bodies stream through mitmproxy; over HTTP/2 its h2 library cuts every 64 KiB read into
16 KiB DATA frames in Python, and a 1 GiB hit costs about a quarter more CPU (bench/README.md).
"""

from __future__ import annotations

import logging

import pytest
from mitmproxy import options
from mitmproxy.test import taddons

from regcachelib import addon as addon_module
from regcachelib.addon import RegistryCache


@pytest.fixture(autouse=True)
def cache_dir_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(addon_module, "DEFAULT_DIR", str(tmp_path / "default-cache"))


def test_tls_clients_get_http1_by_default(caplog):
    assert options.Options().http2 is True  # mitmproxy's own default offers h2
    caplog.set_level(logging.INFO, logger="regcachelib.addon")
    with taddons.context(RegistryCache()) as tctx:
        assert tctx.options.http2 is False
    assert "--set http2=true offers HTTP/2" in caplog.text


@pytest.mark.parametrize("asked", [True, False])
def test_an_explicit_http2_setting_is_kept(asked, caplog):
    """--set http2=... (or the confdir's config.yaml) is applied before scripts load: it wins."""
    opts = options.Options()
    opts.update(http2=asked)
    caplog.set_level(logging.INFO, logger="regcachelib.addon")
    with taddons.context(RegistryCache(), options=opts) as tctx:
        assert tctx.options.http2 is asked
    assert "offering HTTP/1.1" not in caplog.text


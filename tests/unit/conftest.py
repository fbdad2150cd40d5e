"""Fixtures of the unit tests (helpers live in helpers.py)."""

from __future__ import annotations

import pytest

from regcachelib.store import Store

from .helpers import LocalUpstream


@pytest.fixture
def upstream_server():
    server = LocalUpstream()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "cache"))
    try:
        yield s
    finally:
        s.close()


def pytest_configure(config):
    # mitmproxy's dependencies warn on import; not ours to fix, and noise in every run.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ldap3.*")
    config.addinivalue_line("filterwarnings", "ignore:'crypt' is deprecated:DeprecationWarning")

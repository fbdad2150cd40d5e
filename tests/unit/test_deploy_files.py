"""The operator-facing deployment files, checked by the tools that will read them: the systemd
unit by systemd-analyze, the Kubernetes manifests by a schema validator, .dockerignore by the
matching rules Docker applies."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from regcachelib.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "regcache.service"
VENV_BIN = Path(sys.executable).parent


# --- systemd --------------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> values of a unit file (continuation lines joined, comments dropped)."""
    settings: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def installed_unit(tmp_path):
    """The unit as installed by the README, with /opt/regcache pointing at this checkout's venv:
    systemd-analyze checks that ExecStart names an executable."""
    prefix = tmp_path / "opt-regcache"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / ".venv" / "bin" / "mitmdump").symlink_to(VENV_BIN / "mitmdump")
    unit = tmp_path / "regcache.service"
    unit.write_text(UNIT.read_text().replace("/opt/regcache", str(prefix)))
    return unit


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd; ./test.sh does)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies_without_a_warning(installed_unit):
    # systemd-analyze verify exits 0 on unknown keys and only warns: any output is a mistake
    p = systemd_analyze("verify", str(installed_unit))
    assert p.returncode == 0 and p.stderr.strip() == "" and p.stdout.strip() == "", p.stderr + p.stdout


def test_systemd_verify_catches_a_misspelt_setting(installed_unit):
    # the check above can fail: a typo in a hardening option is reported
    installed_unit.write_text(installed_unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    p = systemd_analyze("verify", str(installed_unit))
    assert "Unknown key" in p.stderr


def test_systemd_unit_is_sandboxed(installed_unit):
    # systemd's own exposure score (0 = fully sandboxed, 10 = not at all); 2.0 is well inside "OK"
    p = systemd_analyze("security", "--offline=true", "--threshold=20", str(installed_unit))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    assert re.search(r"Overall exposure level for regcache.service: [01]\.\d OK", p.stdout), p.stdout[-500:]


def test_systemd_unit_runs_as_regcache_with_state_and_ca_where_the_readme_says():
    settings = unit_settings(UNIT.read_text())
    assert settings["User"] == ["regcache"] and settings["StateDirectory"] == ["regcache"]
    exec_start = settings["ExecStart"][0].split()
    assert exec_start[:3] == ["/opt/regcache/.venv/bin/mitmdump", "-s", "/opt/regcache/addons/regcache.py"]
    sets = dict(exec_start[i + 1].split("=", 1) for i, a in enumerate(exec_start) if a == "--set")
    assert sets["confdir"] == "/etc/regcache"
    assert sets["regcache_dir"].startswith("/var/lib/regcache/")
    # the service may write its state and nothing else
    assert settings["ProtectSystem"] == ["strict"] and settings["ReadWritePaths"] == ["/var/lib/regcache"]
    for option in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert settings[option] == ["yes"], option
    # the README installs the sample config where ExecStart reads it, and it is valid
    readme = (ROOT / "README.md").read_text()
    assert "deploy/systemd/regcache.yml /etc/regcache/regcache.yml" in readme
    assert sets["regcache_config"] == "/etc/regcache/regcache.yml"
    load_config(str(SYSTEMD / "regcache.yml"))

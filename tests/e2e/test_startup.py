"""Issue 10.2: it runs clean, or it does not run.

A user's own --set wins over run.sh's and the container entrypoint's defaults (mitmproxy drops
an option given twice and then never loads regcache); a cache directory regcache cannot use,
or a port it was explicitly asked to serve and cannot bind, stops mitmdump with a clear message
and a non-zero exit; only a default port degrades with a warning.

Real parts: run.sh, docker/entrypoint.sh and mitmdump in the router namespace, curl in the
client namespace through the proxy to the world's docker.io.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regcachelib.store import Store

from .conftest import FASTPATH_PORT, MIRROR_PORT, PROXY_PORT, ROOT, Regcache
from .test_singleflight import DOCKER_API, curl, pull_token

pytestmark = pytest.mark.e2e

VENV = Path(sys.executable).parent.parent
MANIFEST_ACCEPT = ("Accept: application/vnd.docker.distribution.manifest.v2+json, "
                   "application/vnd.oci.image.manifest.v1+json")


def fetch_manifest(world, rc: Regcache, tmp_path: Path, name: str):
    """GET docker.io/library/small:1's manifest by digest through the proxy, with a pull token."""
    image = world.image("docker.io/library/small:1")
    token = pull_token(world, "library/small")
    url = f"{DOCKER_API}/v2/library/small/manifests/{image.digest}"
    c = curl(world, rc, url, tmp_path / name, headers=[f"Authorization: Bearer {token}", MANIFEST_ACCEPT])
    return c.run(), image.digest


def run_until_exit(world, rc: Regcache, timeout: float = 30) -> float:
    """Start rc's mitmdump and wait for it to end by itself; seconds it took."""
    rc.log = open(rc.log_path, "ab")
    t0 = time.monotonic()
    rc.proc = world.popen(world.ns_router, rc.argv, env=rc.env, stdout=rc.log, stderr=subprocess.STDOUT)
    try:
        rc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log = rc.log_text()
        rc.log_errors_expected = "stopped by the test that found it running"
        rc.stop()
        raise AssertionError(f"mitmdump still runs after {timeout}s: {log[-3000:]}") from None
    return time.monotonic() - t0


class PortHolder:
    """Something else already listening on a port in the router namespace."""

    def __init__(self, world, port: int, host: str = "0.0.0.0"):
        code = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(({host!r}, {port}))\ns.listen()\nprint('ready', flush=True)\ntime.sleep(600)\n")
        self.proc = world.popen(world.ns_router, [sys.executable, "-c", code], stdout=subprocess.PIPE)

    def __enter__(self):
        assert self.proc.stdout.readline() == b"ready\n"
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# --- the user's value wins --------------------------------------------------------------------------


def test_run_sh_uses_the_cache_dir_the_user_sets(world, tmp_path):
    """`./run.sh --set regcache_dir=X` (the README's way to pass mitmdump options) caches in X."""
    mine = tmp_path / "my-cache"
    rc = Regcache(world, tmp_path / "rc", mine, [], {}, None)
    rc.argv = [str(ROOT / "run.sh"), "--set", f"regcache_dir={mine}", "--set", f"confdir={rc.confdir}",
               "--set", f"ssl_verify_upstream_trusted_ca={world.ca_cert_path}", "--set", "termlog_verbosity=info"]
    rc.env = {"REGCACHE_VENV": str(VENV)}
    try:
        rc.start((PROXY_PORT, MIRROR_PORT))
        first, digest = fetch_manifest(world, rc, tmp_path, "first")
        assert first.exit_code == 0 and first.status == 200, first.describe() + rc.log_text()[-3000:]
        second, _ = fetch_manifest(world, rc, tmp_path, "second")
        assert second.status == 200, second.describe() + rc.log_text()[-3000:]
        assert second.headers.get("x-cache") == "HIT", second.describe()
        assert f"cache {mine}" in rc.log_text()
    finally:
        rc.stop()
    store = Store(str(mine))
    try:
        assert store.get_manifest(digest) is not None
    finally:
        store.close()


def test_entrypoint_uses_the_options_the_user_sets(world, tmp_path):
    """docker/entrypoint.sh with `--set regcache_dir=X --set regcache_metrics=Y`: regcache runs
    on X and serves its status page on Y (not the entrypoint's REGCACHE_DIR / REGCACHE_METRICS)."""
    mine, default = tmp_path / "my-cache", tmp_path / "env-cache"
    rc = Regcache(world, tmp_path / "rc", mine, [], {}, None)
    rc.argv = [str(ROOT / "docker" / "entrypoint.sh"), "--set", f"regcache_dir={mine}",
               "--set", "regcache_metrics=127.0.0.1:9191",
               "--set", f"ssl_verify_upstream_trusted_ca={world.ca_cert_path}"]
    rc.env = {
        "PATH": f"{VENV / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "REGCACHE_DIR": str(default),
        "REGCACHE_CERTS": str(tmp_path / "certs"),
        "REGCACHE_RUNTIME": str(tmp_path / "run"),
        "REGCACHE_METRICS": "127.0.0.1:9090",
        "REGCACHE_MODES": f"--mode regular@{PROXY_PORT}",
        "REGCACHE_ADDON": str(ROOT / "addons" / "regcache.py"),
        "REGCACHE_USER": "no-such-user-here",  # stays root (test_deploy covers the privilege drop)
    }
    try:
        rc.start((PROXY_PORT, 9191))
        status = json.loads(world.run(world.ns_router, ["curl", "-sf", "http://127.0.0.1:9191/status.json"]).stdout)
        assert status["directory"] == str(mine)
        assert not default.exists()
    finally:
        rc.stop()


def test_an_option_given_twice_stops_the_start(world, tmp_path):
    """mitmproxy would drop it and never load regcache: a plain proxy that caches nothing."""
    rc = Regcache(world, tmp_path / "rc", tmp_path / "a", [f"regular@{PROXY_PORT}"], {"regcache_dir": tmp_path / "b"},
                  None)
    took = run_until_exit(world, rc)
    log = rc.log_text()
    assert rc.proc.returncode != 0 and took < 20, log
    assert f"regcache_dir is set 2 times ('{tmp_path / 'a'}', '{tmp_path / 'b'}')" in log, log
    rc.check_log()


# --- no store, no start --------------------------------------------------------------------------------


@pytest.mark.mitmdump_log_errors("mitmproxy logs a refused option of a script at start-up with its traceback")
@pytest.mark.parametrize("case", ["not-a-directory", "read-only"])
def test_a_cache_dir_regcache_cannot_use_stops_the_start(world, tmp_path, case):
    if case == "not-a-directory":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory\n")
        cache_dir, reason = blocker / "cache", "[Errno 20] Not a directory"
    else:
        # A store made earlier, now on a read-only mount (root ignores permission bits).
        cache_dir, reason = tmp_path / "cache", "unable to open database file"
        Store(str(cache_dir)).close()
    rc = Regcache(world, tmp_path / "rc", cache_dir, [f"regular@{PROXY_PORT}"], {}, None)
    if case == "read-only":
        remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        rc.argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", remount, str(cache_dir), *rc.argv]
    took = run_until_exit(world, rc)
    log = rc.log_text()
    assert rc.proc.returncode != 0 and took < 20, log
    assert f"regcache_dir '{cache_dir}' is not usable: {reason}" in log, log
    assert "Error logged during startup, exiting" in log


# --- ports it was asked to serve --------------------------------------------------------------------


def test_an_explicit_metrics_port_in_use_stops_the_start(world, tmp_path):
    rc = Regcache(world, tmp_path / "rc", tmp_path / "cache", [f"regular@{PROXY_PORT}"],
                  {"regcache_metrics": "127.0.0.1:9191"}, None)
    with PortHolder(world, 9191, "127.0.0.1"):
        took = run_until_exit(world, rc)
    log = rc.log_text()
    assert rc.proc.returncode != 0 and took < 20, log
    assert "cannot listen on regcache_metrics=127.0.0.1:9191 for metrics and the status page: [Errno 98]" in log, log
    rc.check_log()


def test_an_explicit_fastpath_port_in_use_stops_the_start(world, tmp_path):
    rc = Regcache(world, tmp_path / "rc", tmp_path / "cache", [f"regular@{PROXY_PORT}"], {},
                  f"fastpath_port: {FASTPATH_PORT}\n")
    with PortHolder(world, FASTPATH_PORT):
        took = run_until_exit(world, rc)
    log = rc.log_text()
    assert rc.proc.returncode != 0 and took < 20, log
    config = rc.workdir / "regcache.yml"
    where = f"0.0.0.0:{FASTPATH_PORT} (fastpath_port/fastpath_bind in {config})"
    assert f"cannot listen on the fast path {where}" in log, log
    rc.check_log()


def test_the_default_fastpath_port_in_use_degrades_with_a_warning(world, regcache_factory, tmp_path):
    """Nobody asked for :5080 by name: regcache starts and serves blobs in-band instead."""
    with PortHolder(world, FASTPATH_PORT):
        rc = regcache_factory()
        first, _ = fetch_manifest(world, rc, tmp_path, "first")
        assert first.status == 200, first.describe()
        assert rc.proc.poll() is None
    assert f"fast path disabled, cannot listen on its default port 0.0.0.0:{FASTPATH_PORT}" in rc.log_text()

"""Fixtures for end-to-end tests: the namespace world and regcache (mitmdump) processes in it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.world import World

ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = str(Path(sys.executable).parent / "mitmdump")
SHIM = str(ROOT / "addons" / "regcache.py")

PROXY_PORT = 8080
TRANSPARENT_PORT = 8081
MIRROR_PORT = 5000
FASTPATH_PORT = 5080
# Small stored blobs are answered inline by default, fast-path clients too; tests that prove a
# client follows the fast-path redirect for its hits (the world's images are small) turn that off.
FASTPATH_EVERY_BLOB = "fastpath_inline_max: 0\n"
WORLD_UPSTREAM_NET = "10.77.1.0/24"  # tests.world's upstream hosts, the blob CDN among them

# A mitmdump log holding one of these shows a bug (an exception escaped regcache or mitmproxy),
# whatever else the test checked: the test fails.
LOG_FAILURES = ("Addon error", "Traceback (most recent call last)")
LOG_MARKER = "mitmdump_log_errors"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{LOG_MARKER}(reason): this test provokes an Addon error or a traceback in mitmdump's log on purpose; "
        "the reason says which and why (without the marker such a log fails the test)",
    )


def _can_run_e2e() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root (network namespaces, iptables)"
    if shutil.which("ip") is None or shutil.which("docker-registry") is None:
        return "iproute2 and docker-registry are required (./test.sh installs them)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _can_run_e2e()
    for item in items:
        if "e2e" in str(item.fspath) and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)
        if reason and item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def world():
    with World() as w:
        yield w


class Regcache:
    """One mitmdump + regcache process in the router namespace."""

    def __init__(self, world: World, workdir: Path, cache_dir: Path, modes: list[str], options: dict,
                 config: str | None, log_errors_expected: str | None = None):
        self.world = world
        # Why this process's log may show an Addon error or a traceback (the test provokes one);
        # None: stop() fails if it does.
        self.log_errors_expected = log_errors_expected
        self._log_checked_upto = 0
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.confdir = workdir / "mitmproxy-conf"
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "mitmdump.log"
        argv = [MITMDUMP, "-s", SHIM, "--set", f"confdir={self.confdir}", "--set", f"regcache_dir={cache_dir}"]
        argv += ["--set", f"ssl_verify_upstream_trusted_ca={world.ca_cert_path}", "--set", "termlog_verbosity=info"]
        for mode in modes:
            argv += ["--mode", mode]
        # The world's blob CDN sits on a private address, where regcache follows no redirect
        # unless told to: every regcache here is told so, unless a test says otherwise.
        config = config if config is not None else ""
        if "redirect_allow" not in config:
            separator = "\n" if config.strip() else ""
            config = config.rstrip("\n") + separator + f"redirect_allow: [{WORLD_UPSTREAM_NET}]\n"
        cfg = workdir / "regcache.yml"
        cfg.write_text(config)
        argv += ["--set", f"regcache_config={cfg}"]
        for k, v in options.items():
            argv += ["--set", f"{k}={v}"]
        self.argv = argv
        self.env: dict | None = None  # added to the environment mitmdump starts with
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ports=(PROXY_PORT,)) -> "Regcache":
        self.log = open(self.log_path, "ab")
        self.proc = self.world.popen(self.world.ns_router, self.argv, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        for port in wait_ports:
            while not self._listening(port):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mitmdump exited: {self.log_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mitmdump did not listen on {port}: {self.log_text()[-3000:]}")
                time.sleep(0.1)
        return self

    def _listening(self, port: int) -> bool:
        r = self.world.run(self.world.ns_router, ["ss", "-Htln", f"sport = :{port}"], check=False)
        return bool(r.stdout.strip())

    def stop(self) -> None:
        """Stop mitmdump, then fail if its log shows an Addon error or a traceback."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.check_log()

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.check_log()  # what it logged before the kill must be clean all the same

    def check_log(self) -> None:
        """AssertionError if the log written since the last check holds one of LOG_FAILURES."""
        text = self.log_text()
        new, self._log_checked_upto = text[self._log_checked_upto:], len(text)
        if self.log_errors_expected:
            return
        for pattern in LOG_FAILURES:
            at = new.find(pattern)
            if at >= 0:
                excerpt = new[max(0, at - 1500):at + 2500]
                raise AssertionError(f"mitmdump log {self.log_path} shows {pattern!r} (mark the test "
                                     f"{LOG_MARKER}(reason) if it provokes this on purpose):\n{excerpt}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def client_bundle(self) -> Path:
        """System roots + the test CA + this regcache's CA: what a client trusts."""
        bundle = self.workdir / "client-bundle.pem"
        bundle.write_bytes(Path(self.world.ca_bundle_path).read_bytes() + self.ca_cert.read_bytes())
        return bundle

    def cert_dir(self) -> Path:
        """A directory for skopeo/podman --cert-dir style trust (ca.crt files)."""
        d = self.workdir / "certs.d"
        d.mkdir(exist_ok=True)
        (d / "test-ca.crt").write_bytes(Path(self.world.ca_cert_path).read_bytes())
        (d / "regcache-ca.crt").write_bytes(self.ca_cert.read_bytes())
        return d


def log_errors_expected(request) -> str | None:
    """The reason a test gave with @pytest.mark.mitmdump_log_errors(reason), or None."""
    marker = request.node.get_closest_marker(LOG_MARKER)
    if marker is None:
        return None
    reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
    assert reason, f"{LOG_MARKER} needs a reason"
    return reason


@pytest.fixture
def regcache_factory(world, tmp_path, request):
    started: list[Regcache] = []
    expected = log_errors_expected(request)

    def make(cache_dir=None, modes=(f"regular@{PROXY_PORT}",), options=None, config=None, wait_ports=None) -> Regcache:
        n = len(started)
        workdir = tmp_path / f"regcache{n}"
        workdir.mkdir()
        rc = Regcache(world, workdir, Path(cache_dir or workdir / "cache"), list(modes), dict(options or {}), config,
                      expected)
        ports = wait_ports or [int(m.rsplit("@", 1)[1]) for m in modes if "@" in m]
        started.append(rc)
        return rc.start(ports)

    yield make
    failures = []
    try:
        for rc in started:
            try:
                rc.stop()
            except AssertionError as e:
                failures.append(str(e))
    finally:
        world.start_upstream()
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


def skopeo_copy(world: World, src: str, dest_dir: Path, env: dict, extra=(), timeout=180) -> subprocess.CompletedProcess:
    """skopeo copy in the client namespace into a fresh dir: layout (manifest kept verbatim)."""
    if dest_dir.exists():
        shutil.rmtree(dest_dir)
    argv = ["skopeo", "copy", *extra, src, f"dir:{dest_dir}"]
    return world.run(world.ns_client, argv, env=env, check=False, timeout=timeout)


CACHE_ONLY = " (from the cache, upstream stopped)"


def pull_twice(world: World, items, pull, client=lambda round_name: round_name, only_first=()):
    """Pull every item into a fresh client, then again into another fresh client with the
    upstream stopped: the second round can only come from the cache.

    client(round_name) makes the client of a round ("a", then "b": a store, a daemon...; one with
    a stop() is stopped after its round); pull(client, item, note) pulls one item and checks it,
    note saying which round it is in. Items in only_first are left out of the second round.
    Returns the second round's client, still running.
    """
    first = client("a")
    for item in items:
        pull(first, item, "")
    if hasattr(first, "stop"):
        first.stop()
    world.stop_upstream()
    try:
        second = client("b")
        for item in items:
            if item not in only_first:
                pull(second, item, CACHE_ONLY)
        return second
    finally:
        world.start_upstream()


def dir_manifest_digest(layout: Path) -> str:
    """Digest of the manifest skopeo received, byte for byte."""
    import hashlib

    return "sha256:" + hashlib.sha256((layout / "manifest.json").read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a daemon's process group, wait, then SIGKILL whatever is left of it."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def router_client_iface(world: World) -> str:
    out = world.run(world.ns_router, ["ip", "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        if f" {world.router_client_ip}/" in line:
            return line.split()[1].split("@")[0]
    raise RuntimeError("router has no client-side interface")


class TransparentRedirect:
    """iptables REDIRECT of the client's HTTPS (port 443) to regcache's transparent listener,
    in the router namespace; always removed again."""

    def __init__(self, world: World, port: int = TRANSPARENT_PORT):
        self.world = world
        self.rule = ["PREROUTING", "-i", router_client_iface(world), "-p", "tcp", "--dport", "443", "-j", "REDIRECT", "--to-ports", str(port)]

    def __enter__(self):
        self.world.run(self.world.ns_router, ["iptables", "-t", "nat", "-A", *self.rule])
        return self

    def __exit__(self, *exc):
        self.world.run(self.world.ns_router, ["iptables", "-t", "nat", "-D", *self.rule], check=False)


@pytest.fixture
def transparent(world):
    with TransparentRedirect(world) as t:
        yield t


def mirror_registries_conf(path: Path, mirror: str, registries=("docker.io", "quay.io", "gcr.io", "registry.k8s.io", "ghcr.io")) -> Path:
    """containers-registries.conf(5): every registry mirrored through regcache's mirror
    listener; docker.io without a path prefix, the others as path-prefix mirrors."""
    blocks = ['unqualified-search-registries = ["docker.io"]']
    for reg in registries:
        location = mirror if reg == "docker.io" else f"{mirror}/{reg}"
        blocks.append(f'[[registry]]\nprefix = "{reg}"\nlocation = "{reg}"\n\n[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n')
    path.write_text("\n".join(blocks))
    return path


@pytest.fixture
def netns():
    """A bare network namespace of its own (only lo), for tests that need no world; every
    process left in it is killed and the namespace removed afterwards."""
    import signal

    name = f"rcns{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name])

"""dockerd + `docker pull` through each way in: HTTPS_PROXY, transparent (iptables REDIRECT),
registry mirror.

Every pull phase gets its own private dockerd (vfs storage, no bridge, no iptables) with a
fresh data-root, started in the client namespace. dockerd does the pulling, so the proxy
environment and the CA bundle (SSL_CERT_FILE) go to dockerd, never to the docker CLI, which
only talks to the daemon's unix socket.

dockerd cannot start under `ip netns exec` (that remounts /sys and cgroups vanish:
"Devices cgroup isn't mounted"), so it is entered with `nsenter --net` into the client
namespace plus `unshare -m` for a private mount namespace in which the namespace's hosts and
resolv.conf and an empty /etc/docker (dockerd writes key.json there) are bind-mounted, and a
tmpfs covers /run (dockerd creates /run/docker/plugins). Nothing is written to the host's
/etc, /run or /var/lib; every mount dockerd makes stays in that namespace and disappears
with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import FASTPATH_EVERY_BLOB, MIRROR_PORT, PROXY_PORT, TRANSPARENT_PORT, pull_twice, stop_process_group

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOCKERD = shutil.which("dockerd")
DOCKER = shutil.which("docker")
NEEDS = [n for n in ("dockerd", "docker", "containerd", "nsenter", "unshare") if shutil.which(n) is None]
if NEEDS:
    pytestmark.append(pytest.mark.skip(reason=f"not installed: {', '.join(NEEDS)} (./test.sh installs docker.io)"))

DOCKER_IO = "docker.io/library/s2:1"
OTHER = "ghcr.io/owner/small:1"
MULTI = "docker.io/library/multi:1"


class Dockerd:
    """A private dockerd in the client namespace; everything it writes is under one short
    directory in /tmp (unix socket paths must stay under 108 bytes)."""

    def __init__(self, world, name: str, env: dict | None = None, daemon_json: dict | None = None):
        self.world = world
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"rcdk-{name}-", dir="/tmp"))
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.etc = self.root / "etc-docker"
        self.cli_config = self.root / "cli"
        for d in (self.data_root, self.exec_root, self.etc, self.cli_config):
            d.mkdir()
        self.config_file = self.root / "daemon.json"
        self.config_file.write_text(json.dumps(daemon_json or {}))
        self.log_path = self.root / "dockerd.log"
        self.host = f"unix://{self.root}/docker.sock"
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Dockerd":
        ns = self.world.hosts_file(self.world.ns_client).parent
        argv = [
            "nsenter", f"--net=/run/netns/{self.world.ns_client}",
            "unshare", "-m", "--propagation", "private",
            "sh", "-c", 'mount -t tmpfs -o mode=755 regcache-dockerd-run /run && mount --bind "$1" /etc/hosts '
            '&& mount --bind "$2" /etc/resolv.conf && mount --bind "$3" /etc/docker && shift 3 && exec "$@"', "sh",
            str(ns / "hosts"), str(ns / "resolv.conf"), str(self.etc),
            DOCKERD, "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "docker.pid"), "--config-file", str(self.config_file),
            "-H", self.host,
        ]
        env = self.world.base_env({"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **self.env})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            r = self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
            if r.returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd {self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd {self.name} not ready after {timeout}s:\n{r.stderr}\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def docker(self, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), "DOCKER_CONFIG": str(self.cli_config)}
        r = subprocess.run([DOCKER, "-H", self.host, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}): {r.stderr}\n{self.log_text()[-3000:]}")
        return r

    def inspect(self, ref: str, fmt: str):
        return json.loads(self.docker("image", "inspect", "--format", "{{json " + fmt + "}}", ref).stdout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _leftover_pids(self) -> list[int]:
        """Processes still running with our directory on their command line (containerd)."""
        mark = str(self.root).encode()
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if mark in (p / "cmdline").read_bytes():
                        pids.append(int(p.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, 20)  # on SIGTERM dockerd stops its containerd itself
            self.proc = None
        # containerd runs in its own session; dockerd's SIGTERM (or its parent-death signal)
        # normally ends it, this is the backstop.
        deadline = time.monotonic() + 10
        while (pids := self._leftover_pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        # the mounts were made in a private mount namespace that is gone now
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def dockerd(world):
    """Factory: dockerd(name, env=..., daemon_json=...) -> started Dockerd; all stopped at the end."""
    started: list[Dockerd] = []

    def make(name: str, env: dict | None = None, daemon_json: dict | None = None) -> Dockerd:
        d = Dockerd(world, name, env, daemon_json)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


def expected(world, ref: str, platform: str | None):
    """(repo digest, image ID) docker must report for ref (pulled for platform)."""
    image = world.image(ref)
    config = image.child(platform).config_digest if platform else image.config_digest
    return image.manifest_digest, config


def pull_and_check(d: Dockerd, world, ref: str, platform: str | None, why: str = "") -> None:
    args = ["pull", "-q", *(["--platform", platform] if platform else []), ref]
    d.docker(*args)
    repo_digest, image_id = expected(world, ref, platform)
    digests = d.inspect(ref, ".RepoDigests")
    assert [x.split("@", 1)[1] for x in digests] == [repo_digest], f"{ref}{why}: {digests}"
    assert d.inspect(ref, ".Id") == image_id, f"{ref}{why}"
    if platform:
        assert d.inspect(ref, ".Architecture") == platform.split("/")[1]


def pull_with_docker(world, rc, dockerd, env, pulls, daemon_json=None, only_first=()):
    """Each (ref, platform) pulled into a fresh dockerd (new data-root) per round, twice
    (conftest.pull_twice). Refs in only_first are left out of the second round."""
    return pull_twice(world, pulls,
                      lambda daemon, pull, note: pull_and_check(daemon, world, pull[0], pull[1], note),
                      client=lambda round_name: dockerd(round_name, env, daemon_json),
                      only_first=[pull for pull in pulls if pull[0] in only_first])


def manifest_gets(world, host: str, repo: str) -> list[str]:
    return [e["path"] for e in world.request_log(host) if e["method"] == "GET" and e["path"].startswith(f"/v2/{repo}/manifests/")]


def test_docker_https_proxy(world, regcache_factory, dockerd):
    """HTTPS_PROXY in dockerd's environment. (daemon.json "proxies" arrived in dockerd 23.0;
    Debian 12's dockerd 20.10 refuses it: "the following directives don't match any
    configuration option: https-proxy".) Also pulls a multi-arch image for linux/arm64: only the arm64
    child manifest is fetched, and it is served from the cache the second time."""
    rc = regcache_factory()
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
    world.clear_request_logs()
    pull_with_docker(world, rc, dockerd, env, [(DOCKER_IO, None), (OTHER, None), (MULTI, "linux/arm64")])
    log = rc.log_text()
    multi = world.image(MULTI)
    arm, amd = multi.child("linux/arm64").digest, multi.child("linux/amd64").digest
    assert f"GET manifest registry=docker.io repo=library/multi digest={arm} outcome=MISS" in log
    assert f"GET manifest registry=docker.io repo=library/multi digest={arm} outcome=HIT" in log
    assert amd not in log
    # upstream saw the tag (or its HEAD), the index and the arm64 child, never the amd64 child
    fetched = manifest_gets(world, "docker.io", "library/multi")
    assert f"/v2/library/multi/manifests/{arm}" in fetched, fetched
    assert set(fetched) <= {"/v2/library/multi/manifests/1", f"/v2/library/multi/manifests/{multi.digest}", f"/v2/library/multi/manifests/{arm}"}, fetched
    for repo in ("library/s2", "owner/small", "library/multi"):
        assert re.search(rf"GET manifest registry=\S+ repo={repo} \S+ outcome=HIT", log), repo


def test_docker_transparent(world, regcache_factory, dockerd, transparent):
    """No proxy configuration at all: the router redirects the client's port 443 to regcache;
    dockerd only trusts regcache's CA (SSL_CERT_FILE)."""
    rc = regcache_factory(modes=[f"transparent@{TRANSPARENT_PORT}"], config=FASTPATH_EVERY_BLOB)
    env = {"SSL_CERT_FILE": str(rc.client_bundle())}
    pull_with_docker(world, rc, dockerd, env, [(DOCKER_IO, None), (OTHER, None)])
    log = rc.log_text()
    for repo in ("library/s2", "owner/small"):
        assert re.search(rf"GET manifest registry=\S+ repo={repo} \S+ outcome=MISS", log), repo
        assert re.search(rf"GET manifest registry=\S+ repo={repo} \S+ outcome=HIT", log), repo
        # blob bodies of hits went over the fast path (307 to the plain-HTTP blob endpoint)
        assert re.search(rf"GET blob registry=\S+ repo={repo} \S+ outcome=HIT via=fastpath", log), repo


def test_docker_mirror(world, regcache_factory, dockerd):
    """daemon.json "registry-mirrors": dockerd uses mirrors for Docker Hub images only; every
    other registry is always pulled directly. So the docker.io image comes through regcache
    (and from its cache with the upstream stopped), while the ghcr.io image is shown to go
    straight to ghcr.io: regcache never sees it, and with the upstream stopped it cannot be
    pulled from a fresh store."""
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"])
    env = {"SSL_CERT_FILE": str(rc.client_bundle())}
    mirrors = {"registry-mirrors": [f"http://{world.router_client_ip}:{MIRROR_PORT}"]}
    world.clear_request_logs()
    second = pull_with_docker(world, rc, dockerd, env, [(DOCKER_IO, None), (OTHER, None)], mirrors, only_first=(OTHER,))
    log = rc.log_text()
    assert "manifest registry=docker.io repo=library/s2 tag=1 outcome=MISS" in log, log[-3000:]
    assert "manifest registry=docker.io repo=library/s2 tag=1 outcome=HIT" in log, log[-3000:]
    assert "registry=ghcr.io" not in log  # pulled directly, not through the mirror
    assert manifest_gets(world, "ghcr.io", "owner/small"), "ghcr.io was not contacted directly"
    world.stop_upstream()
    try:
        out = second.docker("pull", "-q", OTHER, check=False, timeout=120)
    finally:
        world.start_upstream()
    assert out.returncode != 0, "ghcr.io image pulled with upstream stopped: it must not be cached via the mirror"
    assert "registry=ghcr.io" not in rc.log_text()

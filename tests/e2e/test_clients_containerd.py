"""containerd + `ctr images pull` through each way in: HTTPS_PROXY, transparent (iptables
REDIRECT), registry mirror (hosts.toml, `?ns=<registry>`).

Every pull phase gets its own private containerd (native snapshotter, CRI disabled) with a
fresh root/state and its own socket, started in the client namespace. ctr resolves and
fetches the registry itself (containerd only stores and unpacks), so the proxy environment
and the CA bundle (SSL_CERT_FILE) go to ctr. Everything is under one short directory in /tmp
(unix socket paths must stay under 108 bytes), removed at the end of the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import FASTPATH_EVERY_BLOB, MIRROR_PORT, PROXY_PORT, TRANSPARENT_PORT, pull_twice, stop_process_group

pytestmark = [pytest.mark.e2e]
NEEDS = [n for n in ("containerd", "ctr") if shutil.which(n) is None]
if NEEDS:
    pytestmark.append(pytest.mark.skip(reason=f"not installed: {', '.join(NEEDS)} (./test.sh installs containerd)"))

DOCKER_IO = "docker.io/library/s2:1"
OTHER = "ghcr.io/owner/small:1"
MULTI_DOCKER = "docker.io/library/multi:1"  # docker manifest list
MULTI_OCI = "quay.io/org/multi-oci:1"  # OCI index
BASIC = [(DOCKER_IO, None), (OTHER, None)]

# Plugins a pull does not need (and that would touch host state or complain in a netns).
DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
]


class Containerd:
    """A private containerd in the client namespace, driven with ctr."""

    def __init__(self, world, base: Path, name: str, ctr_env: dict | None = None, hosts_dir: Path | None = None):
        self.world = world
        self.name = name
        self.root = base / name
        self.root.mkdir()
        self.sock = self.root / "ctrd.sock"
        self.config = self.root / "config.toml"
        plugins = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.root}/root"\n'
            f'state = "{self.root}/state"\n'
            f'temp = "{self.root}/tmp"\n'
            f"disabled_plugins = [{plugins}]\n"
            "[grpc]\n"
            f'  address = "{self.sock}"\n'
            "[ttrpc]\n"
            f'  address = "{self.root}/ctrd.sock.ttrpc"\n'
            "[debug]\n"
            '  level = "info"\n'
            "[plugins]\n"
            '  [plugins."io.containerd.internal.v1.opt"]\n'
            f'    path = "{self.root}/opt"\n'
        )
        (self.root / "tmp").mkdir()
        self.log_path = self.root / "containerd.log"
        self.hosts_dir = hosts_dir
        self.ctr_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.root),
            "CONTAINERD_SNAPSHOTTER": "native",  # `ctr images check` looks at unpacks too
            **(ctr_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "Containerd":
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(self.root), "TMPDIR": str(self.root / "tmp")}
        with open(self.log_path, "ab") as log:
            self.proc = self.world.popen(self.world.ns_client, ["containerd", "--config", self.config], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            r = self.ctr("version", check=False, timeout=10)
            if r.returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd {self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd {self.name} not ready after {timeout}s:\n{r.stderr}\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def ctr(self, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
        r = self.world.run(self.world.ns_client, ["ctr", "--address", self.sock, *args], env=self.ctr_env, check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(map(str, args))} ({self.name}) failed ({r.returncode}):\n{r.stderr}\n{r.stdout}")
        return r

    def pull(self, ref: str, platform: str | None = None) -> subprocess.CompletedProcess:
        args = ["images", "pull", "--snapshotter", "native"]
        if self.hosts_dir is not None:
            args += ["--hosts-dir", str(self.hosts_dir)]
        if platform:
            args += ["--platform", platform]
        return self.ctr(*args, ref)

    def image_digest(self, ref: str) -> str:
        """The target digest containerd recorded for ref (`ctr images ls`)."""
        out = self.ctr("images", "ls", f"name=={ref}").stdout.splitlines()
        rows = [line.split() for line in out[1:] if line.strip()]
        assert len(rows) == 1 and rows[0][0] == ref, out
        return rows[0][2]

    def content_digests(self) -> set[str]:
        out = self.ctr("content", "ls", "-q").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc, 15)
        self.proc = None


@pytest.fixture
def containerd(world):
    """Factory: containerd(name, ctr_env=..., hosts_dir=...) -> started Containerd; all
    stopped and their directory removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="rcct-", dir="/tmp"))
    started: list[Containerd] = []

    def make(name: str, ctr_env: dict | None = None, hosts_dir: Path | None = None) -> Containerd:
        c = Containerd(world, base, name, ctr_env, hosts_dir)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.stop()
    # native snapshots are plain directories; the mounts of an unpack were made in the
    # netns' private mount namespace and are gone with containerd
    shutil.rmtree(base, ignore_errors=True)


def pull_and_check(c: Containerd, world, rc, ref: str, platform: str | None, why: str = "") -> None:
    try:
        c.pull(ref, platform)
    except AssertionError as e:
        raise AssertionError(f"{ref}{why}: {e}\n--- regcache log ---\n{rc.log_text()[-3000:]}") from None
    image = world.image(ref)
    assert c.image_digest(ref) == image.manifest_digest, f"{ref}{why}"
    content = c.content_digests()
    if platform:
        # the index, the child for the asked platform and its blobs; no other child
        child = image.child(platform)
        assert {image.manifest_digest, child.digest, *child.blobs} <= content, f"{ref}{why}: {content}"
        others = {d for p, d in image.platform_digests.items() if d != child.digest}
        assert others and not (others & content), f"{ref}{why}: fetched other platforms: {content}"
        assert f"digest={child.digest} outcome=" in rc.log_text(), f"{ref}{why}: {child.digest} not fetched through regcache"
    else:
        assert image.manifest_digest in content and image.config_digest in content, f"{ref}{why}: {content}"
        status = c.ctr("images", "check", f"name=={ref}").stdout.splitlines()
        assert len(status) == 2 and "incomplete" not in status[1], status
        assert " complete (" in status[1] and status[1].split()[-1] == "true", status  # unpacked


def pull_with_containerd(world, rc, containerd, pulls, ctr_env=None, hosts_dir=None):
    """Each (ref, platform) pulled into a fresh containerd per round, twice (conftest.pull_twice)."""
    second = pull_twice(world, pulls,
                        lambda c, pull, note: pull_and_check(c, world, rc, pull[0], pull[1], note),
                        client=lambda _round_name: containerd(_round_name, ctr_env, hosts_dir))
    second.stop()


@pytest.mark.slow
def test_containerd_https_proxy(world, regcache_factory, containerd):
    rc = regcache_factory()
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
    pull_with_containerd(world, rc, containerd, [*BASIC, (MULTI_DOCKER, "linux/arm64")], ctr_env=env)
    log = rc.log_text()
    assert "registry=docker.io" in log and "registry=ghcr.io" in log
    assert "outcome=HIT" in log


def test_containerd_transparent(world, regcache_factory, containerd, transparent):
    rc = regcache_factory(modes=[f"transparent@{TRANSPARENT_PORT}"], config=FASTPATH_EVERY_BLOB)
    pull_with_containerd(world, rc, containerd, BASIC, ctr_env={"SSL_CERT_FILE": str(rc.client_bundle())})
    log = rc.log_text()
    assert "outcome=MISS" in log and "outcome=HIT" in log
    assert "outcome=HIT via=fastpath" in log


def test_containerd_mirror(world, regcache_factory, containerd, tmp_path):
    """One `_default` mirror for every registry; containerd names the registry in `?ns=`."""
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"])
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "_default").mkdir(parents=True)
    (hosts_dir / "_default" / "hosts.toml").write_text(
        f'[host."http://{world.router_client_ip}:{MIRROR_PORT}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    env = {"SSL_CERT_FILE": str(rc.client_bundle())}  # auth.docker.io is still reached directly
    pull_with_containerd(world, rc, containerd, [*BASIC, (MULTI_OCI, "linux/arm64")], ctr_env=env, hosts_dir=hosts_dir)
    log = rc.log_text()
    assert "registry=docker.io" in log and "registry=ghcr.io" in log and "registry=quay.io" in log
    assert "outcome=HIT" in log

"""podman pull through each way in: HTTPS_PROXY, transparent (iptables REDIRECT), registry mirror.

podman pulls in its own process (no daemon), run in the client namespace. Every pull phase
gets a fresh store (`--root`/`--runroot`, vfs) in a private directory under /tmp (podman
refuses a runroot longer than 50 characters, so not under pytest's tmp_path; removed after
the test), and podman reads only configuration written here: containers.conf
(CONTAINERS_CONF), storage.conf (CONTAINERS_STORAGE_CONF), registries.conf
(CONTAINERS_REGISTRIES_CONF), policy.json, an empty auth file.

Two paths of podman 4.3 cannot be configured: the blob info cache
(/var/lib/containers/cache, shared with the host's skopeo/podman) and netavark's run
directory (/run/containers/networks). `ip netns exec` already gives each command a private
mount namespace (slave of the host's), so podman runs with empty tmpfs mounted over /run
and /var/lib there: nothing of the host's is read or written and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .conftest import FASTPATH_EVERY_BLOB, MIRROR_PORT, PROXY_PORT, TRANSPARENT_PORT, mirror_registries_conf, pull_twice

pytestmark = [pytest.mark.e2e]
if shutil.which("podman") is None:
    pytestmark.append(pytest.mark.skip(reason="podman is not installed (./test.sh installs it)"))

DOCKER_IO = "docker.io/library/s2:1"
OTHER = "ghcr.io/owner/small:1"
IMAGES = [DOCKER_IO, OTHER]
# podman's command line follows; mounts stay in this command's mount namespace (see above)
PRIVATE_MOUNTS = 'mount -t tmpfs -o mode=755 regcache-podman-run /run && mount -t tmpfs -o mode=755 regcache-podman-varlib /var/lib && exec "$@"'


class Podman:
    """podman with everything it reads or writes under one directory."""

    def __init__(self, world, base: Path, env: dict | None = None, registries_conf: Path | None = None, cert_dir: Path | None = None):
        self.world = world
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.tmp = base / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.registries_conf = registries_conf or self._write(base / "registries.conf", 'unqualified-search-registries = ["docker.io"]\n')
        self.storage_conf = self._write(base / "storage.conf", f'[storage]\ndriver = "vfs"\nrunroot = "{base}/default-run"\ngraphroot = "{base}/default-root"\n')
        self.containers_conf = self._write(
            base / "containers.conf",
            "[engine]\n"
            'events_logger = "none"\n'
            'cgroup_manager = "cgroupfs"\n'
            'lock_type = "file"\n'
            f'tmp_dir = "{base}/libpod-tmp"\n'
            f'image_copy_tmp_dir = "{self.tmp}"\n'
            "[network]\n"
            f'network_config_dir = "{base}/networks"\n',
        )
        self.policy = self._write(base / "policy.json", json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.cert_dir = cert_dir
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(base),
            "TMPDIR": str(self.tmp),
            "XDG_RUNTIME_DIR": str(base / "xdg-run"),
            "XDG_CONFIG_HOME": str(base / "xdg-config"),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "REGISTRY_AUTH_FILE": str(world.auth_file),
            **(env or {}),
        }

    @staticmethod
    def _write(path: Path, text: str) -> Path:
        path.write_text(text)
        return path

    def run(self, store: str, *args, check=True, timeout=180):
        root = self.base / store
        argv = ["sh", "-c", PRIVATE_MOUNTS, "sh", "podman", "--root", root / "root", "--runroot", root / "run", "--storage-driver", "vfs",
                "--tmpdir", root / "libpod-tmp", "--events-backend", "none", "--cgroup-manager", "cgroupfs", *args]
        r = self.world.run(self.world.ns_client, argv, env=self.env, check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} ({store}) failed ({r.returncode}):\n{r.stderr}")
        return r

    def pull(self, store: str, ref: str, *extra):
        trust = ["--cert-dir", str(self.cert_dir)] if self.cert_dir else []
        return self.run(store, "pull", "--signature-policy", str(self.policy), "--authfile", str(self.world.auth_file), *trust, *extra, ref)

    def digest(self, store: str, ref: str) -> str:
        return self.run(store, "image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()

    def repo_digests(self, store: str, ref: str) -> list[str]:
        return json.loads(self.run(store, "image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout)

    def cleanup(self) -> None:
        # vfs layers are plain directories; nothing is mounted for a pull
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def podman(world):
    made: list[Podman] = []

    def make(**kw) -> Podman:
        p = Podman(world, Path(tempfile.mkdtemp(prefix="rcpm-", dir="/tmp")), **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


def pull_and_check(p: Podman, store: str, world, ref: str, rc, why: str = "") -> None:
    try:
        p.pull(store, ref)
    except AssertionError as e:
        raise AssertionError(f"{ref}{why}: {e}\n--- regcache log ---\n{rc.log_text()[-3000:]}") from None
    want = world.image(ref).manifest_digest
    assert p.digest(store, ref) == want, f"{ref}{why}"
    assert f"{ref.rsplit(':', 1)[0]}@{want}" in p.repo_digests(store, ref), f"{ref}{why}"


def pull_with_podman(world, rc, p: Podman, refs=IMAGES) -> None:
    """Each image pulled into a store of its round ("a", "b"), twice (conftest.pull_twice)."""
    pull_twice(world, refs, lambda store, ref, note: pull_and_check(p, store, world, ref, rc, note))


@pytest.mark.slow
def test_podman_https_proxy(world, regcache_factory, podman):
    rc = regcache_factory()
    p = podman(env={"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())})
    pull_with_podman(world, rc, p)
    log = rc.log_text()
    assert "registry=docker.io" in log and "registry=ghcr.io" in log
    assert "outcome=HIT" in log


def test_podman_transparent(world, regcache_factory, podman, transparent):
    rc = regcache_factory(modes=[f"transparent@{TRANSPARENT_PORT}"], config=FASTPATH_EVERY_BLOB)
    # trust via --cert-dir (system roots + the *.crt files in it), no SSL_CERT_FILE
    p = podman(cert_dir=rc.cert_dir())
    pull_with_podman(world, rc, p)
    log = rc.log_text()
    assert "outcome=MISS" in log and "outcome=HIT" in log
    assert "outcome=HIT via=fastpath" in log


def test_podman_mirror(world, regcache_factory, podman, tmp_path):
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"])
    conf = mirror_registries_conf(tmp_path / "registries.conf", f"{world.router_client_ip}:{MIRROR_PORT}")
    p = podman(env={"SSL_CERT_FILE": str(rc.client_bundle())}, registries_conf=conf)
    pull_with_podman(world, rc, p)
    log = rc.log_text()
    assert "registry=ghcr.io" in log and "registry=docker.io" in log
    assert "outcome=HIT" in log



@pytest.mark.slow
def test_podman_multiarch_platform_through_proxy(world, regcache_factory, podman):
    """--platform linux/arm64 on an OCI index: podman records the index digest and the arm64
    child it fetched through regcache; again from a fresh store with the upstream stopped."""
    rc = regcache_factory()
    p = podman(env={"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())})
    ref = "quay.io/org/multi-oci:1"
    image = world.image(ref)
    child = image.child("linux/arm64")
    for store, why in (("a", ""), ("b", " (from the cache, upstream stopped)")):
        if store == "b":
            world.stop_upstream()
        try:
            p.pull(store, ref, "--platform", "linux/arm64")
            assert p.digest(store, ref) == image.manifest_digest, why
            assert set(p.repo_digests(store, ref)) == {f"quay.io/org/multi-oci@{image.manifest_digest}", f"quay.io/org/multi-oci@{child.digest}"}, why
            out = p.run(store, "image", "inspect", "--format", "{{.Architecture}} {{.Id}}", ref).stdout.split()
            assert out == ["arm64", child.config_digest.split(":", 1)[1]], why
        finally:
            world.start_upstream()
    assert f"digest={child.digest} outcome=MISS" in rc.log_text()
    assert f"digest={child.digest} outcome=HIT" in rc.log_text()

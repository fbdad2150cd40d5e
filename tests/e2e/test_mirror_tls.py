"""Issue 13: TLS on the mirror listener, following README's "TLS on the mirror" literally.

The hosts.toml and the `--set certs=...` line are taken from README.md itself (placeholders
filled in), so a walk-through that stops working fails here. The client is a real containerd
(`ctr images pull --hosts-dir`) that trusts the public roots and the world's CA -- the
stand-in for them -- but not regcache's CA unless hosts.toml names it: no insecure option.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import MIRROR_PORT, ROOT, pull_twice
from .test_clients_containerd import NEEDS, containerd, pull_and_check  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e]
if NEEDS:
    pytestmark.append(pytest.mark.skip(reason=f"not installed: {', '.join(NEEDS)} (./test.sh installs containerd)"))

IMAGES = ["docker.io/library/s2:1", "ghcr.io/owner/small:1"]


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### TLS on the mirror\n")
    end = text.index("\n## ", start)
    return text[start:end]


def readme_hosts_toml(cache: str, ca_dir: Path) -> str:
    """README's hosts.toml with CACHE filled in and /etc/containerd/certs.d moved to ca_dir."""
    block = re.search(r"```toml\n(.*?)```", readme_section(), re.S).group(1)
    block = "\n".join(line.strip() if line.strip().startswith("[") else line for line in block.splitlines())
    return block.replace("CACHE", cache).replace("/etc/containerd/certs.d", str(ca_dir)) + "\n"


def readme_certs_option(cache: str, pem: Path) -> tuple[str, str]:
    """The --set certs=... of README's first step, as (option, value)."""
    line = re.search(r"--set (certs=CACHE=\S+)", readme_section()).group(1)
    key, value = line.replace("CACHE", cache).replace("/etc/regcache/mirror.pem", str(pem)).split("=", 1)
    return key, value


def node(world, tmp_path: Path, ca_pem: bytes, cache: str) -> Path:
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "_default").mkdir(parents=True)
    (hosts_dir / "regcache-ca.crt").write_bytes(ca_pem)
    (hosts_dir / "_default" / "hosts.toml").write_text(readme_hosts_toml(cache, hosts_dir))
    return hosts_dir


def pull_all(world, rc, containerd, hosts_dir: Path) -> None:  # noqa: F811
    """Pull IMAGES into a fresh containerd, then into another with the upstream stopped: the
    second round can only come through the mirror (ctr falls back to a registry itself when a
    mirror fails)."""
    # the public roots (and the world's CA in their place): auth.docker.io is still reached directly
    env = {"SSL_CERT_FILE": str(world.ca_bundle_path)}
    pull_twice(world, IMAGES, lambda c, ref, note: pull_and_check(c, world, rc, ref, None, note),
               client=lambda round_name: containerd(round_name, env, hosts_dir)).stop()


def test_tls_mirror_with_regcaches_ca(world, regcache_factory, containerd, tmp_path):  # noqa: F811
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"])
    cache = world.router_client_ip
    hosts_dir = node(world, tmp_path, rc.ca_cert.read_bytes(), cache)
    hosts_toml = (hosts_dir / "_default" / "hosts.toml").read_text()
    assert f'[host."https://{cache}:{MIRROR_PORT}"]' in hosts_toml

    # without README's `ca` line the node does not trust the mirror: it is TLS, verified
    untrusting = tmp_path / "untrusting"
    (untrusting / "_default").mkdir(parents=True)
    (untrusting / "_default" / "hosts.toml").write_text(
        "\n".join(line for line in hosts_toml.splitlines() if not line.strip().startswith("ca ")) + "\n")
    c = containerd("untrusting", {"SSL_CERT_FILE": str(world.ca_bundle_path)}, untrusting)
    try:
        refused = c.ctr("images", "pull", "--snapshotter", "native", "--hosts-dir", str(untrusting), IMAGES[1],
                        check=False)
    finally:
        c.stop()
    # (ctr then falls back to the registry itself: the pull may still succeed, not via the mirror)
    assert f'x509: certificate signed by unknown authority" host="{cache}:{MIRROR_PORT}"' in refused.stderr, \
        refused.stderr[-2000:]

    pull_all(world, rc, containerd, hosts_dir)
    log = rc.log_text()
    assert "registry=docker.io" in log and "registry=ghcr.io" in log and "outcome=HIT" in log
    # the TLS really is the mirror's: a client that trusts only the public roots is refused
    refused = world.run(world.ns_client, ["curl", "-sS", "--cacert", world.ca_bundle_path,
                                          f"https://{cache}:{MIRROR_PORT}/v2/"], check=False)
    assert refused.returncode == 60, refused.stderr  # SSL certificate problem


def test_tls_mirror_with_the_operators_own_certificate(world, regcache_factory, containerd, tmp_path):  # noqa: F811
    cache = world.router_client_ip
    leaf = world.pki.issue(["regcache-mirror.test"], ips=[cache], basename="mirror-own")
    pem = tmp_path / "mirror.pem"
    pem.write_bytes(Path(leaf.cert_path).read_bytes() + Path(leaf.key_path).read_bytes())
    key, value = readme_certs_option(cache, pem)
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"], options={key: value})
    # the operator's CA (the world's here) in hosts.toml; regcache's CA appears nowhere on the node
    hosts_dir = node(world, tmp_path, Path(world.ca_cert_path).read_bytes(), cache)
    pull_all(world, rc, containerd, hosts_dir)
    served = world.run(world.ns_client, ["openssl", "s_client", "-connect", f"{cache}:{MIRROR_PORT}"],
                       input="", check=False, timeout=30).stdout
    assert "regcache-mirror.test" in served, served[-2000:]

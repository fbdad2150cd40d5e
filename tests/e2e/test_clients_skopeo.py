"""skopeo through each way in: HTTPS_PROXY, transparent (iptables REDIRECT), registry mirror."""


import pytest

from .conftest import FASTPATH_EVERY_BLOB, FASTPATH_PORT, MIRROR_PORT, PROXY_PORT, TRANSPARENT_PORT, dir_manifest_digest, mirror_registries_conf, pull_twice, skopeo_copy

pytestmark = pytest.mark.e2e

IMAGES = ["docker.io/library/s2:1", "ghcr.io/owner/small:1"]


def pull_with_skopeo(world, rc, tmp_path, env, refs, extra=()):
    """Each image copied into a directory, twice (conftest.pull_twice)."""

    def pull(directory, ref, note):
        out = skopeo_copy(world, f"docker://{ref}", directory, env, extra)
        assert out.returncode == 0, f"{ref}{note}: {out.stderr}" + rc.log_text()[-2000:]
        assert dir_manifest_digest(directory) == world.image(ref).manifest_digest

    pull_twice(world, refs, pull, client=lambda round_name: tmp_path / round_name)


def test_skopeo_https_proxy(world, regcache_factory, tmp_path):
    rc = regcache_factory()
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
    pull_with_skopeo(world, rc, tmp_path, env, IMAGES)


def test_skopeo_transparent(world, regcache_factory, tmp_path, transparent):
    rc = regcache_factory(modes=[f"transparent@{TRANSPARENT_PORT}"], config=FASTPATH_EVERY_BLOB)
    env = {"SSL_CERT_FILE": str(rc.client_bundle())}
    pull_with_skopeo(world, rc, tmp_path, env, IMAGES)
    assert "outcome=MISS" in rc.log_text() and "outcome=HIT" in rc.log_text()
    # blob bodies of hits went over the fast path (307 to the plain-HTTP blob endpoint)
    assert "outcome=HIT via=fastpath" in rc.log_text()


def test_skopeo_mirror(world, regcache_factory, tmp_path):
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"])
    conf = mirror_registries_conf(tmp_path / "registries.conf", f"{world.router_client_ip}:{MIRROR_PORT}")
    env = {"SSL_CERT_FILE": str(rc.client_bundle())}
    pull_with_skopeo(world, rc, tmp_path, env, IMAGES, extra=["--registries-conf", str(conf)])
    log = rc.log_text()
    assert "registry=ghcr.io" in log and "registry=docker.io" in log


def test_skopeo_multiarch_platform_through_proxy(world, regcache_factory, tmp_path):
    rc = regcache_factory()
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
    image = world.image("quay.io/org/multi-oci:1")
    arm_digest = image.child("linux/arm64").digest
    out = skopeo_copy(world, "docker://quay.io/org/multi-oci:1", tmp_path / "arm", env, ["--override-arch", "arm64"])
    assert out.returncode == 0, out.stderr
    assert dir_manifest_digest(tmp_path / "arm") == arm_digest


@pytest.mark.parametrize("no_proxy", [True, False], ids=["NO_PROXY-direct", "back-through-proxy"])
def test_skopeo_https_proxy_fastpath_always(world, regcache_factory, tmp_path, no_proxy):
    """fastpath: always sends HTTPS_PROXY clients to the fast path too. With the cache host in
    NO_PROXY the body goes direct; without, the redirect comes back through the proxy and is
    served anyway."""
    rc = regcache_factory(config="fastpath: always\n" + FASTPATH_EVERY_BLOB)
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
    if no_proxy:
        env["NO_PROXY"] = world.router_client_ip
    else:
        env["HTTP_PROXY"] = env["HTTPS_PROXY"]
    pull_with_skopeo(world, rc, tmp_path, env, ["docker.io/library/small:1"])
    log = rc.log_text()
    assert "outcome=HIT via=fastpath" in log
    # a fast-path URL that reached mitmproxy is checked there and served by the in-band server
    came_back = "came back through the proxy" in log
    assert came_back != no_proxy

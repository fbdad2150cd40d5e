"""Issues 11 and 12: regcache reuses its upstream connections (HTTP/1.1 keep-alive) per host.

A cold pull of an image with many small layers used to open a TCP+TLS connection per request.
Real parts: skopeo in the client namespace through regcache's HTTPS proxy; the world's nginx
logs which TCP connection carried each request (`conn`).
"""

from __future__ import annotations

import pytest

from .conftest import dir_manifest_digest, skopeo_copy
from .test_privacy import proxy_env

pytestmark = pytest.mark.e2e

QUAY_IMAGES = ("quay.io/library/small:1", "quay.io/org/s2:1", "quay.io/org/multi-oci:1")


def since(world, host: str, start: int) -> list[dict]:
    return world.request_log(host)[start:]


def test_cold_pulls_reuse_a_few_upstream_connections(world, regcache_factory, tmp_path):
    rc = regcache_factory()
    env = proxy_env(world, rc)
    start = len(world.request_log("quay.io"))
    for i, ref in enumerate(QUAY_IMAGES):
        out = skopeo_copy(world, f"docker://{ref}", tmp_path / f"img{i}", env)
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
        if not world.image(ref).is_index:
            assert dir_manifest_digest(tmp_path / f"img{i}") == world.image(ref).manifest_digest
    blob_gets = len(world.image("quay.io/library/small:1").blobs) + len(world.image("quay.io/org/s2:1").blobs)
    log = world.wait_request_log("quay.io", lambda e: "/blobs/" in e["path"], count=blob_gets)[start:]
    connections = {e["conn"] for e in log}
    assert len([e for e in log if "/blobs/" in e["path"]]) >= blob_gets, log
    # Every manifest, blob and probe of three cold pulls: a handful of connections, not one each.
    assert len(log) >= 12, log
    assert len(connections) <= len(log) // 3, f"{len(connections)} connections for {len(log)} requests"
    assert max(e["conn_requests"] for e in log) >= 4, log


def test_blob_redirects_reuse_registry_and_cdn_connections(world, regcache_factory, tmp_path):
    # docker.io answers a blob GET with a 307 to its CDN: the drained 307 leaves the registry's
    # connection reusable, and the CDN gets connections of its own, reused as well.
    rc = regcache_factory()
    env = proxy_env(world, rc)
    reg_start = len(world.request_log("registry-1.docker.io"))
    cdn_start = len(world.request_log(world.cdn_host))
    for i, ref in enumerate(("docker.io/library/small:1", "docker.io/library/s2:1")):
        out = skopeo_copy(world, f"docker://registry-1.{ref}", tmp_path / f"img{i}", env)
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    blobs = set(world.image("docker.io/library/small:1").blobs) | set(world.image("docker.io/library/s2:1").blobs)
    cdn = world.wait_request_log(world.cdn_host, count=cdn_start + len(blobs))[cdn_start:]
    reg = since(world, "registry-1.docker.io", reg_start)
    assert len(cdn) >= len(blobs), cdn
    assert len({e["conn"] for e in cdn}) < len(cdn), cdn
    redirected = [e for e in reg if e["status"] == 307]
    assert len(redirected) >= len(blobs), reg
    assert len({e["conn"] for e in reg}) <= len(reg) // 2, reg

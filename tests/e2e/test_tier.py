"""Issue 14: a cache tier — several regcache nodes sharing one S3 bucket (content) and one Redis
(knowledge, leases).

Real parts: a Ceph radosgw (S3) and a redis-server in the world's store namespace
(tests/world/tier.py), up to three real mitmdump nodes in the router namespace (each its own
cache dir and proxy port), skopeo and curl in the client namespace, the world's docker.io with
token auth and its blob CDN (whose access log counts every upstream download).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.world.tier import StoreHost, tier_available

from .conftest import Regcache, dir_manifest_digest, log_errors_expected, skopeo_copy
from .test_singleflight import (big_layer, blob_url, cdn_gets, client_bundle, curl, pull_token, settle_logs,
                                sha256_file, throttled_upstream)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODE_PORTS = {"a": 8180, "b": 8190, "c": 8200}
CREDS = ["--src-creds", "testuser:testpass"]


@pytest.fixture(scope="module")
def store_host(world):
    reason = tier_available()
    if reason:
        pytest.skip(reason)
    host = StoreHost(world).up()
    yield host
    host.down()


@pytest.fixture
def tier(world, store_host, tmp_path, request):
    """Start tier nodes (a fresh bucket and empty Redis per test): tier.start("a")."""
    world.run(store_host.ns, ["redis-cli", "-h", store_host.ip, "flushall"])
    bucket = f"tier-{uuid.uuid4().hex[:12]}"
    nodes: dict[str, Regcache] = {}
    expected = log_errors_expected(request)

    def start(name: str, cache_dir: Path | None = None) -> Regcache:
        port = NODE_PORTS[name]
        workdir = tmp_path / f"node-{name}-{len(nodes)}"
        workdir.mkdir()
        config = store_host.tier_config(bucket, f"node-{name}") + "fastpath: off\n"
        rc = Regcache(world, workdir, cache_dir or workdir / "cache", [f"regular@{port}"], {}, config, expected)
        rc.env = store_host.node_env()
        rc.port = port
        nodes[name] = rc
        return rc.start([port])

    yield SimpleNamespace(start=start, bucket=bucket, host=store_host, nodes=nodes)
    for rc in nodes.values():
        rc.stop()


def env_for(world, rc) -> dict:
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{rc.port}", "SSL_CERT_FILE": str(client_bundle(rc))}


def curl_via(world, rc, url: str, out: Path, headers=()):
    return curl(world, rc, url, out, headers=headers, proxy=False,
                extra=["--proxy", f"http://{world.router_client_ip}:{rc.port}"])


def upstream_content_requests(world, start: dict[str, int]) -> list[dict]:
    """Blob and manifest requests upstream (registry and CDN) since start (log lengths)."""
    found = []
    for host, n in start.items():
        found += [e for e in world.request_log(host)[n:] if "/blobs/" in e["path"] or "/manifests/" in e["path"]
                  or host == world.cdn_host]
    return found


def log_marks(world) -> dict[str, int]:
    return {h: len(world.request_log(h)) for h in ("registry-1.docker.io", world.cdn_host)}


def wait_shared(host: StoreHost, bucket: str, digests, timeout: float = 60) -> dict:
    """The bucket once it holds every digest's object (uploads run after the client was served)."""
    keys = {f"blobs/sha256/{d.split(':')[1]}" for d in digests}
    deadline = time.monotonic() + timeout
    while True:
        listing = host.bucket(bucket)
        if keys <= set(listing["objects"]) or time.monotonic() > deadline:
            return listing
        time.sleep(0.3)


def test_warm_pull_through_another_node_reads_the_object_store(world, tier, tmp_path):
    """Cold pull through node A; node B, with an empty local store, pulls the same image with
    0 upstream blob or manifest requests: bytes and knowledge come from the tier."""
    img = world.image("docker.io/library/small:1")
    a, b = tier.start("a"), tier.start("b")

    first = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "a", env_for(world, a))
    assert first.returncode == 0, first.stderr + a.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "a") == img.manifest_digest
    listing = wait_shared(tier.host, tier.bucket, img.blobs)
    for digest in img.blobs:
        assert listing["objects"].get(f"blobs/sha256/{digest.split(':')[1]}") == img.layer_sizes[digest], listing
    assert f"manifests/sha256/{img.manifest_digest.split(':')[1]}" in listing["objects"], listing
    assert not listing["uploads"]

    settle_logs()
    marks = log_marks(world)
    second = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "b", env_for(world, b))
    assert second.returncode == 0, second.stderr + b.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "b") == img.manifest_digest
    for digest in img.blobs:
        assert sha256_file(tmp_path / "b" / digest.split(":")[1]) == digest
        assert f"tier: blob {digest} from the object store" in b.log_text()
    settle_logs()
    assert upstream_content_requests(world, marks) == [], "node B asked upstream for content"

"""Issue 2's proof with real parts: skopeo pulls through regcache (HTTPS_PROXY) from a real
distribution registry over TLS; with the upstream stopped the same pull succeeds from the cache."""

import json

import pytest

from .conftest import PROXY_PORT, dir_manifest_digest, skopeo_copy

pytestmark = pytest.mark.e2e


def proxy_env(world, rc):
    return {
        "HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}",
        "SSL_CERT_FILE": str(rc.client_bundle()),
    }


@pytest.mark.parametrize("ref", ["docker://registry-1.docker.io/library/small:1", "docker://quay.io/org/s2:1"])
def test_pull_through_proxy_then_from_cache_with_upstream_stopped(world, regcache_factory, tmp_path, ref):
    rc = regcache_factory()
    env = proxy_env(world, rc)
    image = world.image(ref.replace("docker://", "").replace("registry-1.docker.io", "docker.io"))

    first = skopeo_copy(world, ref, tmp_path / "first", env)
    assert first.returncode == 0, first.stderr
    assert dir_manifest_digest(tmp_path / "first") == image.manifest_digest
    assert "outcome=MISS" in rc.log_text()

    world.stop_upstream()
    try:
        second = skopeo_copy(world, ref, tmp_path / "second", env)
        assert second.returncode == 0, second.stderr + rc.log_text()[-3000:]
    finally:
        world.start_upstream()
    assert dir_manifest_digest(tmp_path / "second") == image.manifest_digest
    # every file (manifest, config, layers) is byte-identical
    for f in (tmp_path / "first").iterdir():
        assert (tmp_path / "second" / f.name).read_bytes() == f.read_bytes(), f.name


REPLAY = [
    "registry-1.docker.io/library/small:1",
    "registry-1.docker.io/library/big:1",
    "quay.io/org/s2:1",
    "gcr.io/proj/small:1",
    "registry.k8s.io/pause:1",
    "ghcr.io/owner/small:1",
]


def test_offline_copy_of_cache_dir_serves_and_unknown_fails_fast(world, regcache_factory, tmp_path):
    """Populate, stop, copy the cache dir elsewhere, start offline with no upstream at all:
    every pull replays from the copy; unknown references fail fast with OCI errors."""
    import shutil
    import time

    rc = regcache_factory()
    for ref in REPLAY:
        out = skopeo_copy(world, f"docker://{ref}", tmp_path / "warm", proxy_env(world, rc))
        assert out.returncode == 0, out.stderr
    rc.stop()

    moved = tmp_path / "moved-cache"
    shutil.copytree(rc.cache_dir, moved)
    shutil.rmtree(rc.cache_dir)
    world.stop_upstream()
    offline = regcache_factory(cache_dir=moved, options={"regcache_offline": "true"})
    env = proxy_env(world, offline)
    for ref in REPLAY:
        out = skopeo_copy(world, f"docker://{ref}", tmp_path / "replayed", env)
        assert out.returncode == 0, ref + out.stderr + offline.log_text()[-3000:]
        image = world.image(ref.replace("registry-1.docker.io", "docker.io"))
        assert dir_manifest_digest(tmp_path / "replayed") == image.manifest_digest

    for unknown_ref in ("registry-1.docker.io/library/nothere:1", "quay.io/org/s2:2"):
        t0 = time.monotonic()
        unknown = skopeo_copy(world, f"docker://{unknown_ref}", tmp_path / "unknown", env)
        assert unknown.returncode != 0
        assert time.monotonic() - t0 < 15
        assert "manifest unknown" in unknown.stderr.lower(), unknown.stderr
    # offline means no upstream connection at all: the regcache never even tried
    assert "unreachable" not in offline.log_text()


def test_miss_log_records_pulls(world, regcache_factory, tmp_path):
    rc = regcache_factory()
    assert skopeo_copy(world, "docker://quay.io/org/s2:1", tmp_path / "x", proxy_env(world, rc)).returncode == 0
    lines = [json.loads(l) for l in (rc.cache_dir / "misses.jsonl").read_text().splitlines()]
    kinds = {(l["registry"], l["kind"]) for l in lines}
    assert ("quay.io", "manifest") in kinds and ("quay.io", "blob") in kinds
    assert all("authorization" not in json.dumps(l).lower() for l in lines)


def final_status(curl_head_output: str) -> int:
    """The status of the response itself, after the proxy's CONNECT answer."""
    lines = [l for l in curl_head_output.splitlines() if l.startswith("HTTP/") and "Connection established" not in l]
    return int(lines[-1].split()[1])


def test_blob_head_miss_stays_a_head_and_dead_upstream_fails_fast(world, regcache_factory, tmp_path):
    """A HEAD of an uncached blob goes upstream as a HEAD (never a GET) and reports its size;
    with the upstream down it gets a fast OCI error instead of hanging or an HTML page."""
    import time

    rc = regcache_factory()
    image = world.image("quay.io/org/s2:1")
    digest = image.blobs[-1]
    url = f"https://quay.io/v2/org/s2/blobs/{digest}"
    curl = ["curl", "-sS", "-I", "--proxy", f"http://{world.router_client_ip}:{PROXY_PORT}", "--cacert", str(rc.client_bundle()), url]
    world.clear_request_logs()
    out = world.run(world.ns_client, curl, check=False)
    assert out.returncode == 0, out.stderr
    head = out.stdout.lower()
    assert final_status(out.stdout) == 200 and "x-cache: miss" in head
    assert "content-length: 0" not in head
    world.wait_request_log("quay.io", lambda r: digest in r["path"], count=1)
    methods = [r["method"] for r in world.request_log("quay.io") if digest in r["path"]]
    assert methods == ["HEAD"]

    world.stop_upstream()
    try:
        t0 = time.monotonic()
        out = world.run(world.ns_client, [*curl[:2], "-i", "-X", "HEAD", *curl[3:]], check=False, timeout=60)
        assert time.monotonic() - t0 < 10
        assert final_status(out.stdout) == 503, out.stdout
        assert "unavailable" in out.stdout.lower() or "application/json" in out.stdout.lower()
    finally:
        world.start_upstream()

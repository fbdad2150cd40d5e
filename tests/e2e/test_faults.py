"""Issue 5: faults — wrong bytes from upstream, upstream dying mid-blob, regcache killed
mid-fill, a full cache disk, two processes on one cache directory, upstream down.

Real parts: curl and skopeo in the client namespace, regcache (mitmdump) in the router
namespace, the namespace world's nginx + docker-registry upstream. Faults are made with real
means: same-length corruption of the blob file the CDN serves, stopping the upstream
processes, kill -9, a small tmpfs for the cache directory, an iptables DROP that
black-holes upstream, and a tc token bucket that makes a 30 MiB download take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from regcachelib.store import Store

from .conftest import FASTPATH_PORT, MIRROR_PORT, PROXY_PORT, dir_manifest_digest, skopeo_copy
from .test_singleflight import (
    DOCKER_API,
    big_layer,
    blob_url,
    curl,
    client_bundle,
    pull_token,
    staging_files,
    store_has_blob,
    throttled_upstream,
    upstream_blob_path,
    wait_staging_empty,
)

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# curl through HTTPS_PROXY does not follow the fast path's 307 (every proxied client gets it by
# default): where these tests read blob bodies through the proxy, they are read in-band
IN_BAND = "fastpath: off\n"


def proxy_env(world, rc, port: int = PROXY_PORT) -> dict:
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{port}", "SSL_CERT_FILE": str(client_bundle(rc))}


def big_curl(world, rc, tmp_path: Path, name: str, token: str, **kw):
    digest, _ = big_layer(world)
    return curl(world, rc, blob_url("library/big", digest), tmp_path / name, headers=[f"Authorization: Bearer {token}"], **kw)


def big_layer_and_token(world) -> tuple[str, int, str]:
    """The 30 MiB layer's digest and size, and a pull token for library/big that holds it."""
    digest, size = big_layer(world)
    return digest, size, pull_token(world, "library/big")


@contextlib.contextmanager
def big_download_under_way(world, rc, tmp_path: Path, name: str, token: str, **kw):
    """curl fetching the 30 MiB layer through rc from a throttled upstream, yielded once its first
    MiB has arrived: a fault made in the block hits a download in the middle; the throttle holds
    until the block ends."""
    with throttled_upstream(world):
        c = big_curl(world, rc, tmp_path, name, token, **kw).start()
        c.wait_received(1024 * 1024)
        yield c


def pull_big(world, rc, dest: Path, port: int = PROXY_PORT):
    """skopeo copies docker.io/library/big:1 through rc to a dir: layout at dest."""
    return skopeo_copy(world, "docker://registry-1.docker.io/library/big:1", dest, proxy_env(world, rc, port))


def warm_small(world, rc, tmp_path: Path):
    """docker.io/library/small:1 pulled through rc once, so that its tag and manifest are cached."""
    out = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "warm", proxy_env(world, rc))
    assert out.returncode == 0, out.stderr


@pytest.fixture
def corrupt_big_layer(world):
    """Flip one byte in the middle of the 30 MiB layer's upstream file (same length); restored after."""
    digest, size = big_layer(world)
    path = upstream_blob_path(world, digest)
    offset = size // 3
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(1)
        state = {"restored": False}

        def restore():
            if not state["restored"]:
                with open(path, "r+b") as g:
                    g.seek(offset)
                    g.write(original)
                state["restored"] = True

        f.seek(offset)
        f.write(bytes([original[0] ^ 0xFF]))
    try:
        yield restore
    finally:
        restore()


# ----------------------------------------------------------------------- (a) wrong bytes


def test_corrupt_upstream_blob_is_never_completed_nor_cached(world, regcache_factory, tmp_path, corrupt_big_layer):
    # http2=true: regcache offers TLS clients HTTP/1.1 only by default; an operator may offer h2,
    # and the HTTP/2 stream reset is one of the ways a short body must reach the client
    rc = regcache_factory(config=IN_BAND, options={"http2": "true"})
    # the fast-path client reaches another regcache, on the mirror port, with the fast path on
    fast = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"],
                            wait_ports=[MIRROR_PORT, FASTPATH_PORT])
    digest, size, token = big_layer_and_token(world)
    mirror_url = f"http://{world.router_client_ip}:{MIRROR_PORT}/v2/library/big/blobs/{digest}"

    attempts = [
        big_curl(world, rc, tmp_path, "bad-http1", token, http1=True),  # in-band, connection closed short
        big_curl(world, rc, tmp_path, "bad-http2", token),  # in-band, HTTP/2 stream reset
        curl(world, fast, mirror_url, tmp_path / "bad-fastpath", headers=[f"Authorization: Bearer {token}"], proxy=False,
             extra=["-L"]),
    ]
    for bad in attempts:
        # Each client must reach the blob server while the download is still running: the
        # fill is forgotten once it fails, and a client arriving later (following the 307 to
        # the fast path, or mitmproxy's in-band hop, on a loaded machine) gets a plain 404
        # BLOB_UNKNOWN with curl exit 0. Unshaped, the local 30 MiB download ends in well under
        # a second; shaped it takes ~3 s, far longer than either hop.
        with throttled_upstream(world):
            bad.run()
        assert bad.exit_code != 0, bad.describe()
        if bad is not attempts[1]:
            assert bad.exit_code == 18, bad.describe()  # CURLE_PARTIAL_FILE
        # everything up to the held-back tail may have arrived, never the whole body
        assert bad.received() <= size - 64 * 1024, bad.describe()
        assert bad.headers.get("x-cache") != "HIT"
    assert rc.log_text().count("digest mismatch") >= 2 and "digest mismatch" in fast.log_text()

    # nothing half-done remains: no staging file, no store entry
    assert wait_staging_empty(rc.cache_dir) == []
    assert not store_has_blob(rc.cache_dir, digest)

    # skopeo, a real client, fails too (and again nothing is cached)
    out = pull_big(world, rc, tmp_path / "skopeo-bad")
    assert out.returncode != 0
    assert not store_has_blob(rc.cache_dir, digest)

    corrupt_big_layer()  # upstream sends the right bytes again
    good = big_curl(world, rc, tmp_path, "good", token).run()
    assert good.exit_code == 0 and good.status == 200 and good.sha256() == digest, good.describe()
    assert good.headers.get("x-cache") == "MISS"
    out = pull_big(world, rc, tmp_path / "skopeo-good")
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "skopeo-good") == world.image("docker.io/library/big:1").manifest_digest
    hit = big_curl(world, rc, tmp_path, "hit", token).run()
    assert hit.headers.get("x-cache") == "HIT" and hit.sha256() == digest, hit.describe()
    assert rc.proc.poll() is None


# ---------------------------------------------------------------- (b) upstream dies mid-blob


def test_upstream_closes_mid_blob(world, regcache_factory, tmp_path):
    rc = regcache_factory(config="upstream_backoff: 1s\n" + IN_BAND)
    digest, size, token = big_layer_and_token(world)

    with big_download_under_way(world, rc, tmp_path, "cut", token, http1=True) as c:
        world.stop_upstream()
        try:
            c.wait(60)
        finally:
            world.start_upstream()
    assert c.exit_code != 0 and c.received() < size, c.describe()
    assert "not cached" in rc.log_text()
    assert wait_staging_empty(rc.cache_dir) == []
    assert not store_has_blob(rc.cache_dir, digest)

    time.sleep(1.2)  # past upstream_backoff, in case anything tried upstream while it was down
    again = big_curl(world, rc, tmp_path, "again", token).run()
    assert again.exit_code == 0 and again.status == 200 and again.sha256() == digest, again.describe() + rc.log_text()[-3000:]
    assert again.headers.get("x-cache") == "MISS"
    assert store_has_blob(rc.cache_dir, digest)


# ------------------------------------------------------------------ (c) kill -9 mid-fill


def test_kill9_mid_fill_then_restart_on_same_dir(world, regcache_factory, tmp_path):
    cache = tmp_path / "cache"
    rc = regcache_factory(cache_dir=cache, config=IN_BAND)
    digest, size, token = big_layer_and_token(world)

    with big_download_under_way(world, rc, tmp_path, "cut", token) as c:
        rc.kill9()
        c.wait(30)
    assert c.exit_code != 0 and c.received() < size, c.describe()
    debris = staging_files(cache)
    assert len(debris) == 1 and debris[0].startswith(digest.replace(":", "-")), debris
    assert 0 < (cache / "staging" / debris[0]).stat().st_size < size

    rc2 = regcache_factory(cache_dir=cache, config=IN_BAND)
    assert staging_files(cache) == []
    assert "removed 1 leftover staging file" in rc2.log_text()
    assert not store_has_blob(cache, digest)

    again = big_curl(world, rc2, tmp_path, "again", token).run()
    assert again.exit_code == 0 and again.status == 200 and again.sha256() == digest, again.describe() + rc2.log_text()[-3000:]
    out = pull_big(world, rc2, tmp_path / "pull")
    assert out.returncode == 0, out.stderr
    assert dir_manifest_digest(tmp_path / "pull") == world.image("docker.io/library/big:1").manifest_digest
    assert store_has_blob(cache, digest)
    assert staging_files(cache) == []


# ------------------------------------------------------------------------ (d) disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 20 MiB tmpfs for a cache directory (the 30 MiB layer cannot fit); unmounted after."""
    mnt = tmp_path / "tmpfs-cache"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0755", "regcache-test-tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_passes_blobs_through_uncached_then_caches_after_growing(world, small_tmpfs, regcache_factory, tmp_path):
    rc = regcache_factory(cache_dir=small_tmpfs, config=IN_BAND)
    image = world.image("docker.io/library/big:1")
    digest, size = big_layer(world)

    out = pull_big(world, rc, tmp_path / "full")
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "full") == image.manifest_digest
    log = rc.log_text()
    assert "cache disk full" in log and "passing docker.io/library/big blob" in log
    assert "outcome=UNCACHED" in log
    assert rc.proc.poll() is None
    assert not store_has_blob(small_tmpfs, digest)
    assert staging_files(small_tmpfs) == []

    # the disk grows (same mount, live): the next pull caches the layer
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_tmpfs)], check=True)
    out = pull_big(world, rc, tmp_path / "roomy")
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert store_has_blob(small_tmpfs, digest)
    token = pull_token(world, "library/big")
    hit = big_curl(world, rc, tmp_path, "hit", token).run()
    assert hit.headers.get("x-cache") == "HIT" and hit.sha256() == digest, hit.describe()


# -------------------------------------------------------------- (e) two processes, one dir


@pytest.mark.slow
def test_two_processes_share_one_cache_dir(world, regcache_factory, tmp_path):
    cache = tmp_path / "shared"
    rc1 = regcache_factory(cache_dir=cache, config=IN_BAND)
    digest, size, token = big_layer_and_token(world)

    # the second process starts (and sweeps staging) while the first is mid-fill:
    # the first one's staging file is locked and must survive the sweep
    with big_download_under_way(world, rc1, tmp_path, "first", token) as c:
        assert len(staging_files(cache)) == 1
        rc2 = regcache_factory(cache_dir=cache, modes=["regular@8090"])
        assert "leftover staging" not in rc2.log_text()
        c.wait(60)
    assert c.exit_code == 0 and c.sha256() == digest, c.describe() + rc1.log_text()[-3000:]
    assert store_has_blob(cache, digest)

    # both pull the same images at the same time
    refs = ["docker.io/library/small:1", "docker.io/library/s2:1", "quay.io/org/s2:1", "docker.io/library/big:1"]
    procs = []
    for i, rc in enumerate((rc1, rc2)):
        port = PROXY_PORT if rc is rc1 else 8090
        for ref in refs:
            dest = tmp_path / f"p{i}-{ref.replace('/', '_').replace(':', '_')}"
            env = world.client_env(**proxy_env(world, rc, port))
            argv = ["skopeo", "copy", f"docker://{ref}", f"dir:{dest}"]
            procs.append((ref, dest, world.popen(world.ns_client, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for ref, dest, p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"{ref}: {err.decode()}" + rc1.log_text()[-2000:] + rc2.log_text()[-2000:]
        assert dir_manifest_digest(dest) == world.image(ref).manifest_digest
    assert rc1.proc.poll() is None and rc2.proc.poll() is None

    # every stored blob is intact and staging is empty
    rc1.stop()
    rc2.stop()
    store = Store(str(cache))
    try:
        blobs = [k for k in store.content.iterkeys() if isinstance(k, tuple) and k[0] == "blob"]
        assert len(blobs) >= 6
        for _, d in blobs:
            f = store.open_blob(d)
            with f:
                assert "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == d
    finally:
        store.close()
    assert staging_files(cache) == []

    # the shared directory serves every image from the cache to a fresh process
    world.stop_upstream()
    try:
        rc3 = regcache_factory(cache_dir=cache)
        for ref in refs:
            out = skopeo_copy(world, f"docker://{ref}", tmp_path / "offline", proxy_env(world, rc3))
            assert out.returncode == 0, f"{ref}: {out.stderr}" + rc3.log_text()[-2000:]
    finally:
        world.start_upstream()


# ----------------------------------------------------------------------- (f) upstream down


def test_upstream_down_stale_tag_and_fast_oci_errors(world, regcache_factory, tmp_path):
    rc = regcache_factory(config="tag_ttl: 0s\n")
    env = proxy_env(world, rc)
    image = world.image("docker.io/library/small:1")
    warm_small(world, rc, tmp_path)

    world.stop_upstream()
    try:
        out = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "stale", env)
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "stale") == image.manifest_digest
        assert "outcome=STALE" in rc.log_text()

        m = curl(world, rc, f"{DOCKER_API}/v2/library/small/manifests/1", tmp_path / "m", headers=[f"Accept: {image.media_type}"]).run()
        assert m.exit_code == 0 and m.status == 200, m.describe()
        assert m.headers.get("x-cache") == "STALE" and m.headers.get("docker-content-digest") == image.digest
        assert m.sha256() == image.digest

        for name in ("nothere", "library/nothere"):
            t0 = time.monotonic()
            u = curl(world, rc, f"{DOCKER_API}/v2/{name}/manifests/1", tmp_path / f"u-{name.replace('/', '_')}").run()
            elapsed = time.monotonic() - t0
            assert elapsed < 5, elapsed
            assert u.exit_code == 0 and u.status >= 500, u.describe()
            errors = json.loads(u.out.read_bytes())["errors"]
            assert errors and errors[0]["code"] == "UNAVAILABLE", errors
    finally:
        world.start_upstream()


@pytest.fixture
def blackhole(world):
    """Drop regcache's packets to every upstream HTTPS server: connects hang instead of failing."""
    rule = ["OUTPUT", "-d", f"{world.router_upstream_ip.rsplit('.', 1)[0]}.0/24", "-p", "tcp", "--dport", "443", "-j", "DROP"]
    state = {"on": False}

    def on():
        world.run(world.ns_router, ["iptables", "-I", *rule])
        state["on"] = True

    def off():
        if state["on"]:
            world.run(world.ns_router, ["iptables", "-D", *rule], check=False)
            state["on"] = False

    try:
        yield on, off
    finally:
        off()


def test_dead_upstream_is_backed_off(world, regcache_factory, tmp_path, blackhole):
    """A black-holed upstream costs one connect timeout; later requests fail (or are served
    stale) at once instead of each waiting for its own timeout."""
    on, off = blackhole
    rc = regcache_factory(config="tag_ttl: 0s\nupstream_timeout: 3s\nupstream_backoff: 60s\n")
    image = world.image("docker.io/library/small:1")
    warm_small(world, rc, tmp_path)

    on()
    timings = []
    for i in range(3):
        t0 = time.monotonic()
        u = curl(world, rc, f"{DOCKER_API}/v2/library/nothere{i}/manifests/1", tmp_path / f"u{i}").run()
        timings.append(time.monotonic() - t0)
        assert u.exit_code == 0 and u.status == 503, u.describe()
        assert json.loads(u.out.read_bytes())["errors"][0]["code"] == "UNAVAILABLE"
    assert 2.5 <= timings[0] < 5, timings  # the one connect that timed out
    assert max(timings[1:]) < 1.5, timings  # backed off: no more waiting
    assert "backed off" in rc.log_text()

    t0 = time.monotonic()
    m = curl(world, rc, f"{DOCKER_API}/v2/library/small/manifests/1", tmp_path / "stale", headers=[f"Accept: {image.media_type}"]).run()
    assert time.monotonic() - t0 < 1.5
    assert m.status == 200 and m.headers.get("x-cache") == "STALE" and m.sha256() == image.digest, m.describe()
    off()

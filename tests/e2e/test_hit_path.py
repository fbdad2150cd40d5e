"""Issue 12 item 2: a cache hit is a read; it never waits for a writer of the cache dir.

Real parts only: a real mitmdump + regcache in the router namespace as a quay.io mirror, the
world's quay.io registry upstream, curl in the client namespace. Another writer of the store
(`regcache gc` or `import` in another process, a fill committing) holds the content index's
SQLite write lock for as long as it works; the test holds that lock itself and checks that
hits (manifest by digest, blob HEAD, blob GETs in-band: a small blob answered inline, a larger
one streamed by the blob server) are answered from the store meanwhile,
and that the uses they made still reach the index's LRU order once the lock is free.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from tests.world.world import REGISTRY_PORTS

from .conftest import MIRROR_PORT

pytestmark = pytest.mark.e2e

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
REPO = "library/small"


def fetch(world, url: str, out: Path, head: bool = False, max_time: int = 20) -> tuple[int, dict, float]:
    """(status, headers, seconds) of one curl in the client namespace; the body goes to out."""
    argv = ["curl", "-sS", "-o", str(out), "-D", "-", "--max-time", str(max_time), "-H", f"Accept: {ACCEPT}"]
    if head:
        argv.append("-I")
    t0 = time.monotonic()
    r = world.run(world.ns_client, [*argv, url], check=False, timeout=max_time + 30)
    seconds = time.monotonic() - t0
    lines = r.stdout.replace("\r", "").split("\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if k}
    return status, headers, seconds


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def push_blob(world, repo: str, data: bytes, path: Path) -> str:
    """Push a blob straight to the world's quay.io registry (monolithic upload); its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    base = f"http://127.0.0.1:{REGISTRY_PORTS['quay.io']}"
    r = world.run(world.ns_upstream, ["curl", "-sS", "-X", "POST", "-o", "/dev/null", "-D", "-",
                                      f"{base}/v2/{repo}/blobs/uploads/"])
    location = next(line.split(":", 1)[1].strip() for line in r.stdout.splitlines()
                    if line.lower().startswith("location:"))
    location = re.sub(r"^https?://[^/]+", "", location)
    url = f"{base}{location}{'&' if '?' in location else '?'}digest={digest}"
    r = world.run(world.ns_upstream, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path),
                                      "-H", "Content-Type: application/octet-stream", url])
    assert r.stdout.strip() == "201", r.stdout
    return digest


def wait_for_hit(world, url: str, out: Path, head: bool = False) -> None:
    """Ask until the answer comes from the store (the first ask fills it; its publicness
    probe runs in the background)."""
    deadline = time.monotonic() + 20
    while True:
        status, headers, _ = fetch(world, url, out, head)
        if status == 200 and headers.get("x-cache") == "HIT":
            return
        assert time.monotonic() < deadline, f"{url} never became a hit: {status} {headers}"
        time.sleep(0.3)


def test_hits_are_served_while_another_writer_holds_the_store(world, regcache_factory, tmp_path):
    rc = regcache_factory(modes=[f"reverse:https://quay.io@{MIRROR_PORT}"], config="fastpath: off\n")
    img = world.image("quay.io/library/small:1")
    layer = max(img.layer_sizes, key=img.layer_sizes.get)  # small: answered inline
    large_data = os.urandom(300 * 1024)  # streamed by the blob server
    large = push_blob(world, REPO, large_data, tmp_path / "large")
    base = f"http://{world.router_client_ip}:{MIRROR_PORT}/v2/{REPO}"
    manifest_url, blob_url, large_url = (f"{base}/manifests/{img.manifest_digest}", f"{base}/blobs/{layer}",
                                         f"{base}/blobs/{large}")
    out = tmp_path / "body"
    for url, head in ((manifest_url, False), (blob_url, False), (blob_url, True), (large_url, False)):
        wait_for_hit(world, url, out, head)

    index = rc.cache_dir / "content" / "cache.db"
    writer = sqlite3.connect(str(index), isolation_level=None, timeout=5)
    try:
        writer.execute("BEGIN IMMEDIATE")  # what another process's gc or commit holds while it works
        held_from = time.time()
        answers = {}
        for name, url, head in (("manifest", manifest_url, False), ("blob", blob_url, False),
                                ("blob HEAD", blob_url, True), ("large blob", large_url, False)):
            status, headers, seconds = fetch(world, url, out, head)
            answers[name] = (status, headers.get("x-cache"), seconds)
            assert (status, headers.get("x-cache")) == (200, "HIT"), f"{name} while the store is locked: {answers}"
            assert seconds < 5, f"{name} hit waited {seconds:.1f} s for the store's writer: {answers}"
            if name == "manifest":
                assert sha256_of(out) == img.manifest_digest
            elif name == "blob":
                assert sha256_of(out) == layer and out.stat().st_size == img.layer_sizes[layer]
            elif name == "large blob":
                assert out.read_bytes() == large_data
            else:
                assert headers.get("content-length") == str(img.layer_sizes[layer])
    finally:
        writer.execute("ROLLBACK")
        writer.close()

    # The uses those hits made are written behind: once the lock is free, the LRU order (what
    # size-limit eviction and `regcache gc` go by) has the manifest and both blobs as just used.
    reader = sqlite3.connect(str(index), timeout=5)
    try:
        deadline = time.monotonic() + 10
        while True:
            used = reader.execute("SELECT COUNT(*) FROM Cache WHERE access_time >= ?", (held_from,)).fetchone()[0]
            if used >= 3:
                break
            assert time.monotonic() < deadline, "the hits' uses never reached the store's access times"
            time.sleep(0.2)
    finally:
        reader.close()

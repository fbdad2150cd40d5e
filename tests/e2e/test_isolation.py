"""Issue 9: only what upstream would give this client — tried as an attacker would.

Real parts: the world's docker.io with Docker-Hub-style token auth (private/* only for
testuser), open registries, skopeo and curl in the client namespace through regcache's HTTPS
proxy and its mirror listener. Each test fails on a cache that checks whether the *named*
repository is public but not whether it holds the digest, shares single-flight answers
without a per-client check, lets a 404 make a repository private, or caches what a
client-chosen scheme or port answered.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import MIRROR_PORT, PROXY_PORT, skopeo_copy, dir_manifest_digest
from .test_privacy import CREDS, PRIVATE, PUBLIC, proxy_env, secret_layer
from .test_singleflight import DOCKER_API, blob_url, curl, pull_token

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = f"Accept: {OCI_MANIFEST}"


def body_digest(c) -> str:
    data = c.out.read_bytes() if c.out.exists() else b""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_not_served(c, secret_digest: str, status: int = 404) -> None:
    assert c.exit_code == 0, c.describe()
    assert c.status == status, c.describe() + (c.out.read_text(errors="replace")[:500] if c.out.exists() else "")
    assert c.headers.get("x-cache") is None, c.describe()
    assert "location" not in c.headers, c.headers  # no fast-path URL either
    assert body_digest(c) != secret_digest


@contextmanager
def upstream_stalled(world):
    """While inside, every upstream HTTPS answer is dropped (TCP retries it later): a request
    regcache sends upstream stays in flight until some time after the block ends."""
    rule = ["OUTPUT", "-p", "tcp", "--sport", "443", "-j", "DROP"]
    world.run(world.ns_upstream, ["iptables", "-I", *rule])
    try:
        yield
    finally:
        world.run(world.ns_upstream, ["iptables", "-D", *rule], check=False)


def test_digest_is_served_only_under_a_repository_that_holds_it(world, regcache_factory, tmp_path):
    cache = tmp_path / "cache"
    modes = (f"regular@{PROXY_PORT}", f"reverse:https://registry-1.docker.io@{MIRROR_PORT}")
    rc = regcache_factory(cache_dir=cache, modes=modes)
    env = proxy_env(world, rc)
    secret = world.image("docker.io/private/secret:1")
    layer = secret_layer(world)
    assert skopeo_copy(world, PRIVATE, tmp_path / "user", env, CREDS).returncode == 0
    assert skopeo_copy(world, PUBLIC, tmp_path / "public", env).returncode == 0

    # An anonymous client names the private digests under public repositories, in any registry.
    token = f"Authorization: Bearer {pull_token(world, 'library/small')}"
    mirror = f"http://{world.router_client_ip}:{MIRROR_PORT}"
    attempts = {
        "blob": (blob_url("library/small", layer), [token], (), True),
        "blob-head": (blob_url("library/small", layer), [token], ("-I",), True),
        "blob-range": (blob_url("library/small", layer), [token, "Range: bytes=0-99"], (), True),
        "manifest": (f"{DOCKER_API}/v2/library/small/manifests/{secret.digest}", [token, ACCEPT], (), True),
        "manifest-head": (f"{DOCKER_API}/v2/library/small/manifests/{secret.digest}", [token, ACCEPT], ("-I",), True),
        "ghcr-blob": (blob_url("owner/small", layer, "https://ghcr.io"), [], (), True),
        "ghcr-manifest": (f"https://ghcr.io/v2/owner/small/manifests/{secret.digest}", [ACCEPT], (), True),
        "mirror-ns": (f"{mirror}/v2/owner/small/blobs/{layer}?ns=ghcr.io", [], (), False),
        "mirror-prefix": (f"{mirror}/v2/ghcr.io/owner/small/blobs/{layer}", [], (), False),
    }

    def attack(label: str):
        url, headers, extra, proxy = attempts[label]
        return curl(world, rc, url, tmp_path / label, headers=headers, extra=extra, proxy=proxy).run()

    for label in attempts:
        c = attack(label)
        assert_not_served(c, layer if "manifest" not in label else secret.digest)
    assert "not serving cached docker.io/library/small" in rc.log_text()

    # Offline, with the same cache: unknown membership is a 404, never the bytes; the public
    # image the cache holds under its own name is still served.
    rc.stop()
    rc = regcache_factory(cache_dir=cache, modes=modes, options={"regcache_offline": "true"})
    for label in ("blob", "blob-head", "manifest", "ghcr-blob", "mirror-ns"):
        assert_not_served(attack(label), layer if "manifest" not in label else secret.digest)
    offline = skopeo_copy(world, PUBLIC, tmp_path / "public-offline", proxy_env(world, rc))
    assert offline.returncode == 0, offline.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "public-offline") == world.image("docker.io/library/small:1").manifest_digest


def test_shared_upstream_answers_are_checked_for_each_client(world, regcache_factory, tmp_path):
    rc = regcache_factory(config="tag_ttl: 1s\n")
    secret = world.image("docker.io/private/secret:1")
    url = f"{DOCKER_API}/v2/private/secret/manifests/1"
    user = f"Authorization: Bearer {pull_token(world, 'private/secret', 'testuser:testpass')}"

    def overlapped(name: str, extra=()):
        """testuser's request, and an anonymous one while testuser's is in flight upstream."""
        with upstream_stalled(world):
            leader = curl(world, rc, url, tmp_path / f"{name}-user", headers=[user, ACCEPT], extra=extra).start()
            time.sleep(0.7)
            anon = curl(world, rc, url, tmp_path / f"{name}-anon", headers=[ACCEPT], extra=extra).start()
            time.sleep(0.7)
        return leader.wait(), anon.wait()

    # A HEAD miss: the tag's digest is for testuser only.
    leader, anon = overlapped("head", ("-I",))
    assert leader.status == 200 and leader.headers.get("docker-content-digest") == secret.digest, leader.describe()
    assert anon.status == 401, anon.describe()
    assert anon.headers.get("docker-content-digest") is None

    # A GET miss, then a revalidation past the tag TTL: the manifest is for testuser only.
    for name in ("get", "revalidate"):
        if name == "revalidate":
            time.sleep(1.5)
        leader, anon = overlapped(name)
        assert leader.status == 200 and body_digest(leader) == secret.digest, leader.describe()
        assert_not_served(anon, secret.digest, status=401)
    assert "outcome=REVALIDATED" in rc.log_text() or "outcome=MISS" in rc.log_text()


def test_a_404_never_makes_a_repository_private(world, regcache_factory, tmp_path):
    rc = regcache_factory(config="public_ttl: 1s\n")
    env = proxy_env(world, rc)
    assert skopeo_copy(world, PUBLIC, tmp_path / "public", env).returncode == 0
    assert skopeo_copy(world, PRIVATE, tmp_path / "user", env, CREDS).returncode == 0
    time.sleep(1.5)  # the public verdict is due for a re-check

    token = f"Authorization: Bearer {pull_token(world, 'library/small')}"
    unknown = "sha256:" + "0" * 64
    for n, digest in enumerate((secret_layer(world), unknown, unknown)):
        c = curl(world, rc, blob_url("library/small", digest), tmp_path / f"probe{n}", headers=[token]).run()
        assert c.status == 404, c.describe()

    world.stop_upstream()
    try:
        out = skopeo_copy(world, PUBLIC, tmp_path / "after", env)
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "after") == world.image("docker.io/library/small:1").manifest_digest
    finally:
        world.start_upstream()


def test_cache_dir_is_readable_by_its_owner_only(world, regcache_factory, tmp_path):
    """Whatever the umask: the cache dir holds private images and names of private repositories."""
    import os
    import stat

    cache = tmp_path / "cache"
    old = os.umask(0o022)  # mitmdump inherits it
    try:
        rc = regcache_factory(cache_dir=cache)
    finally:
        os.umask(old)
    env = proxy_env(world, rc)
    assert skopeo_copy(world, PRIVATE, tmp_path / "user", env, CREDS).returncode == 0
    assert skopeo_copy(world, PUBLIC, tmp_path / "public", env).returncode == 0
    rc.stop()
    assert (cache / "misses.jsonl").exists()
    loose = []
    for root, dirs, files in os.walk(cache):
        for name in [*dirs, *files, "."]:
            mode = os.lstat(os.path.join(root, name)).st_mode
            if stat.S_IMODE(mode) & 0o077:
                loose.append((os.path.join(root, name), oct(stat.S_IMODE(mode))))
    assert not loose, loose


FAKE_REGISTRY = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_HEAD = do_GET
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def test_a_client_chosen_scheme_or_port_never_reaches_the_shared_cache(world, regcache_factory, tmp_path):
    """http://quay.io/... answers (here: a forged manifest on quay.io:80) are the asking
    client's alone; a failing https://quay.io:9999 backs off nothing for everyone else."""
    quay_ip = world.upstream_ips["quay.io"]
    fake = world.popen(world.ns_upstream, [sys.executable, "-c", FAKE_REGISTRY, quay_ip, "80"], group="upstream-fake",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc = regcache_factory()
        env = proxy_env(world, rc)
        time.sleep(0.5)
        forged = curl(world, rc, "http://quay.io/v2/org/s2/manifests/1", tmp_path / "forged").run()
        assert forged.status == 200 and forged.headers.get("x-cache") is None, forged.describe()
        wrong_port = curl(world, rc, "https://quay.io:9999/v2/org/s2/manifests/1", tmp_path / "port").run()
        assert wrong_port.status != 200, wrong_port.describe()

        out = skopeo_copy(world, "docker://quay.io/org/s2:1", tmp_path / "s2", env)
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "s2") == world.image("quay.io/org/s2:1").manifest_digest
        assert "backed off" not in rc.log_text()
    finally:
        fake.kill()
        fake.wait()


TRICKLE = r"""
import socket, sys, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 443)); srv.listen(128)
def drip(c):
    try:
        for _ in range(60):
            c.send(b"\x16"); time.sleep(5)
    except OSError:
        pass
end = time.time() + 120
srv.settimeout(1)
while time.time() < end:
    try:
        c, _ = srv.accept()
    except socket.timeout:
        continue
    threading.Thread(target=drip, args=(c,), daemon=True).start()
"""


@pytest.mark.slow
def test_a_trickling_upstream_stalls_no_one_else(world, regcache_factory, tmp_path):
    """16 requests to a registry that sends one byte every 5 s: cached hits stay instant,
    other registries' misses stay fast, and the trickling requests end at the deadline."""
    trickle_ip = f"{world.router_upstream_ip.rsplit('.', 1)[0]}.50"
    dev = f"{world.prefix}-u0"
    world.run(world.ns_upstream, ["ip", "addr", "add", f"{trickle_ip}/24", "dev", dev])
    server = world.popen(world.ns_upstream, [sys.executable, "-c", TRICKLE, trickle_ip], group="upstream-fake")
    world.write_hosts(world.ns_router, {**world.upstream_ips, "nvcr.io": trickle_ip})
    try:
        rc = regcache_factory(config="upstream_timeout: 8s\n")
        cached = "https://quay.io/v2/org/s2/manifests/1"
        docker_accept = "Accept: application/vnd.docker.distribution.manifest.v2+json"
        warm = curl(world, rc, cached, tmp_path / "warm", headers=[docker_accept]).run()
        assert warm.status == 200, warm.describe()
        time.sleep(0.5)  # the public probe that follows a miss

        slow = [curl(world, rc, f"https://nvcr.io/v2/x/y/manifests/t{n}", tmp_path / f"slow{n}", max_time=60).start()
                for n in range(16)]
        time.sleep(1.0)
        started = time.monotonic()
        hit = curl(world, rc, cached, tmp_path / "hit", headers=[docker_accept]).run()
        hit_time = time.monotonic() - started
        assert hit.status == 200 and hit.headers.get("x-cache") == "HIT", hit.describe()
        started = time.monotonic()
        miss = curl(world, rc, "https://gcr.io/v2/proj/small/manifests/1", tmp_path / "miss", headers=[ACCEPT]).run()
        miss_time = time.monotonic() - started
        assert miss.status == 200, miss.describe()
        assert hit_time < 2.0, f"cached hit took {hit_time:.1f}s behind a trickling upstream"
        assert miss_time < 5.0, f"another registry's miss took {miss_time:.1f}s behind a trickling upstream"

        started = time.monotonic()
        for c in slow:
            c.wait(90)
            assert c.status == 503, c.describe()
        assert time.monotonic() - started < 40, "the trickling requests outlived their deadline"
    finally:
        server.kill()
        server.wait()
        world.write_hosts(world.ns_router)
        world.run(world.ns_upstream, ["ip", "addr", "del", f"{trickle_ip}/24", "dev", dev], check=False)

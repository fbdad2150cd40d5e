"""Issue 4: one upstream download per blob, shared by every client that asks for it.

Real parts only: curl clients in the client namespace talk HTTPS through regcache
(HTTPS proxy or registry mirror) to the namespace world's docker.io, whose blob GETs are
307'd to the CDN host; upstream downloads are counted in the CDN's and the registry's nginx
access logs. To make "while the fill is in progress" deterministic, the upstream link is
shaped with a tc token bucket (tbf) on the upstream namespace's veth for the test only, so
the 30 MiB layer of docker.io/library/big:1 takes a few seconds to download.

The helpers at the top are shared with test_faults.py and test_privacy.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from .conftest import FASTPATH_EVERY_BLOB, FASTPATH_PORT, MIRROR_PORT, PROXY_PORT, Regcache

pytestmark = pytest.mark.e2e

DOCKER_API = "https://registry-1.docker.io"

# --------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def big_layer(world) -> tuple[str, int]:
    """(digest, size) of the 30 MiB layer of docker.io/library/big:1."""
    img = world.image("docker.io/library/big:1")
    digest = max(img.layer_sizes, key=img.layer_sizes.get)
    size = img.layer_sizes[digest]
    assert size >= 30 * 1024 * 1024, img.layer_sizes
    return digest, size


def upstream_blob_path(world, digest: str, host: str = "registry-1.docker.io") -> Path:
    """The blob's data file in the upstream registry's storage (what the CDN serves)."""
    hexd = digest.split(":", 1)[1]
    return world.registry_root(host) / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def pull_token(world, repo: str, creds: str | None = None) -> str:
    """A docker.io pull token for repo from auth.docker.io (asked directly, not via regcache)."""
    query = urlencode({"service": "registry.docker.io", "scope": f"repository:{repo}:pull"})
    argv = ["curl", "-sS", "--fail", "--cacert", world.ca_bundle_path, f"https://auth.docker.io/token?{query}"]
    if creds:
        argv += ["-u", creds]
    return json.loads(world.run(world.ns_client, argv).stdout)["token"]


def cdn_gets(world, digest: str) -> list[dict]:
    """GETs of this blob's file at the CDN (each is one upstream download of the bytes)."""
    hexd = digest.split(":", 1)[1]
    return [e for e in world.request_log(world.cdn_host) if e["method"] == "GET" and f"/{hexd}/data" in e["path"]]


def registry_blob_gets(world, repo: str, digest: str) -> list[dict]:
    """GETs of the blob at registry-1.docker.io (answered 307 to the CDN when authorized)."""
    path = f"/v2/{repo}/blobs/{digest}"
    return [e for e in world.request_log("registry-1.docker.io") if e["method"] == "GET" and e["path"].split("?")[0] == path]


def settle_logs(seconds: float = 0.5) -> None:
    """nginx logs a request when it finalizes it; give late lines a moment to appear."""
    time.sleep(seconds)


@contextmanager
def throttled_upstream(world, rate: str = "80mbit"):
    """Shape everything the upstream namespace sends (a tc token bucket on its veth)."""
    dev = f"{world.prefix}-u0"
    world.run(world.ns_upstream, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms"])
    try:
        yield
    finally:
        world.run(world.ns_upstream, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)


def parse_header_file(path: Path) -> tuple[int, dict[str, str]]:
    """Status and headers of the last response in a curl -D file (after CONNECT / redirects)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip().startswith("HTTP/")]
    if not blocks:
        return 0, {}
    lines = blocks[-1].strip().split("\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


@dataclass
class Curl:
    """One curl in the client namespace; body to a file, headers to another."""

    world: object
    url: str
    out: Path
    proc: subprocess.Popen | None = None
    exit_code: int | None = None
    stderr: str = ""
    argv: list = field(default_factory=list)

    @property
    def header_path(self) -> Path:
        return self.out.with_name(self.out.name + ".headers")

    def start(self) -> "Curl":
        self.proc = self.world.popen(self.world.ns_client, self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def wait(self, timeout: float = 120) -> "Curl":
        assert self.proc is not None
        _, err = self.proc.communicate(timeout=timeout)
        self.exit_code = self.proc.returncode
        self.stderr = err.decode(errors="replace")
        return self

    def run(self, timeout: float = 120) -> "Curl":
        return self.start().wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(10)

    def received(self) -> int:
        return self.out.stat().st_size if self.out.exists() else 0

    def wait_received(self, n: int, timeout: float = 30) -> int:
        """Wait until at least n body bytes arrived (the download is under way)."""
        deadline = time.monotonic() + timeout
        while self.received() < n:
            if self.proc.poll() is not None:
                raise AssertionError(f"curl ended early ({self.proc.returncode}) after {self.received()} bytes: {self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.received()} bytes after {timeout}s")
            time.sleep(0.02)
        return self.received()

    @property
    def status(self) -> int:
        return parse_header_file(self.header_path)[0]

    @property
    def headers(self) -> dict[str, str]:
        return parse_header_file(self.header_path)[1]

    def sha256(self) -> str:
        return sha256_file(self.out)

    def describe(self) -> str:
        return f"curl {self.url}: exit {self.exit_code}, status {self.status}, {self.received()} bytes, stderr {self.stderr.strip()!r}"


def client_bundle(rc: Regcache) -> Path:
    """rc.client_bundle(), written once: rewriting it while other curls read it breaks them."""
    bundle = rc.workdir / "client-bundle.pem"
    return bundle if bundle.exists() else rc.client_bundle()


def curl(world, rc: Regcache, url: str, out: Path, *, headers=(), extra=(), proxy: bool = True, http1: bool = False, max_time: int = 120) -> Curl:
    """A curl through regcache's HTTPS proxy (proxy=True) or straight to url (mirror, fast path)."""
    argv = ["curl", "-sS", "-o", str(out), "-D", str(out) + ".headers", "--max-time", str(max_time), "--cacert", str(client_bundle(rc))]
    if proxy:
        argv += ["--proxy", f"http://{world.router_client_ip}:{PROXY_PORT}"]
    if http1:
        argv += ["--http1.1"]
    for h in headers:
        argv += ["-H", h]
    argv += [*extra, url]
    out.parent.mkdir(parents=True, exist_ok=True)
    return Curl(world, url, out, argv=argv)


def blob_url(repo: str, digest: str, base: str = DOCKER_API) -> str:
    return f"{base}/v2/{repo}/blobs/{digest}"


def store_has_blob(cache_dir: Path, digest: str) -> bool:
    """Look into the cache directory with the store's own code (diskcache is process-safe)."""
    from regcachelib.store import Store

    store = Store(str(cache_dir))
    try:
        return store.has_blob(digest)
    finally:
        store.close()


def staging_files(cache_dir: Path) -> list[str]:
    d = cache_dir / "staging"
    return sorted(os.listdir(d)) if d.exists() else []


def wait_staging_empty(cache_dir: Path, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while staging_files(cache_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return staging_files(cache_dir)


# ----------------------------------------------------------------------------- tests

CLIENTS = 15
# curl through HTTPS_PROXY does not follow the fast path's 307 (every proxied client gets it by
# default): the single-flight tests read blob bodies in-band
IN_BAND = "fastpath: off\n"


@pytest.mark.slow
def test_concurrent_clients_share_one_upstream_download(world, regcache_factory, tmp_path):
    """15 clients ask for the same uncached 30 MiB blob at once: one GET reaches upstream
    (one 307 at the registry, one GET at the CDN), every client gets the exact bytes, and
    each of them was served from the download in progress (X-Cache: MISS, not HIT)."""
    rc = regcache_factory(config=IN_BAND)
    digest, size = big_layer(world)
    token = pull_token(world, "library/big")
    before_cdn, before_reg = len(cdn_gets(world, digest)), len(registry_blob_gets(world, "library/big", digest))

    with throttled_upstream(world):
        clients = [
            curl(world, rc, blob_url("library/big", digest), tmp_path / f"c{i}", headers=[f"Authorization: Bearer {token}"])
            for i in range(CLIENTS)
        ]
        for c in clients:
            c.start()
        t0 = time.monotonic()
        for c in clients:
            c.wait()
        elapsed = time.monotonic() - t0

    for c in clients:
        assert c.exit_code == 0 and c.status == 200, c.describe() + rc.log_text()[-3000:]
        assert c.received() == size, c.describe()
        assert c.sha256() == digest, c.describe()
        assert c.headers.get("x-cache") == "MISS", c.describe()
    # the throttle made it a real overlap: the download took a while
    assert elapsed > 1.0, elapsed

    settle_logs()
    assert len(cdn_gets(world, digest)) - before_cdn == 1, cdn_gets(world, digest)
    assert len(registry_blob_gets(world, "library/big", digest)) - before_reg == 1
    assert rc.log_text().count("outcome=MISS via=inband") >= CLIENTS

    # and it is stored: the next client is a HIT with no new upstream GET
    hit = curl(world, rc, blob_url("library/big", digest), tmp_path / "hit", headers=[f"Authorization: Bearer {token}"]).run()
    assert hit.exit_code == 0 and hit.headers.get("x-cache") == "HIT" and hit.sha256() == digest, hit.describe()
    settle_logs()
    assert len(cdn_gets(world, digest)) - before_cdn == 1


def test_range_followers_get_206_during_fill(world, regcache_factory, tmp_path):
    """Clients with Range join a download in progress: 206, Content-Range, exact bytes."""
    rc = regcache_factory(config=IN_BAND)
    digest, size = big_layer(world)
    token = pull_token(world, "library/big")
    truth = upstream_blob_path(world, digest).read_bytes()
    assert len(truth) == size
    auth = [f"Authorization: Bearer {token}"]
    before_cdn = len(cdn_gets(world, digest))
    ranges = [(1000, 1999), (size // 2, size // 2 + 999_999), (size - 10_000, size - 1)]

    with throttled_upstream(world):
        leader = curl(world, rc, blob_url("library/big", digest), tmp_path / "leader", headers=auth).start()
        got = leader.wait_received(512 * 1024)
        followers = [
            curl(world, rc, blob_url("library/big", digest), tmp_path / f"r{i}", headers=auth, extra=["-r", f"{a}-{b}"]).start()
            for i, (a, b) in enumerate(ranges)
        ]
        suffix = curl(world, rc, blob_url("library/big", digest), tmp_path / "suffix", headers=auth, extra=["-H", "Range: bytes=-4096"]).start()
        for f in [*followers, suffix]:
            f.wait()
        leader.wait()
    assert got < size  # the followers really joined mid-download

    assert leader.exit_code == 0 and leader.sha256() == digest, leader.describe()
    for f, (a, b) in zip(followers, ranges):
        assert f.exit_code == 0 and f.status == 206, f.describe() + rc.log_text()[-3000:]
        assert f.headers.get("content-range") == f"bytes {a}-{b}/{size}", f.headers
        assert f.headers.get("x-cache") == "MISS", f.headers
        assert f.out.read_bytes() == truth[a : b + 1]
    assert suffix.exit_code == 0 and suffix.status == 206, suffix.describe()
    assert suffix.headers.get("content-range") == f"bytes {size - 4096}-{size - 1}/{size}"
    assert suffix.out.read_bytes() == truth[-4096:]

    settle_logs()
    assert len(cdn_gets(world, digest)) - before_cdn == 1, cdn_gets(world, digest)
    # Range never travels upstream: the one CDN GET fetched the whole blob
    assert cdn_gets(world, digest)[-1]["range"] == ""


@pytest.mark.slow
def test_first_client_aborts_others_finish_and_blob_is_stored(world, regcache_factory, tmp_path):
    """The download belongs to the cache, not to the client that started it."""
    rc = regcache_factory(config=IN_BAND)
    digest, size = big_layer(world)
    token = pull_token(world, "library/big")
    auth = [f"Authorization: Bearer {token}"]
    before_cdn = len(cdn_gets(world, digest))

    with throttled_upstream(world):
        leader = curl(world, rc, blob_url("library/big", digest), tmp_path / "leader", headers=auth).start()
        leader.wait_received(1024 * 1024)
        followers = [curl(world, rc, blob_url("library/big", digest), tmp_path / f"f{i}", headers=auth).start() for i in range(3)]
        for f in followers:
            f.wait_received(1)  # they are reading the same download
        leader.kill()
        killed_at = leader.received()
        for f in followers:
            f.wait()
    assert killed_at < size, "the first client was killed mid-download"
    for f in followers:
        assert f.exit_code == 0 and f.status == 200 and f.sha256() == digest, f.describe() + rc.log_text()[-3000:]
        assert f.headers.get("x-cache") == "MISS"

    assert wait_staging_empty(rc.cache_dir) == []
    hit = curl(world, rc, blob_url("library/big", digest), tmp_path / "hit", headers=auth).run()
    assert hit.exit_code == 0 and hit.headers.get("x-cache") == "HIT" and hit.sha256() == digest, hit.describe()
    settle_logs()
    assert len(cdn_gets(world, digest)) - before_cdn == 1, cdn_gets(world, digest)
    assert rc.proc.poll() is None


def _mirror_blob_redirect(world, rc: Regcache, tmp_path: Path, repo: str, digest: str, name: str) -> str:
    """GET a blob from the mirror listener without following: the fast-path Location."""
    token = pull_token(world, repo)
    c = curl(world, rc, f"http://{world.router_client_ip}:{MIRROR_PORT}/v2/{repo}/blobs/{digest}", tmp_path / name,
             headers=[f"Authorization: Bearer {token}"], proxy=False).run()
    assert c.exit_code == 0 and c.status == 307, c.describe() + rc.log_text()[-3000:]
    location = c.headers["location"]
    assert location.startswith(f"http://{world.router_client_ip}:{FASTPATH_PORT}/_regcache/blobs/{digest}?"), location
    return location


def _fetch_fastpath(world, rc, tmp_path, url: str, name: str) -> Curl:
    return curl(world, rc, url, tmp_path / name, proxy=False).run()


def _with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    q.update(changes)
    q = {k: v for k, v in q.items() if v is not None}
    return parts._replace(query=urlencode(q)).geturl()


def test_fastpath_url_signature(world, regcache_factory, tmp_path):
    """Mirror mode answers blob GETs with a 307 to a signed plain-HTTP URL: the fresh URL
    serves the exact bytes; any tampering (signature, digest, expiry, missing parts) is 403."""
    rc = regcache_factory(modes=[f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"], wait_ports=[MIRROR_PORT, FASTPATH_PORT])
    img = world.image("docker.io/library/small:1")
    layers = sorted((d for d in img.blobs if d != img.config_digest), key=img.layer_sizes.get)
    digest, other = layers[-1], layers[0]
    location = _mirror_blob_redirect(world, rc, tmp_path, "library/small", digest, "redirect")

    ok = _fetch_fastpath(world, rc, tmp_path, location, "fresh")
    assert ok.exit_code == 0 and ok.status == 200, ok.describe()
    assert ok.sha256() == digest and ok.headers.get("docker-content-digest") == digest

    parts = urlsplit(location)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    sig, exp = q["sig"], int(q["exp"])
    forged = [
        _with_query(location, sig=("0" if sig[0] != "0" else "1") + sig[1:]),  # one hex digit changed
        _with_query(location, sig=None),  # no signature
        _with_query(location, exp=None),  # no expiry
        _with_query(location, exp=str(exp + 3600)),  # lifetime stretched
        _with_query(location, exp=str(exp - 10_000)),  # made to look old
        location.replace(digest, other),  # the signature of one blob used for another
        f"http://{world.router_client_ip}:{FASTPATH_PORT}/_regcache/blobs/{digest}",
    ]
    for i, url in enumerate(forged):
        bad = _fetch_fastpath(world, rc, tmp_path, url, f"forged{i}")
        assert bad.exit_code == 0 and bad.status == 403, f"{url}: {bad.describe()}"
        assert json.loads(bad.out.read_bytes())["errors"][0]["code"] == "DENIED"
    # the genuine URL keeps working within its lifetime
    again = _fetch_fastpath(world, rc, tmp_path, location, "again")
    assert again.status == 200 and again.sha256() == digest


FAKETIME_LIB = next(
    (p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                 "/usr/lib/faketime/libfaketimeMT.so.1") if os.path.exists(p)),
    None,
)


@pytest.mark.skipif(FAKETIME_LIB is None, reason="an expired but genuinely signed URL needs regcache's clock moved past the "
                    "60 s URL lifetime; that needs libfaketime (apt-get install faketime)")
def test_fastpath_url_expires(world, tmp_path):
    """A genuinely signed URL is refused once its lifetime is over; a newly issued one works.

    regcache runs under libfaketime with a clock offset read from a file, so the test moves
    regcache's wall clock 400 s ahead (URLs live 60 s) without waiting."""
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    workdir = tmp_path / "rc"
    workdir.mkdir()
    rc = Regcache(world, workdir, workdir / "cache", [f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"], {},
                  FASTPATH_EVERY_BLOB)
    rc.argv = ["env", f"LD_PRELOAD={FAKETIME_LIB}", f"FAKETIME_TIMESTAMP_FILE={clock}", "FAKETIME_NO_CACHE=1",
               "FAKETIME_DONT_FAKE_MONOTONIC=1", *rc.argv]
    rc.start([MIRROR_PORT, FASTPATH_PORT])
    try:
        img = world.image("docker.io/library/small:1")
        digest = max((d for d in img.blobs if d != img.config_digest), key=img.layer_sizes.get)
        location = _mirror_blob_redirect(world, rc, tmp_path, "library/small", digest, "redirect")
        ok = _fetch_fastpath(world, rc, tmp_path, location, "fresh")
        assert ok.status == 200 and ok.sha256() == digest, ok.describe() + rc.log_text()[-2000:]

        clock.write_text("+400\n")
        time.sleep(0.2)
        expired = _fetch_fastpath(world, rc, tmp_path, location, "expired")
        assert expired.exit_code == 0 and expired.status == 403, expired.describe() + rc.log_text()[-2000:]

        renewed = _mirror_blob_redirect(world, rc, tmp_path, "library/small", digest, "redirect2")
        assert renewed != location
        ok2 = _fetch_fastpath(world, rc, tmp_path, renewed, "renewed")
        assert ok2.status == 200 and ok2.sha256() == digest, ok2.describe()
    finally:
        rc.stop()

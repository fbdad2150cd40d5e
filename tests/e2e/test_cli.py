"""The `regcache` command against a real populated cache: images are pulled through a real
regcache (mitmdump in the router namespace) by skopeo first; then stats/ls, the metrics
endpoint and status page (in headless Chromium), export -> skopeo, import -> offline pull,
gc -> pull with upstream stopped, verify -> quarantine, warm (direct, from the miss log,
through the mirror), client-config used by a real client, and the CA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import MIRROR_PORT, PROXY_PORT, Regcache, dir_manifest_digest, skopeo_copy

pytestmark = pytest.mark.e2e

REGCACHE = str(Path(sys.executable).parent / "regcache")
METRICS_PORT = 9090
ALT_PORT = 8090  # second regcache instances, while the populated one keeps 8080
ALT_CONFIG = "fastpath: false\n"  # the populated one holds the fast-path port

PULLED = ["docker.io/library/small:1", "docker.io/library/s2:1", "quay.io/org/s2:1", "docker.io/library/multi:1", "quay.io/org/multi-oci:1"]


def cli(*args, check=True, env=None, timeout=120) -> subprocess.CompletedProcess:
    p = subprocess.run([REGCACHE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "REGCACHE_PROGRESS": "0", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"regcache {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def cli_in(world, ns, *args, check=True, env=None, timeout=180) -> subprocess.CompletedProcess:
    p = world.run(ns, [REGCACHE, *map(str, args)], env={"REGCACHE_PROGRESS": "0", **(env or {})}, check=False, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"regcache {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def proxy_env(world, rc, port=PROXY_PORT):
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{port}", "SSL_CERT_FILE": str(rc.client_bundle())}


def copy_cache(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def skopeo_ref(image: str) -> str:
    return "docker://" + image.replace("docker.io/", "registry-1.docker.io/", 1)


def arch_of(image) -> str:
    return image.children[0].platform if image.children else ""


class Populated:
    def __init__(self, world, rc: Regcache, workdir: Path):
        self.world = world
        self.rc = rc
        self.workdir = workdir

    @property
    def cache_dir(self) -> Path:
        return self.rc.cache_dir

    def wait_counted(self, predicate, timeout=15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = json.loads(cli("--dir", self.cache_dir, "stats", "--json").stdout)
            if predicate(doc) or time.monotonic() > deadline:
                return doc
            time.sleep(0.3)


@pytest.fixture(scope="module")
def populated(world, tmp_path_factory):
    """A regcache (proxy :8080, mirror :5000, metrics 127.0.0.1:9090 in the router ns) that
    skopeo pulled PULLED through, and small:1 once more (hits)."""
    workdir = tmp_path_factory.mktemp("populated")
    rc = Regcache(world, workdir, workdir / "cache", [f"regular@{PROXY_PORT}", f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"],
                  {"regcache_metrics": f"127.0.0.1:{METRICS_PORT}"}, None)
    rc.start((PROXY_PORT, MIRROR_PORT, METRICS_PORT))
    try:
        env = proxy_env(world, rc)
        for image in PULLED + ["docker.io/library/small:1"]:
            out = skopeo_copy(world, skopeo_ref(image), workdir / "pull", env, extra=["--override-arch", "amd64", "--override-os", "linux"])
            assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
        time.sleep(1.5)  # the statistics are flushed once a second
        yield Populated(world, rc, workdir)
    finally:
        rc.stop()
        world.start_upstream()


# --- seeing into it ----------------------------------------------------------------------------


def test_stats_and_ls_show_the_pulled_images(world, populated):
    doc = populated.wait_counted(lambda d: d["registries"].get("docker.io", {}).get("hits", 0) > 0)
    hub, quay = doc["registries"]["docker.io"], doc["registries"]["quay.io"]
    assert hub["misses"] > 0 and hub["hits"] > 0 and quay["misses"] > 0
    assert 0 < doc["hit_ratio"] < 1
    assert doc["bytes"]["from_upstream"] > 0 and doc["bytes"]["served"] > doc["bytes"]["from_upstream"]
    assert doc["bytes"]["saved"] > 0 and doc["bytes"]["from_cache"] > 0
    assert doc["store"]["blobs"] > 5 and doc["store"]["manifests"] >= 7 and doc["store"]["tags"] >= 5
    assert {t["image"] for t in doc["top_images"]} >= {"docker.io/library/small", "quay.io/org/s2"}
    text = cli("--dir", populated.cache_dir, "stats").stdout
    assert "hit ratio" in text and "docker.io" in text and "quay.io" in text and "saved" in text

    records = json.loads(cli("--dir", populated.cache_dir, "ls", "--json").stdout)
    by_ref = {f"{r['registry']}/{r['repo']}:{r['tag']}": r for r in records}
    for image in PULLED:
        expected = world.image(image)
        assert by_ref[image]["digest"] == expected.digest, image
        assert by_ref[image]["state"] == "complete" and by_ref[image]["size"] > 0
    assert "docker.io" in cli("--dir", populated.cache_dir, "ls").stdout
    tags = cli("--dir", populated.cache_dir, "ls", "quay.io/org/s2").stdout
    assert "quay.io/org/s2:1" in tags and world.image("quay.io/org/s2:1").digest[:19] in tags


def test_metrics_endpoint_and_status_page_in_chromium(world, populated, tmp_path):
    populated.wait_counted(lambda d: d["registries"].get("quay.io", {}).get("misses", 0) > 0)
    metrics = world.run(world.ns_router, ["curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
    assert 'regcache_requests_total{kind="manifest",outcome="MISS",registry="docker.io"}' in metrics
    assert 'regcache_requests_total{kind="blob",outcome="HIT",registry="docker.io"}' in metrics
    assert 'regcache_bytes_total{source="upstream"}' in metrics and "regcache_store_bytes" in metrics
    assert 'regcache_upstream_request_seconds_count{host="registry-1.docker.io"}' in metrics
    assert "regcache_fills_in_flight 0.0" in metrics

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (./test.sh installs it)")
    profile = tempfile.mkdtemp(prefix="rc-chromium-")
    try:
        argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--dump-dom",
                f"http://127.0.0.1:{METRICS_PORT}/"]
        out = world.run(world.ns_router, argv, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = out.stdout
    assert "<h1>regcache</h1>" in dom, out.stderr[-2000:]
    snap = json.loads(cli("--dir", populated.cache_dir, "stats", "--json").stdout)
    # what the page shows is what the counters say
    hit_card = dom.split('id="hit-ratio"', 1)[1].split("</div></div>", 1)[0]
    assert "Hit ratio" in hit_card and f'<div class="v">{100 * snap["hit_ratio"]:.1f}%</div>' in hit_card, hit_card
    assert f"{snap['hits']} hits · {snap['misses']} misses" in hit_card
    assert "Bytes saved" in dom and "Store fill" in dom
    top = dom.split('id="top-images"', 1)[1].split("</table>", 1)[0]
    assert "docker.io/library/small" in top and "quay.io/org/s2" in top
    misses = dom.split('id="recent-misses"', 1)[1].split("</table>", 1)[0]
    assert "quay.io/org/multi-oci" in misses  # the last image pulled
    registries = dom.split('id="registries"', 1)[1].split("</table>", 1)[0]
    assert "docker.io" in registries and "quay.io" in registries


# --- export / import ------------------------------------------------------------------------------


def skopeo_read(bundle_ref: str, dest: Path, arch: str = "amd64") -> None:
    r = subprocess.run(["skopeo", "copy", "--override-arch", arch, "--override-os", "linux", bundle_ref, f"dir:{dest}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_export_is_read_by_skopeo_with_the_same_digests(world, populated, tmp_path):
    """OCI-typed images by name from one bundle; Docker-typed ones (kept Docker-typed: a
    conversion would change their digests) from a bundle each, which skopeo reads unnamed."""
    bundle = tmp_path / "bundle"
    out = cli("--dir", populated.cache_dir, "export", *PULLED, "-o", bundle)
    assert "exported 5 image(s)" in out.stdout
    assert "platform manifests are not cached" in out.stderr  # only amd64 of the multi-arch images
    assert "Docker-typed" in out.stderr
    index = json.loads((bundle / "index.json").read_text())
    assert {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]} == {i: world.image(i).digest for i in PULLED}

    def check(dest: Path, image: str) -> None:
        expected = world.image(image)
        if expected.is_index:
            child = expected.child("linux/amd64")
            assert dir_manifest_digest(dest) == child.digest, image
            blobs = child.blobs
        else:
            assert dir_manifest_digest(dest) == expected.digest, image
            blobs = expected.blobs
        for blob in blobs:
            assert hashlib.sha256((dest / blob.split(":")[1]).read_bytes()).hexdigest() == blob.split(":")[1]

    for image in ("docker.io/library/small:1", "quay.io/org/multi-oci:1"):  # OCI-typed
        dest = tmp_path / image.replace("/", "_")
        skopeo_read(f"oci:{bundle}:{image}", dest)
        check(dest, image)
    for image in ("docker.io/library/s2:1", "quay.io/org/s2:1", "docker.io/library/multi:1"):  # Docker-typed
        alone = tmp_path / ("alone-" + image.replace("/", "_").replace(":", "_"))  # no ":" in an oci: path
        cli("--dir", populated.cache_dir, "export", image, "-o", alone)
        dest = tmp_path / image.replace("/", "_")
        skopeo_read(f"oci:{alone}", dest)
        check(dest, image)


def test_import_into_an_empty_dir_serves_an_offline_pull(world, populated, regcache_factory, tmp_path):
    bundle = tmp_path / "bundle"
    images = ["docker.io/library/small:1", "quay.io/org/s2:1", "docker.io/library/multi:1"]
    cli("--dir", populated.cache_dir, "export", *images, "-o", bundle)
    fresh = tmp_path / "fresh-cache"
    # offline, only the operator can vouch that these repositories are public (the bundle's word is not taken)
    out = cli("--dir", fresh, "import", bundle, "--public")
    assert "imported 3 image(s)" in out.stdout and "verified and stored" in out.stdout
    assert "recorded as public" in out.stdout
    assert cli("--dir", fresh, "verify").returncode == 0
    from regcachelib.inventory import parse_image
    from regcachelib.store import Store

    store = Store(str(fresh))
    try:
        for image in images:  # each repository is known to hold what was imported under it
            ref, expected = parse_image(image), world.image(image)
            part = expected.child("linux/amd64") if expected.is_index else expected
            held = [expected.digest, part.digest, *part.blobs]
            assert all(store.holds(ref.registry, ref.repo, d) for d in held), image
    finally:
        store.close()
    world.stop_upstream()
    try:
        rc = regcache_factory(cache_dir=fresh, modes=(f"regular@{ALT_PORT}",), options={"regcache_offline": "true"}, config=ALT_CONFIG)
        env = proxy_env(world, rc, ALT_PORT)
        for image in images:
            dest = tmp_path / ("pull-" + image.replace("/", "_"))
            r = skopeo_copy(world, skopeo_ref(image), dest, env, extra=["--override-arch", "amd64", "--override-os", "linux"])
            assert r.returncode == 0, r.stderr + rc.log_text()[-3000:]
            expected = world.image(image)
            want = expected.child("linux/amd64").digest if expected.is_index else expected.digest
            assert dir_manifest_digest(dest) == want, image
        assert "outcome=MISS" not in rc.log_text()
    finally:
        world.start_upstream()


# --- gc ----------------------------------------------------------------------------------------------


def test_gc_evicts_lru_keeps_pins_and_never_breaks_a_retained_image(world, populated, regcache_factory, tmp_path):
    cache = copy_cache(populated.cache_dir, tmp_path / "cache")
    cli("--dir", cache, "pin", "quay.io/org/s2:1")
    before = {f"{r['registry']}/{r['repo']}:{r['tag']}" for r in json.loads(cli("--dir", cache, "ls", "--json").stdout)}
    assert before == set(PULLED)
    volume = json.loads(cli("--dir", cache, "stats", "--json").stdout)["store"]["size"]
    # one byte too many: exactly the least recently used image goes (s2: small:1 was pulled again later)
    out = cli("--dir", cache, "gc", "--max-size", str(volume - 1)).stdout
    after = {f"{r['registry']}/{r['repo']}:{r['tag']}" for r in json.loads(cli("--dir", cache, "ls", "--json").stdout)}
    assert before - after == {"docker.io/library/s2:1"}, out
    # small:1 shares its base layer with the evicted s2: it must still be complete
    assert all(r["state"] == "complete" for r in json.loads(cli("--dir", cache, "ls", "--json").stdout))
    # now everything that may go
    out = cli("--dir", cache, "gc", "--max-size", "1").stdout
    assert "kept 1 pinned" in out
    left = json.loads(cli("--dir", cache, "ls", "--json").stdout)
    assert [(r["registry"], r["repo"], r["state"], r["pinned"]) for r in left] == [("quay.io", "org/s2", "complete", True)]
    assert cli("--dir", cache, "verify").returncode == 0
    doc = json.loads(cli("--dir", cache, "stats", "--json").stdout)
    assert doc["evictions"] > 0 and doc["evicted_bytes"] > 0

    world.stop_upstream()
    try:
        rc = regcache_factory(cache_dir=cache, modes=(f"regular@{ALT_PORT}",), config=ALT_CONFIG)
        env = proxy_env(world, rc, ALT_PORT)
        r = skopeo_copy(world, skopeo_ref("quay.io/org/s2:1"), tmp_path / "pinned", env)
        assert r.returncode == 0, r.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "pinned") == world.image("quay.io/org/s2:1").digest
        gone = skopeo_copy(world, skopeo_ref("docker.io/library/small:1"), tmp_path / "gone", env, timeout=60)
        assert gone.returncode != 0  # evicted, and upstream is down
    finally:
        world.start_upstream()


def test_gc_keeps_a_retained_image_pullable_with_upstream_stopped(world, populated, regcache_factory, tmp_path):
    """After the first eviction above, small:1 (sharing a layer with the evicted image) is
    pulled with the upstream stopped."""
    cache = copy_cache(populated.cache_dir, tmp_path / "cache")
    volume = json.loads(cli("--dir", cache, "stats", "--json").stdout)["store"]["size"]
    cli("--dir", cache, "gc", "--max-size", str(volume - 1))
    world.stop_upstream()
    try:
        rc = regcache_factory(cache_dir=cache, modes=(f"regular@{ALT_PORT}",), config=ALT_CONFIG)
        r = skopeo_copy(world, skopeo_ref("docker.io/library/small:1"), tmp_path / "small", proxy_env(world, rc, ALT_PORT))
        assert r.returncode == 0, r.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "small") == world.image("docker.io/library/small:1").digest
    finally:
        world.start_upstream()


# --- verify --------------------------------------------------------------------------------------------


def test_verify_detects_a_flipped_byte_and_quarantines_the_blob(world, populated, regcache_factory, tmp_path):
    cache = copy_cache(populated.cache_dir, tmp_path / "cache")
    from regcachelib.inventory import Inventory
    from regcachelib.store import Store

    image = world.image("docker.io/library/small:1")
    victim = max(image.blobs, key=lambda d: image.layer_sizes.get(d, 0))
    store = Store(str(cache))
    path = Path(Inventory(store).blob_path(victim))
    store.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    out = cli("--dir", cache, "verify", check=False)
    assert out.returncode == 1, out.stdout
    assert f"blob {victim}" in out.stdout and "MISMATCH" in out.stdout
    quarantined = list((cache / "quarantine").iterdir())
    assert any(p.name.startswith(victim.replace(":", "-")) and not p.name.endswith(".json") for p in quarantined)
    assert hashlib.sha256(next(p for p in quarantined if not p.name.endswith(".json")).read_bytes()).hexdigest() != victim.split(":")[1]
    assert not path.exists()
    assert cli("--dir", cache, "verify").returncode == 0
    assert json.loads(cli("--dir", cache, "stats", "--json").stdout)["verify_failures"] == 1
    # the next pull fetches the quarantined blob again and gets the right bytes
    rc = regcache_factory(cache_dir=cache, modes=(f"regular@{ALT_PORT}",), config=ALT_CONFIG)
    r = skopeo_copy(world, skopeo_ref("docker.io/library/small:1"), tmp_path / "again", proxy_env(world, rc, ALT_PORT))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "again" / victim.split(":")[1]).read_bytes()).hexdigest() == victim.split(":")[1]
    assert f"digest={victim} outcome=MISS" in rc.log_text()


# --- warm ------------------------------------------------------------------------------------------------


def test_warm_into_a_new_dir_then_offline_pull(world, regcache_factory, tmp_path):
    """Straight into the store from the router namespace: Docker Hub token auth, the CDN
    redirect, an OCI index with --platform all."""
    cache = tmp_path / "warmed"
    out = cli_in(world, world.ns_router, "--dir", cache, "warm", "docker.io/library/small:1", "quay.io/org/multi-oci:1", "--platform", "all",
                 "--upstream-ca", world.ca_bundle_path)
    assert "warmed 2 of 2 image(s)" in out.stdout, out.stdout + out.stderr
    multi = world.image("quay.io/org/multi-oci:1")
    records = {f"{r['registry']}/{r['repo']}:{r['tag']}": r for r in json.loads(cli("--dir", cache, "ls", "--json").stdout)}
    assert records["quay.io/org/multi-oci:1"]["digest"] == multi.digest and records["quay.io/org/multi-oci:1"]["state"] == "complete"
    assert any(e.get("path", "").startswith("/token") for e in world.request_log("auth.docker.io")) or world.token_log()
    again = cli_in(world, world.ns_router, "--dir", cache, "warm", "docker.io/library/small:1", "--upstream-ca", world.ca_bundle_path)
    assert "0 blobs fetched" in again.stdout and "already cached" in again.stdout
    world.stop_upstream()
    try:
        rc = regcache_factory(cache_dir=cache, modes=(f"regular@{ALT_PORT}",), options={"regcache_offline": "true"}, config=ALT_CONFIG)
        env = proxy_env(world, rc, ALT_PORT)
        r = skopeo_copy(world, skopeo_ref("docker.io/library/small:1"), tmp_path / "small", env)
        assert r.returncode == 0, r.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "small") == world.image("docker.io/library/small:1").digest
        r = skopeo_copy(world, skopeo_ref("quay.io/org/multi-oci:1"), tmp_path / "arm", env, extra=["--override-arch", "arm64", "--override-os", "linux"])
        assert r.returncode == 0, r.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "arm") == multi.child("linux/arm64").digest
    finally:
        world.start_upstream()


def test_warm_from_the_miss_log_of_another_cache(world, populated, tmp_path):
    cache = tmp_path / "other-site"
    out = cli_in(world, world.ns_router, "--dir", cache, "warm", "--from-misses", populated.cache_dir / "misses.jsonl",
                 "--upstream-ca", world.ca_bundle_path)
    assert f"warmed {len(PULLED)} of {len(PULLED)} image(s)" in out.stdout, out.stdout + out.stderr
    refs = {f"{r['registry']}/{r['repo']}:{r['tag']}" for r in json.loads(cli("--dir", cache, "ls", "--json").stdout)}
    assert refs == set(PULLED)


def test_warm_through_the_running_cache_mirror(world, populated):
    log_before = len(populated.rc.log_text())
    out = cli_in(world, world.ns_router, "warm", "--mirror", f"127.0.0.1:{MIRROR_PORT}", "docker.io/library/multi:1", "gcr.io/proj/small:1",
                 "--platform", "linux/arm64", "--platform", "linux/amd64", "--upstream-ca", world.ca_bundle_path)
    assert "warmed 2 of 2 image(s)" in out.stdout, out.stdout + out.stderr
    log = populated.rc.log_text()[log_before:]
    arm = world.image("docker.io/library/multi:1").child("linux/arm64").digest
    assert f"GET manifest registry=docker.io repo=library/multi digest={arm} outcome=MISS" in log
    assert "registry=gcr.io repo=proj/small tag=1 outcome=MISS" in log
    records = {f"{r['registry']}/{r['repo']}:{r['tag']}" for r in json.loads(cli("--dir", populated.cache_dir, "ls", "--json").stdout)}
    assert "gcr.io/proj/small:1" in records


# --- client-config and ca -----------------------------------------------------------------------------------


def test_podman_client_config_is_what_skopeo_uses(world, populated, tmp_path):
    conf = tmp_path / "registries.conf"
    text = cli("client-config", "podman", "--cache", f"{world.router_client_ip}:{MIRROR_PORT}", "--registry", "registry.k8s.io", "--registry", "docker.io").stdout
    conf.write_text(text)
    log_before = len(populated.rc.log_text())
    r = world.run(world.ns_client, ["skopeo", "--registries-conf", conf, "copy", "docker://registry.k8s.io/pause:1", f"dir:{tmp_path / 'pause'}"],
                  env={"SSL_CERT_FILE": str(world.ca_bundle_path), "REGISTRY_AUTH_FILE": str(world.auth_file)}, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert dir_manifest_digest(tmp_path / "pause") == world.image("registry.k8s.io/pause:1").digest
    assert "registry=registry.k8s.io repo=pause tag=1 outcome=MISS" in populated.rc.log_text()[log_before:]


def test_iptables_client_config_applies_in_a_netns(world):
    ns = f"rccfg{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        script = cli("client-config", "iptables", "--user", "0", "--iface", "eth1").stdout
        r = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        saved = subprocess.run(["ip", "netns", "exec", ns, "iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        assert "-A PREROUTING -i eth1 -p tcp -m tcp --dport 443 -j REGCACHE" in saved
        assert "-A OUTPUT -p tcp -m tcp --dport 443 -m owner ! --uid-owner 0 -j REGCACHE" in saved
        assert "-A REGCACHE -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8081" in saved
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_ca_created_by_regcache_is_the_one_mitmproxy_signs_with(world, tmp_path):
    workdir = tmp_path / "rc"
    confdir = workdir / "mitmproxy-conf"
    out = cli("ca", "--certs", confdir, "create")
    assert out.stdout.startswith("created")
    cert = (confdir / "mitmproxy-ca-cert.pem").read_bytes()
    rc = Regcache(world, workdir, workdir / "cache", [f"regular@{ALT_PORT}"], {}, ALT_CONFIG).start((ALT_PORT,))
    try:
        assert rc.ca_cert.read_bytes() == cert  # mitmproxy kept ours
        # the client trusts the world's CA (for auth.docker.io) and ours: nothing else
        r = skopeo_copy(world, skopeo_ref("quay.io/org/s2:1"), tmp_path / "x", proxy_env(world, rc, ALT_PORT))
        assert r.returncode == 0, r.stderr + rc.log_text()[-2000:]
    finally:
        rc.stop()


def test_ca_install_system_runs_update_ca_certificates(tmp_path):
    """In a private mount namespace, over copies of the trust store directories."""
    if shutil.which("update-ca-certificates") is None or shutil.which("unshare") is None:
        pytest.skip("update-ca-certificates / unshare missing")
    certs = tmp_path / "certs"
    cli("ca", "--certs", certs, "create")
    etc_copy = tmp_path / "etc-ssl-certs"
    shutil.copytree("/etc/ssl/certs", etc_copy, symlinks=True)
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    script = f"""set -e
mount --make-rprivate /
mount --bind {etc_copy} /etc/ssl/certs
mount --bind {anchors} /usr/local/share/ca-certificates
{REGCACHE} ca --certs {certs} install system
grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt
ls /etc/ssl/certs | grep regcache
"""
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "REGCACHE_PROGRESS": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "regcache-ca.pem" in r.stdout
    bundle = (etc_copy / "ca-certificates.crt").read_text()
    assert (certs / "mitmproxy-ca-cert.pem").read_text().strip() in bundle
    assert (anchors / "regcache-ca.crt").exists()
    assert not Path("/usr/local/share/ca-certificates/regcache-ca.crt").exists()  # the host's stayed untouched

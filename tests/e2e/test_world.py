"""The test world itself, checked with real clients and NO proxy.

Needs root, iproute2 with ``ip netns``, docker-registry, nginx and skopeo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# make ``tests.world`` importable however pytest was started
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found"
    try:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    except Exception as e:  # pragma: no cover
        return f"'ip netns' unavailable: {e}"
    if r.returncode != 0:
        return f"'ip netns' unavailable: {r.stderr.decode(errors='replace').strip()}"
    for tool in ("docker-registry", "nginx", "skopeo"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} not installed"
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

if SKIP is None:
    from tests.world import World
    from tests.world.images import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST


@pytest.fixture(scope="module")
def world():
    w = World()
    try:
        w.up()
        print(f"\nworld {w.prefix} up in {w.timings['total']:.2f}s {w.timings}")
        yield w
    finally:
        w.down()


def skopeo(w, *args, check=True, timeout=180):
    argv = ["skopeo", "--insecure-policy", *args]
    return w.run(w.ns_client, argv, env=w.client_env(), check=check, timeout=timeout)


def inspect_raw(w, ref, **kw) -> subprocess.CompletedProcess:
    return w.run(
        w.ns_client,
        ["skopeo", "inspect", "--raw", *kw.pop("extra", []), f"docker://{ref}"],
        env=w.client_env(),
        text=False,
        check=kw.pop("check", True),
    )


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def blob_gets(log, digest):
    return [e for e in log if e["method"] == "GET" and digest.split(":")[1] in e["path"]]


# ---------------------------------------------------------------------------


def test_bringup_time_and_topology(world):
    w = world
    assert w.timings["total"] < 60, w.timings  # target is < 30 s; typically ~2 s
    assert w.router_client_ip == "10.77.2.1" and w.client_ip == "10.77.2.2"
    assert set(w.upstream_ips) >= {
        "registry-1.docker.io", "auth.docker.io", "production.cloudflare.docker.com",
        "quay.io", "gcr.io", "registry.k8s.io", "ghcr.io",
    }
    for ns in (w.ns_upstream, w.ns_router, w.ns_client):
        assert len(ns) <= 15
        assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        hosts = w.hosts_file(ns).read_text()
        assert "registry-1.docker.io" in hosts
    fwd = w.run(w.ns_router, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    assert fwd == "1"
    # client reaches upstream through the router
    routes = w.run(w.ns_client, ["ip", "route", "get", w.upstream_ips["quay.io"]]).stdout
    assert "via 10.77.2.1" in routes
    assert oct(os.stat(w.ca_key_path).st_mode & 0o777) == "0o600"
    bundle = w.ca_bundle_path.read_text()
    assert w.ca_cert_path.read_text().strip() in bundle
    assert bundle.count("BEGIN CERTIFICATE") > 1


def test_images_table(world):
    w = world
    refs = {i.ref for i in w.images}
    for want in (
        "docker.io/library/small:1", "docker.io/library/s2:1", "docker.io/library/multi:1",
        "docker.io/library/big:1", "docker.io/private/secret:1", "quay.io/org/s2:1",
        "quay.io/org/multi-oci:1", "gcr.io/proj/small:1", "registry.k8s.io/pause:1",
        "ghcr.io/owner/small:1",
    ):
        assert want in refs
    assert w.image("docker.io/library/small:1") is w.image("registry-1.docker.io/library/small:1")
    assert w.image("docker.io/library/small:1").media_type == OCI_MANIFEST
    assert len(w.image("docker.io/library/small:1").blobs) == 4  # config + 3 layers
    assert w.image("docker.io/library/s2:1").media_type == DOCKER_MANIFEST
    assert w.image("quay.io/org/s2:1").media_type == DOCKER_MANIFEST
    multi = w.image("docker.io/library/multi:1")
    assert multi.media_type == DOCKER_LIST
    assert set(multi.platform_digests) == {"linux/amd64", "linux/arm64/v8"}
    assert w.image("quay.io/org/multi-oci:1").media_type == OCI_INDEX
    big = w.image("docker.io/library/big:1")
    assert max(big.layer_sizes.values()) > 30 * 1024 * 1024
    # deterministic: building again in a fresh process gives the same digests
    code = (
        "import json, sys; from tests.world import images; "
        "print(json.dumps([i.digest for i in images.build_all(sys.argv[1])]))"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code, str(w.workdir / "images-again")],
                       capture_output=True, text=True, cwd=root, check=True)
    assert json.loads(r.stdout) == [i.digest for i in w.images]


def test_inspect_raw_every_image(world):
    """Every pushed manifest is served under its registry name with the right digest."""
    w = world
    for img in w.images:
        extra = ["--creds", f"{w.username}:{w.password}"] if img.repository.startswith("private/") else []
        out = inspect_raw(w, img.host_ref, extra=extra).stdout
        assert sha(out) == img.digest, img.ref
        assert json.loads(out)["mediaType"] == img.media_type


def test_skopeo_copy_follows_cdn_redirect(world, tmp_path):
    w = world
    img = w.image("docker.io/library/small:1")
    w.clear_request_logs()
    skopeo(w, "copy", "docker://registry-1.docker.io/library/small:1", f"oci:{tmp_path}/x:1")
    index = json.loads((tmp_path / "x" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == img.digest
    reg = w.request_log("registry-1.docker.io")
    cdn = w.request_log("production.cloudflare.docker.com")
    assert w.request_log("docker.io") == reg
    for dg in img.blobs:
        r = blob_gets(reg, dg)
        assert r and all(e["status"] == 307 for e in r), (dg, reg)
        assert r[0]["location"].startswith("https://production.cloudflare.docker.com/")
        assert "verify=" in r[0]["location"]
        c = blob_gets(cdn, dg)
        assert c and c[0]["status"] == 200, (dg, cdn)
        assert c[0]["bytes"] == img.layer_sizes[dg]
    assert any(e["path"].startswith("/v2/library/small/manifests/1") for e in reg)
    # anonymous token was fetched from auth.docker.io
    auth = w.request_log("auth.docker.io")
    assert any(e["path"].startswith("/token?") and e["status"] == 200 for e in auth)
    assert all(not e["auth"] for e in auth)
    # the registry never served blob bytes itself
    assert not [e for e in reg if "/blobs/" in e["path"] and e["status"] == 200 and e["method"] == "GET"]


def test_cdn_honours_range(world):
    w = world
    img = w.image("docker.io/library/big:1")
    layer = img.children[0].layer_digests[0]
    hexd = layer.split(":")[1]
    url = f"https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data?verify=x"
    r = w.run(
        w.ns_client,
        ["curl", "-sS", "--cacert", w.ca_bundle_path, "-r", "1000-1999", "-o", "/dev/null",
         "-w", "%{http_code} %{size_download} %{content_type}", url],
    )
    code, size, ctype = r.stdout.split()
    assert (code, size, ctype) == ("206", "1000", "application/octet-stream")
    ents = w.request_log("production.cloudflare.docker.com")
    assert ents[-1]["range"] == "bytes=1000-1999" and ents[-1]["status"] == 206


def test_blob_head_goes_to_registry(world):
    """HEAD of a blob is answered by the registry (no redirect), with a token."""
    w = world
    img = w.image("docker.io/library/small:1")
    tok = json.loads(
        w.run(w.ns_client, ["curl", "-sS", "--cacert", w.ca_bundle_path,
                            "https://auth.docker.io/token?service=registry.docker.io"
                            "&scope=repository:library/small:pull"]).stdout
    )["token"]
    r = w.run(
        w.ns_client,
        ["curl", "-sS", "-I", "--cacert", w.ca_bundle_path, "-H", f"Authorization: Bearer {tok}",
         f"https://registry-1.docker.io/v2/library/small/blobs/{img.blobs[1]}"],
    )
    assert r.stdout.split()[1] == "200"
    assert f"docker-content-digest: {img.blobs[1]}" in r.stdout.lower()


def test_private_image_needs_credentials(world, tmp_path):
    w = world
    img = w.image("docker.io/private/secret:1")
    anon = skopeo(w, "copy", "docker://registry-1.docker.io/private/secret:1",
                  f"oci:{tmp_path}/anon:1", check=False)
    assert anon.returncode != 0
    assert "denied" in anon.stderr or "unauthorized" in anon.stderr
    bad = skopeo(w, "copy", "--src-creds", "testuser:wrong",
                 "docker://registry-1.docker.io/private/secret:1", f"oci:{tmp_path}/bad:1", check=False)
    assert bad.returncode != 0
    w.clear_request_logs()
    skopeo(w, "copy", "--src-creds", "testuser:testpass",
           "docker://registry-1.docker.io/private/secret:1", f"oci:{tmp_path}/ok:1")
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == img.digest
    toks = w.token_log()
    assert toks and all(t["subject"] == "testuser" for t in toks if t["status"] == 200)
    assert any(e["auth"] for e in w.request_log("auth.docker.io"))


def test_anonymous_token_has_no_access_to_private(world):
    w = world
    body = w.run(w.ns_client, ["curl", "-sS", "--cacert", w.ca_bundle_path,
                               "https://auth.docker.io/token?service=registry.docker.io"
                               "&scope=repository:private/secret:pull"]).stdout
    tok = json.loads(body)
    assert set(tok) >= {"token", "access_token", "expires_in", "issued_at"}
    assert tok["expires_in"] == 300
    import base64

    payload = tok["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["access"] == [{"type": "repository", "name": "private/secret", "actions": []}]
    code = w.run(w.ns_client, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                               w.ca_bundle_path, "-u", "testuser:nope",
                               "https://auth.docker.io/token?service=registry.docker.io"]).stdout
    assert code == "401"


def test_quay_oci_index_override_arch_arm64(world, tmp_path):
    w = world
    img = w.image("quay.io/org/multi-oci:1")
    skopeo(w, "copy", "--override-arch", "arm64", "docker://quay.io/org/multi-oci:1", f"oci:{tmp_path}/m:1")
    index = json.loads((tmp_path / "m" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == img.platform_digests["linux/arm64/v8"]
    log = w.request_log("quay.io")
    assert any(img.platform_digests["linux/arm64/v8"] in e["path"] for e in log)


def test_docker_manifest_list_and_schema2(world, tmp_path):
    w = world
    multi = w.image("docker.io/library/multi:1")
    skopeo(w, "copy", "--override-arch", "arm64", "docker://registry-1.docker.io/library/multi:1",
           f"dir:{tmp_path}/d")
    got = (tmp_path / "d" / "manifest.json").read_bytes()
    assert sha(got) == multi.platform_digests["linux/arm64/v8"]
    s2 = w.image("quay.io/org/s2:1")
    skopeo(w, "copy", "docker://quay.io/org/s2:1", f"dir:{tmp_path}/s2")
    m = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert m["mediaType"] == DOCKER_MANIFEST
    assert m["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert all(l["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip" for l in m["layers"])
    assert sha((tmp_path / "s2" / "manifest.json").read_bytes()) == s2.digest
    cfg = json.loads((tmp_path / "s2" / m["config"]["digest"].split(":")[1]).read_text())
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux" and cfg["config"]["Cmd"]
    # diff_ids really are the sha256 of the uncompressed layers
    import gzip

    for l, diff_id in zip(m["layers"], cfg["rootfs"]["diff_ids"]):
        raw = gzip.decompress((tmp_path / "s2" / l["digest"].split(":")[1]).read_bytes())
        assert sha(raw) == diff_id


def test_open_registries_no_auth(world):
    w = world
    for ref in ("gcr.io/proj/small:1", "registry.k8s.io/pause:1", "ghcr.io/owner/small:1"):
        img = w.image(ref)
        w.clear_request_logs()
        out = inspect_raw(w, ref).stdout
        assert sha(out) == img.digest
        log = w.request_log(img.host)
        assert log and all(e["status"] in (200,) for e in log), log
        assert not w.request_log("auth.docker.io")


def test_stop_and_start_upstream(world):
    w = world
    w.stop_upstream()
    try:
        r = inspect_raw(w, "registry-1.docker.io/library/small:1", check=False)
        assert r.returncode != 0
        r = inspect_raw(w, "quay.io/org/s2:1", check=False)
        assert r.returncode != 0
    finally:
        w.start_upstream()
    out = inspect_raw(w, "registry-1.docker.io/library/small:1").stdout
    assert sha(out) == w.image("docker.io/library/small:1").digest
    out = inspect_raw(w, "quay.io/org/s2:1").stdout
    assert sha(out) == w.image("quay.io/org/s2:1").digest


def test_second_world_coexists(world):
    from tests.world import World as W2
    from tests.world.images import DEFAULT_SPECS

    specs = [s for s in DEFAULT_SPECS if s.ref == "ghcr.io/owner/small:1"]
    with W2(specs=specs) as w2:
        assert w2.prefix != world.prefix
        out = inspect_raw(w2, "ghcr.io/owner/small:1").stdout
        assert sha(out) == w2.image("ghcr.io/owner/small:1").digest
        # the first world still works
        assert inspect_raw(world, "ghcr.io/owner/small:1").returncode == 0
    _assert_gone(w2)


def _assert_gone(w):
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert w.prefix + "-" not in names
    for ns in w.all_ns:
        assert not Path(f"/etc/netns/{ns}").exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {w.prefix}-" not in links
    me = str(w.workdir)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert me not in cmd, f"leftover process {pid}: {cmd}"
    assert not w.workdir.exists()


def test_down_leaves_nothing(world):
    """Last test of the module: tear the world down and check it is all gone."""
    sleeper = world.popen(world.ns_router, ["sleep", "600"])
    stray = subprocess.Popen(["ip", "netns", "exec", world.ns_client, "sleep", "600"],
                             start_new_session=True)  # not tracked: found via `ip netns pids`
    world.down()
    assert sleeper.poll() is not None
    assert stray.wait(5) is not None
    _assert_gone(world)
    world.down()  # idempotent

"""The DNS way in, as in the deployment regcache replaces: the nodes' hosts file points
quay.io, gcr.io, k8s.gcr.io and registry-1.docker.io at the cache, which listens as a mirror
on port 80 (plain) and 443 (TLS); dockerd has the daemon.json `regcache client-config dns`
prints. The runtime names the registry only by Host (and SNI on 443), so the cache must tell
quay.io/library/small from docker.io/library/small: same name, other image.

Both lines of the hosts file and daemon.json come from `regcache client-config dns`. The
client namespace's hosts file is restored afterwards; the router (where regcache runs) keeps
resolving the registries to their real addresses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FASTPATH_PORT, dir_manifest_digest, skopeo_copy

pytestmark = pytest.mark.e2e

REGCACHE = str(Path(sys.executable).parent / "regcache")
DOCKER_SMALL = "docker.io/library/small:1"
QUAY_SMALL = "quay.io/library/small:1"  # same repository name, different layers
REFS = (DOCKER_SMALL, QUAY_SMALL)
MODES = ["reverse:https://registry-1.docker.io@80", "reverse:https://registry-1.docker.io@443"]


def client_config_dns(cache_ip: str) -> tuple[list[tuple[str, str]], dict]:
    """(hosts entries, daemon.json) as `regcache client-config dns` prints them."""
    argv = [REGCACHE, "client-config", "dns", "--cache", cache_ip, "-q"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    hosts_part, _, json_part = out.partition("# /etc/docker/daemon.json:\n")
    entries = [tuple(line.split()) for line in hosts_part.splitlines() if line.strip() and not line.startswith("#")]
    return entries, json.loads(json_part)


@pytest.fixture
def dns_way_in(world):
    """The client namespace resolves the registries to the cache (router); yields daemon.json."""
    entries, daemon_json = client_config_dns(world.router_client_ip)
    assert {name for _, name in entries} == {"quay.io", "gcr.io", "k8s.gcr.io", "registry-1.docker.io"}
    mapping = dict(world.upstream_ips)
    mapping.update({name: ip for ip, name in entries})
    world.write_hosts(world.ns_client, mapping)
    try:
        yield daemon_json
    finally:
        world.write_hosts(world.ns_client)


def start_regcache(regcache_factory):
    return regcache_factory(modes=MODES, wait_ports=[80, 443, FASTPATH_PORT])


def upstream_blob_requests(world) -> list[str]:
    """Blob requests that reached any upstream registry or the blob CDN."""
    hits = []
    for host in ("registry-1.docker.io", "quay.io", world.cdn_host):
        for e in world.request_log(host):
            if "/blobs/" in e["path"] or host == world.cdn_host:
                hits.append(f"{host} {e['method']} {e['path']}")
    return hits


def assert_names_kept_apart(world, rc) -> None:
    assert world.image(DOCKER_SMALL).manifest_digest != world.image(QUAY_SMALL).manifest_digest
    log = rc.log_text()
    assert "registry=quay.io repo=library/small tag=1 outcome=MISS" in log, log[-3000:]
    assert "registry=docker.io repo=library/small tag=1 outcome=MISS" in log, log[-3000:]


# --- skopeo --------------------------------------------------------------------------------------------


def skopeo_pull_all(world, rc, dest: Path, why: str) -> None:
    """skopeo as a node would run it: no proxy, no CA for the cache (TLS unverified, HTTP fallback)."""
    env = world.client_env()
    for ref in REFS:
        out = skopeo_copy(world, f"docker://{ref}", dest, env, ["--src-tls-verify=false"])
        assert out.returncode == 0, f"{ref} ({why}): {out.stderr}\n{rc.log_text()[-3000:]}"
        assert dir_manifest_digest(dest) == world.image(ref).manifest_digest, f"{ref} ({why}): another image was served"


def test_skopeo_dns_way_in(world, regcache_factory, tmp_path, dns_way_in):
    rc = start_regcache(regcache_factory)
    world.clear_request_logs()
    skopeo_pull_all(world, rc, tmp_path / "cold", "cold cache")
    assert_names_kept_apart(world, rc)
    assert upstream_blob_requests(world), "the cold pull must have fetched blobs upstream"

    world.clear_request_logs()
    skopeo_pull_all(world, rc, tmp_path / "warm", "warm cache, fresh client store")
    assert upstream_blob_requests(world) == []

    world.stop_upstream()
    try:
        skopeo_pull_all(world, rc, tmp_path / "offline", "upstream stopped")
    finally:
        world.start_upstream()


# --- dockerd -------------------------------------------------------------------------------------------

NEEDS = [n for n in ("dockerd", "docker", "containerd", "nsenter", "unshare") if shutil.which(n) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(NEEDS), reason=f"not installed: {', '.join(NEEDS)} (./test.sh installs docker.io)")
def test_docker_dns_way_in(world, regcache_factory, dns_way_in):
    from .test_clients_docker import Dockerd, pull_and_check

    rc = start_regcache(regcache_factory)
    # No proxy and no CA for the cache: the insecure registries take its certificate unverified.
    # The world's CA stands in for the public roots dockerd trusts for auth.docker.io's token.
    env = {"SSL_CERT_FILE": str(world.ca_bundle_path)}
    started: list[Dockerd] = []

    def pull_all(name: str, why: str) -> None:
        d = Dockerd(world, name, env, dns_way_in)
        started.append(d)
        try:
            d.start()
            for ref in REFS:
                pull_and_check(d, world, ref, None, f" ({why})")
        finally:
            d.stop()

    try:
        world.clear_request_logs()
        pull_all("a", "cold cache")
        assert_names_kept_apart(world, rc)
        world.clear_request_logs()
        pull_all("b", "warm cache, fresh data-root")
        assert upstream_blob_requests(world) == []
        world.stop_upstream()
        try:
            pull_all("c", "upstream stopped")
        finally:
            world.start_upstream()
    finally:
        for d in started:
            d.stop()


# --- the two listeners, seen by curl ------------------------------------------------------------------


def test_port_80_by_host_and_port_443_by_sni_with_a_certificate_for_that_name(
    world, regcache_factory, tmp_path, dns_way_in
):
    """Plain HTTP on 80 names quay.io by Host alone; TLS on 443 by SNI, with a certificate for
    quay.io from regcache's CA. A ?ns= that names no registry gets an OCI error."""
    import hashlib

    rc = start_regcache(regcache_factory)
    image = world.image(QUAY_SMALL)
    body = tmp_path / "manifest"
    path = "/v2/library/small/manifests/1"
    for url, trust in ((f"http://quay.io{path}", []), (f"https://quay.io{path}", ["--cacert", str(rc.ca_cert)])):
        argv = ["curl", "-sS", "-f", "-o", body, "-H", f"Accept: {image.media_type}", *trust, url]
        out = world.run(world.ns_client, argv, check=False)
        assert out.returncode == 0, f"{url}: {out.stderr}\n{rc.log_text()[-2000:]}"
        assert "sha256:" + hashlib.sha256(body.read_bytes()).hexdigest() == image.manifest_digest, url
    url = f"http://{world.router_client_ip}{path}?ns=evil.example"
    out = world.run(world.ns_client, ["curl", "-sS", "-o", body, "-w", "%{http_code}", url])
    assert out.stdout == "404" and json.loads(body.read_bytes())["errors"][0]["code"] == "NAME_UNKNOWN"
    assert "refused GET /v2/library/small/manifests/1?ns=evil.example" in rc.log_text()


# --- what regcache follows ------------------------------------------------------------------------------


def test_blob_redirect_to_a_private_address_is_not_followed_unless_allowed(world, regcache_factory, tmp_path):
    """registry-1.docker.io redirects blob GETs to its CDN, which in this world sits on a private
    address (10.77.1.13): refused by default, followed once redirect_allow names that network."""
    from .conftest import PROXY_PORT, WORLD_UPSTREAM_NET

    for n, (allow, works) in enumerate((("[]", False), (f"[{WORLD_UPSTREAM_NET}]", True))):
        rc = regcache_factory(config=f"redirect_allow: {allow}\n")
        env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
        world.clear_request_logs()
        out = skopeo_copy(world, f"docker://{DOCKER_SMALL}", tmp_path / f"pull{n}", env)
        cdn = world.request_log(world.cdn_host)
        if works:
            assert out.returncode == 0, out.stderr + rc.log_text()[-2000:]
            assert cdn, "the blobs came from the CDN"
        else:
            assert out.returncode != 0
            assert cdn == [], "regcache connected to a private address it was redirected to"
            refusal = f"not following registry-1.docker.io's redirect: redirect to {world.cdn_host} refused"
            assert refusal in rc.log_text()
        rc.stop()

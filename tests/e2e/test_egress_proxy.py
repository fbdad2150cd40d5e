"""Issue 13: the egress proxy. regcache reaches the registries only through a real squid.

The world's opt-in squid runs in the upstream namespace on its own address; iptables in the
router namespace (where regcache runs) rejects every direct connection to the upstream hosts,
so whatever reaches a registry went through squid, and squid's access log says so. Real
parts: mitmdump + regcache, skopeo and curl in the client namespace, squid, nginx + registry.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from .conftest import (MIRROR_PORT, PROXY_PORT, TRANSPARENT_PORT, dir_manifest_digest, mirror_registries_conf,
                       skopeo_copy)
from .test_cli import cli_in
from .test_singleflight import client_bundle, curl

pytestmark = pytest.mark.e2e

DENIED = "ghcr.io"  # squid's rules refuse CONNECTs there (403)


@pytest.fixture
def egress(world):
    """squid up, the direct route from the router namespace to the upstream hosts closed."""
    world.start_egress_proxy(deny=(DENIED,))
    rules = world.block_direct_upstream()
    try:
        yield world
    finally:
        world.unblock_direct_upstream(rules)
        world.stop_egress_proxy()


def egress_config(world, extra: str = "") -> str:
    return f"upstream_proxy: {world.egress_proxy_url}\n{extra}"


def proxy_env(world, rc) -> dict:
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(client_bundle(rc))}


def connects(world, since: int = 0) -> dict[str, list[int]]:
    """host:port -> statuses of the CONNECTs squid saw from regcache (the router) since entry since."""
    out: dict[str, list[int]] = {}
    for entry in world.egress_proxy_log()[since:]:
        if entry["method"] == "CONNECT" and entry["client"] == world.router_upstream_ip:
            out.setdefault(entry["url"], []).append(entry["status"])
    return out


def wait_connects(world, hosts, since: int = 0, timeout: float = 10.0) -> dict[str, list[int]]:
    """connects(), once squid logged a successful CONNECT to each of hosts. squid logs a tunnel
    when it ends: stop regcache (its keep-alive pool holds tunnels open) before asking."""
    deadline = time.monotonic() + timeout
    while True:
        seen = connects(world, since)
        if all(200 in seen.get(host, []) for host in hosts) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_pulls_cold_and_warm_through_the_egress_proxy_with_the_direct_route_closed(egress, regcache_factory, tmp_path):
    world = egress
    rc = regcache_factory(modes=[f"regular@{PROXY_PORT}", f"reverse:https://registry-1.docker.io@{MIRROR_PORT}"],
                          config=egress_config(world))
    env = proxy_env(world, rc)
    small = world.image("docker.io/library/small:1")

    # the direct route is closed: nothing from the router namespace reaches a registry itself
    direct = world.run(world.ns_router, ["curl", "-sS", "--max-time", "5", "--cacert", world.ca_bundle_path,
                                         "https://registry-1.docker.io/v2/"], check=False)
    assert direct.returncode != 0, direct.stdout

    # cold, through HTTPS_PROXY: registry, token server (anonymous probe) and blob CDN all via CONNECT
    cold = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "cold", env)
    assert cold.returncode == 0, cold.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "cold") == small.manifest_digest
    # keep-alive works through the tunnel: one CONNECT carried several requests to the registry
    assert max(e["conn_requests"] for e in world.request_log("registry-1.docker.io")) > 1

    # cold through the mirror listener (quay.io by path prefix)
    conf = mirror_registries_conf(tmp_path / "registries.conf", f"{world.router_client_ip}:{MIRROR_PORT}")
    mirror_env = {"SSL_CERT_FILE": str(client_bundle(rc))}
    quay = world.image("quay.io/org/s2:1")
    cold_mirror = skopeo_copy(world, "docker://quay.io/org/s2:1", tmp_path / "mirror-cold", mirror_env,
                              ["--registries-conf", str(conf)])
    assert cold_mirror.returncode == 0, cold_mirror.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "mirror-cold") == quay.manifest_digest

    # warm: the same images again, from the cache
    log_mark = len(rc.log_text())
    for name, ref, extra, image in (
        ("warm", "docker://registry-1.docker.io/library/small:1", [], small),
        ("mirror-warm", "docker://quay.io/org/s2:1", ["--registries-conf", str(conf)], quay),
    ):
        again = skopeo_copy(world, ref, tmp_path / name, env if not extra else mirror_env, extra)
        assert again.returncode == 0, again.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / name) == image.manifest_digest
    assert "outcome=HIT" in rc.log_text()[log_mark:]

    rc.stop()  # closes the tunnels it kept alive: squid logs each when it ends
    hosts = ("registry-1.docker.io:443", world.cdn_host + ":443", world.auth_host + ":443", "quay.io:443")
    seen = wait_connects(world, hosts)
    assert all(200 in seen.get(host, []) for host in hosts), seen


def test_what_mitmproxy_relays_goes_through_the_egress_proxy(egress, regcache_factory, tmp_path):
    """A request regcache passes through uncached (quay.io's /v2/_catalog) and TLS it does not
    intercept (auth.docker.io is no registry: its own certificate reaches the client) both
    leave through squid."""
    world = egress
    rc = regcache_factory(config=egress_config(world))

    catalog = curl(world, rc, "https://quay.io/v2/_catalog", tmp_path / "catalog").run()
    assert catalog.exit_code == 0 and catalog.status == 200, catalog.describe() + rc.log_text()[-2000:]
    assert "repositories" in json.loads(catalog.out.read_bytes())
    assert any(e["path"] == "/v2/_catalog" for e in world.request_log("quay.io"))

    # verified against the world's CA alone: not mitmproxy's certificate, the server's own
    token = world.run(world.ns_client, [
        "curl", "-sS", "--max-time", "30", "--proxy", f"http://{world.router_client_ip}:{PROXY_PORT}",
        "--cacert", world.ca_cert_path, "-o", "/dev/null", "-w", "%{http_code}",
        "https://auth.docker.io/token?service=registry.docker.io&scope=repository:library/small:pull"], check=False)
    assert token.returncode == 0 and token.stdout == "200", token.stderr + rc.log_text()[-2000:]

    rc.stop()
    hosts = ("quay.io:443", world.auth_host + ":443")
    seen = wait_connects(world, hosts)
    assert all(200 in seen.get(host, []) for host in hosts), seen


def test_warm_uses_the_egress_proxy_of_its_config(egress, tmp_path):
    world = egress
    config = tmp_path / "regcache.yml"
    config.write_text(egress_config(world))
    out = cli_in(world, world.ns_router, "--dir", tmp_path / "warmed", "--config", config, "warm",
                 "quay.io/org/s2:1", "--upstream-ca", world.ca_bundle_path)
    assert "warmed 1 of 1 image(s)" in out.stdout, out.stdout + out.stderr
    assert 200 in wait_connects(world, ["quay.io:443"]).get("quay.io:443", []), world.egress_proxy_log()


def test_proxy_refusing_or_down_gives_a_clear_oci_error(egress, regcache_factory, tmp_path):
    world = egress
    rc = regcache_factory(config=egress_config(world))

    # squid's rules refuse ghcr.io: 403 to the CONNECT
    refused = curl(world, rc, "https://ghcr.io/v2/owner/small/manifests/1", tmp_path / "refused",
                   headers=["Accept: application/vnd.oci.image.index.v1+json"]).run()
    assert refused.exit_code == 0 and refused.status == 503, refused.describe()
    error = json.loads(refused.out.read_bytes())["errors"][0]
    assert error["code"] == "UNAVAILABLE", error
    assert f"egress proxy {world.egress_proxy_url} refused CONNECT to ghcr.io:443: 403" in error["message"], error
    assert f"ghcr.io:443 not reached: egress proxy {world.egress_proxy_url} refused CONNECT" in rc.log_text()

    # squid gone: the manifest of an image never pulled cannot come from anywhere
    world.stop_egress_proxy()
    down = curl(world, rc, "https://quay.io/v2/library/small/manifests/1", tmp_path / "down",
                headers=["Accept: application/vnd.oci.image.index.v1+json"]).run()
    assert down.exit_code == 0 and down.status == 503, down.describe()
    error = json.loads(down.out.read_bytes())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and f"egress proxy {world.egress_proxy_url} unreachable" in error["message"]
    assert f"quay.io:443 not reached: egress proxy {world.egress_proxy_url} unreachable" in rc.log_text()


def test_proxy_credentials_from_a_file_reach_only_the_proxy(world, regcache_factory, tmp_path):
    """squid wants Basic credentials: regcache's own fetches, the requests mitmproxy relays
    and the TLS it passes through all present them; they appear in no log; without them the
    client's error says the proxy wants credentials."""
    world.start_egress_proxy(users={"egress": "pr0xy-pass"})
    rules = world.block_direct_upstream()
    try:
        secret = tmp_path / "proxy-auth"
        secret.write_text("egress:pr0xy-pass\n")
        rc = regcache_factory(config=egress_config(world, f"upstream_proxy_auth: {{file: {secret}}}\n"))
        pulled = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "small",
                             proxy_env(world, rc))
        assert pulled.returncode == 0, pulled.stderr + rc.log_text()[-3000:]
        catalog = curl(world, rc, "https://quay.io/v2/_catalog", tmp_path / "catalog").run()
        assert catalog.status == 200, catalog.describe()
        rc.stop()
        hosts = ("registry-1.docker.io:443", world.cdn_host + ":443", world.auth_host + ":443", "quay.io:443")
        seen = wait_connects(world, hosts)
        assert all(200 in seen.get(host, []) for host in hosts), seen
        assert {e["user"] for e in world.egress_proxy_log() if e["status"] == 200} == {"egress"}
        token = base64.b64encode(b"egress:pr0xy-pass").decode()
        for text in (rc.log_text(), (rc.workdir / "regcache.yml").read_text()):
            assert "pr0xy-pass" not in text and token not in text

        anonymous = regcache_factory(config=egress_config(world))
        refused = curl(world, anonymous, "https://quay.io/v2/org/s2/manifests/1", tmp_path / "refused",
                       headers=["Accept: application/vnd.docker.distribution.manifest.v2+json"]).run()
        assert refused.status == 503, refused.describe()
        message = json.loads(refused.out.read_bytes())["errors"][0]["message"]
        assert "refused CONNECT to quay.io:443: 407" in message and "upstream_proxy_auth" in message, message
    finally:
        world.unblock_direct_upstream(rules)
        world.stop_egress_proxy()


def test_transparent_mode_through_the_egress_proxy(egress, regcache_factory, tmp_path, transparent):
    """Redirected clients: intercepted registries fetched by regcache, the token server's TLS
    passed through untouched -- both through squid (the latter CONNECTed by address)."""
    world = egress
    rc = regcache_factory(modes=[f"transparent@{TRANSPARENT_PORT}"], config=egress_config(world))
    env = {"SSL_CERT_FILE": str(client_bundle(rc))}
    pulled = skopeo_copy(world, "docker://registry-1.docker.io/library/small:1", tmp_path / "small", env)
    assert pulled.returncode == 0, pulled.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "small") == world.image("docker.io/library/small:1").manifest_digest
    rc.stop()
    auth_ip = world.upstream_ips[world.auth_host]
    hosts = ("registry-1.docker.io:443", world.cdn_host + ":443", f"{auth_ip}:443")
    seen = wait_connects(world, hosts)
    assert all(200 in seen.get(host, []) for host in hosts), seen

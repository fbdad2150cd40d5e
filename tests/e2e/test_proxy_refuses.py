"""Issue 9, item 4a: the HTTPS_PROXY listener is no road into the cache host.

Real parts: regcache (mitmdump) in the router namespace with its status page on
127.0.0.1 only, a plain HTTP service on the router's own addresses, curl and skopeo in the
client namespace through regcache's proxy. Loopback, the router's own addresses, names that
resolve to loopback in the router namespace, and CONNECT tunnels are all refused; a normal
pull through the same proxy (blobs served in-band from 127.0.0.1) still works; proxy_allow
opens exactly what it names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .conftest import PROXY_PORT, dir_manifest_digest, skopeo_copy

pytestmark = pytest.mark.e2e

STATUS_PORT = 9090  # regcache's status page, on the router's loopback only
SERVICE_PORT = 9099  # an internal HTTP service on every address of the router
SECRET = "router-internal-secret-4a"
LOOPBACK_NAME = "internal.regcache.test"  # in the router's hosts file: 127.0.0.1


def proxied(world, url: str, *extra: str) -> subprocess.CompletedProcess:
    """curl from the client namespace through regcache's proxy; stdout is body + status code."""
    argv = ["curl", "-sS", "--max-time", "20", "-x", f"http://{world.router_client_ip}:{PROXY_PORT}",
            "-w", "\n%{http_code}", *extra, url]
    return world.run(world.ns_client, argv, check=False, timeout=60)


def assert_refused(out: subprocess.CompletedProcess, what: str, secrets=("recent_misses", "uptime", SECRET)):
    body = out.stdout.rsplit("\n", 1)[0]
    for secret in secrets:
        assert secret not in out.stdout, f"{what}: the proxy let it through: {out.stdout[:500]}"
    if out.returncode == 0:  # a plain proxied request: regcache's own 403 that says why
        assert out.stdout.endswith("\n403"), f"{what}: {out.stdout[-300:]}"
        error = json.loads(body)["errors"][0]
        assert error["code"] == "DENIED" and "does not proxy" in error["message"], error
    else:  # a CONNECT tunnel: curl reports the proxy's 403 to the CONNECT
        assert "403" in out.stderr, f"{what}: {out.stderr}"


@pytest.fixture
def router_service(world, tmp_path):
    """A plain HTTP service on all of the router's addresses (as an admin UI or a node
    exporter would be), with a file no client should ever read through the proxy."""
    root = tmp_path / "router-service"
    root.mkdir()
    (root / "secret.txt").write_text(SECRET + "\n")
    argv = [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "--directory", root, SERVICE_PORT]
    proc = world.popen(world.ns_router, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    probe = ["curl", "-s", f"http://127.0.0.1:{SERVICE_PORT}/secret.txt"]
    while SECRET not in world.run(world.ns_router, probe, check=False).stdout:
        assert time.monotonic() < deadline and proc.poll() is None, "router service did not start"
        time.sleep(0.1)
    yield
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def loopback_name(world):
    """A name that resolves to 127.0.0.1 in the router namespace (the DNS-rebinding shape)."""
    world.write_hosts(world.ns_router, {**world.upstream_ips, LOOPBACK_NAME: "127.0.0.1"})
    yield LOOPBACK_NAME
    world.write_hosts(world.ns_router)


def test_proxy_refuses_loopback_and_names_for_it_while_pulls_work(world, regcache_factory, tmp_path, loopback_name):
    # fastpath: off, so the proxied pull below takes the in-band blob server on 127.0.0.1
    rc = regcache_factory(options={"regcache_metrics": f"127.0.0.1:{STATUS_PORT}"}, config="fastpath: off\n")
    # the status page is up, on the router's loopback
    local = world.run(world.ns_router, ["curl", "-sS", f"http://127.0.0.1:{STATUS_PORT}/status.json"], check=False)
    assert "recent_misses" in local.stdout, local.stdout[:300] + local.stderr

    status = f"127.0.0.1:{STATUS_PORT}"
    assert_refused(proxied(world, f"http://{status}/status.json"), "plain HTTP to 127.0.0.1")
    assert_refused(proxied(world, f"http://localhost:{STATUS_PORT}/status.json"), "plain HTTP to localhost")
    assert_refused(proxied(world, f"http://{loopback_name}:{STATUS_PORT}/status.json"), "a name resolving to 127.0.0.1")
    assert_refused(proxied(world, f"http://{status}/status.json", "--proxytunnel"), "CONNECT, then HTTP")
    assert_refused(proxied(world, f"https://{status}/", "-k"), "CONNECT for TLS (passed through untouched)")
    log = rc.log_text()
    assert "refused GET 127.0.0.1:9090" in log and "is a loopback address" in log

    # and the proxy still does its job: a pull through HTTPS_PROXY, blobs from the in-band
    # blob server on 127.0.0.1
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(rc.client_bundle())}
    out = skopeo_copy(world, "docker://docker.io/library/small:1", tmp_path / "small", env)
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "small") == world.image("docker.io/library/small:1").manifest_digest
    assert "via=inband" in rc.log_text()


def test_proxy_refuses_the_routers_own_addresses(world, regcache_factory, router_service):
    regcache_factory()
    for address in (world.router_client_ip, world.router_upstream_ip, "127.0.0.1"):
        url = f"http://{address}:{SERVICE_PORT}/secret.txt"
        assert_refused(proxied(world, url), f"plain HTTP to {address}")
        assert_refused(proxied(world, url, "--proxytunnel"), f"CONNECT to {address}")
    # an address of the world that is not the router's is proxied as before
    ok = proxied(world, f"https://{world.upstream_ips[world.cdn_host]}/", "-k", "-o", "/dev/null")
    assert ok.returncode == 0 and ok.stdout.strip() not in ("403", "000"), ok.stdout + ok.stderr


def test_proxy_allow_opens_exactly_what_it_names(world, regcache_factory, router_service):
    regcache_factory(options={"regcache_metrics": f"127.0.0.1:{STATUS_PORT}"},
                     config=f"proxy_allow: ['127.0.0.1:{STATUS_PORT}']\n")
    page = proxied(world, f"http://127.0.0.1:{STATUS_PORT}/status.json")
    assert page.returncode == 0 and page.stdout.endswith("\n200"), page.stdout[-300:] + page.stderr
    assert "recent_misses" in page.stdout
    # another port on loopback, and the router's own address, stay refused
    assert_refused(proxied(world, f"http://127.0.0.1:{SERVICE_PORT}/secret.txt"), "another loopback port")
    own = f"http://{world.router_upstream_ip}:{SERVICE_PORT}/secret.txt"
    assert_refused(proxied(world, own), "the router's address")

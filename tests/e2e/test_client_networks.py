"""client_networks: a cache that listens on all interfaces serves only the networks the operator
names — on every listener (proxy, mirror, fast path, metrics). Real parts: regcache (mitmdump)
in the router namespace, skopeo and curl in the client namespace (10.77.2.2)."""

from __future__ import annotations

import pytest

from .conftest import FASTPATH_PORT, MIRROR_PORT, PROXY_PORT, dir_manifest_digest, skopeo_copy
from .test_privacy import PUBLIC, proxy_env

pytestmark = pytest.mark.e2e

MODES = (f"regular@{PROXY_PORT}", f"reverse:https://registry-1.docker.io@{MIRROR_PORT}")
METRICS_PORT = 9091


def client_curl(world, url: str, proxy: str | None = None) -> tuple[int, str]:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"]
    if proxy:
        argv += ["--proxy", proxy]
    r = world.run(world.ns_client, [*argv, url], check=False)
    return int(r.stdout or 0), r.stderr


@pytest.mark.parametrize("listed", [False, True], ids=["client-not-listed", "client-listed"])
def test_every_listener_serves_only_client_networks(world, regcache_factory, tmp_path, listed):
    network = f"{world.router_client_ip.rsplit('.', 1)[0]}.0/24" if listed else "192.0.2.0/24"
    rc = regcache_factory(modes=MODES, wait_ports=[PROXY_PORT, MIRROR_PORT, FASTPATH_PORT],
                          config=f"client_networks: [{network}]\n",
                          options={"regcache_metrics": f"0.0.0.0:{METRICS_PORT}"})
    cache = world.router_client_ip
    out = skopeo_copy(world, PUBLIC, tmp_path / "pull", proxy_env(world, rc))
    mirror, _ = client_curl(world, f"http://{cache}:{MIRROR_PORT}/v2/")
    fast, _ = client_curl(world, f"http://{cache}:{FASTPATH_PORT}/_regcache/blobs/sha256:{'0' * 64}")
    status, _ = client_curl(world, f"http://{cache}:{METRICS_PORT}/status.json")
    if listed:
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "pull") == world.image("docker.io/library/small:1").manifest_digest
        assert mirror in (200, 401) and fast == 403 and status == 200, (mirror, fast, status)
    else:
        assert out.returncode != 0
        assert (mirror, fast, status) == (0, 0, 0)  # closed before anything was answered
        assert "not in client_networks" in rc.log_text()
        # the cache host itself (loopback) still reaches its own listeners
        local = world.run(world.ns_router, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                            f"http://127.0.0.1:{METRICS_PORT}/status.json"], check=False)
        assert local.stdout == "200", local.stderr

"""Issue 12, item 1: TLS clients of the HTTPS proxy get HTTP/1.1 unless the operator sets http2,
and in-band bodies cross mitmproxy in whole 64 KiB pieces.

Real parts: curl and skopeo in the client namespace through regcache's HTTPS proxy (a real
mitmdump), the world's quay.io registry. curl offers h2 by ALPN as Go's net/http does; mitmproxy's
own default would accept it, and blob bodies then cross mitmproxy cut into 16 KiB HTTP/2 frames
by Python code: about a quarter slower (bench/README.md, hits).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import PROXY_PORT, Regcache, dir_manifest_digest, skopeo_copy
from .test_singleflight import big_layer, blob_url, client_bundle, curl, pull_token

pytestmark = pytest.mark.e2e

IMAGE = "quay.io/org/s2:1"
QUAY_API = "https://quay.io"


# curl through HTTPS_PROXY does not follow the fast-path 307 every client gets by default
IN_BAND = "fastpath: off\n"

def status_line(c) -> str:
    """The status line of the response (the proxy's CONNECT answer comes first in curl's -D file)."""
    lines = [l.strip() for l in c.header_path.read_text(errors="replace").splitlines() if l.startswith("HTTP/")]
    assert lines and lines[0].startswith("HTTP/1.1 200 Connection established"), lines
    return lines[-1]


def biggest_layer(world) -> str:
    img = world.image(IMAGE)
    return max((d for d in img.blobs if d != img.config_digest), key=img.layer_sizes.get)


def test_blob_through_the_https_proxy_is_served_over_http1(world, regcache_factory, tmp_path):
    rc = regcache_factory(config=IN_BAND)
    layer = biggest_layer(world)
    for n, cache_status in enumerate(("MISS", "HIT")):
        c = curl(world, rc, blob_url("org/s2", layer, QUAY_API), tmp_path / f"blob{n}").run()
        assert c.exit_code == 0 and c.status == 200, c.describe()
        assert status_line(c).startswith("HTTP/1.1 200"), status_line(c)
        assert c.headers.get("x-cache") == cache_status
        assert c.sha256() == layer
    # a Go client (containers/image) pulls the whole image over it
    env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(client_bundle(rc))}
    out = skopeo_copy(world, f"docker://{IMAGE}", tmp_path / "image", env)
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "image") == world.image(IMAGE).manifest_digest


def test_http2_set_by_the_operator_is_offered(world, regcache_factory, tmp_path):
    rc = regcache_factory(options={"http2": "true"}, config=IN_BAND)
    layer = biggest_layer(world)
    c = curl(world, rc, blob_url("org/s2", layer, QUAY_API), tmp_path / "blob").run()
    assert c.exit_code == 0 and c.status == 200, c.describe()
    assert status_line(c).startswith("HTTP/2 200"), status_line(c)
    assert c.sha256() == layer


def test_inband_bodies_cross_mitmproxy_in_whole_reads(world, tmp_path):
    """mitmproxy forwards a streamed body in reads of 65,535 bytes; regcache makes asyncio take in
    4 x 65,535 at a time, so a hit streams no 4-byte leftovers, each a trip through mitmproxy's
    layers and a TLS record of its own (every fifth piece without it)."""
    rc = Regcache(world, tmp_path / "rc", tmp_path / "rc" / "cache", [f"regular@{PROXY_PORT}"], {}, IN_BAND)
    rc.argv += ["-s", str(Path(__file__).with_name("chunk_sizes_addon.py"))]
    rc.start([PROXY_PORT])
    try:
        digest, size = big_layer(world)
        token = pull_token(world, "library/big")
        for n in range(2):  # the miss fills the cache, the hit streams it from the store
            c = curl(world, rc, blob_url("library/big", digest), tmp_path / f"big{n}",
                     headers=[f"Authorization: Bearer {token}"]).run()
            assert c.exit_code == 0 and c.status == 200 and c.received() == size, c.describe()
        assert c.headers.get("x-cache") == "HIT" and c.sha256() == digest
        lines = [line for line in rc.log_text().splitlines() if f"CHUNK-SIZES {digest}" in line]
        assert len(lines) == 2, lines
        pieces = {int(k): int(n) for k, n in (p.split("x") for p in lines[-1].rsplit(" ", 1)[1].split(","))}
        assert sum(k * n for k, n in pieces.items()) == size
        small = sum(n for k, n in pieces.items() if k < 1024)
        assert pieces.get(65535, 0) >= size // 65535 * 0.9, pieces
        assert small <= 3, f"{small} pieces under 1 KiB of {sum(pieces.values())}: {pieces}"
    finally:
        rc.stop()

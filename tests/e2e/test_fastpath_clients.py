"""Issue 12, item 1: the fast path for HTTPS_PROXY clients with the default configuration.

The client matrix that decides whether `fastpath: auto` may redirect proxied clients: each real
client (skopeo, podman, containerd's ctr, dockerd) pulls a public image through HTTPS_PROXY from
a regcache started with no fast-path settings at all, twice (conftest.pull_twice: the second
round from a fresh client with the upstream stopped, so every blob is a cache hit), and the
pulled image's digests are checked. Two ways the redirect to http://<cache>:5080/... can go:

* NO_PROXY names the cache host (what `regcache client-config` writes): the client fetches the
  body straight from the fast path. Proof: the router's packet counter for traffic from :5080
  to the client holds at least the image's blob bytes in the second round.
* HTTP_PROXY names regcache too, no NO_PROXY: the redirect comes back through the proxy and is
  served in-band over plain HTTP, checked against the client it was issued to (the log names
  the client's address), and nothing leaves :5080.

A private repository (pulled with credentials) stays inside TLS: no redirect at all.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time

import pytest

from .conftest import FASTPATH_EVERY_BLOB, FASTPATH_PORT, PROXY_PORT, dir_manifest_digest, pull_twice, skopeo_copy
# the client fixtures of the per-client matrices, used here through request.getfixturevalue
from .test_clients_containerd import containerd  # noqa: F401
from .test_clients_docker import dockerd  # noqa: F401
from .test_clients_podman import podman  # noqa: F401

pytestmark = pytest.mark.e2e

PUBLIC = "docker.io/library/small:1"  # token auth and blob GETs 307'd to the CDN upstream
PRIVATE = "docker.io/private/secret:1"
BIG = "docker.io/library/big:1"  # one 30 MiB layer

CLIENTS = {
    # client -> commands it needs
    "skopeo": ("skopeo",),
    "podman": ("podman",),
    "containerd": ("containerd", "ctr"),
    "dockerd": ("dockerd", "docker", "containerd", "nsenter", "unshare"),
}
# NO_PROXY names the cache host; only HTTPS_PROXY is set (plain http goes direct); HTTP_PROXY is regcache too
WAYS = ("NO_PROXY-direct", "HTTPS_PROXY-only", "HTTP_PROXY-back-through-proxy")
DIRECT_WAYS = ("NO_PROXY-direct", "HTTPS_PROXY-only")


class FastPathCounter:
    """Bytes the router namespace sent from the fast-path port to the client: an iptables
    rule without a target, which only counts; removed again on exit."""

    def __init__(self, world):
        self.world = world
        self.rule = ["OUTPUT", "-p", "tcp", "--sport", str(FASTPATH_PORT), "-d", world.client_ip,
                     "-m", "comment", "--comment", "regcache-fastpath-bytes"]

    def __enter__(self) -> "FastPathCounter":
        self.world.run(self.world.ns_router, ["iptables", "-I", *self.rule])
        return self

    def __exit__(self, *exc) -> None:
        self.world.run(self.world.ns_router, ["iptables", "-D", *self.rule], check=False)

    def bytes(self) -> int:
        out = self.world.run(self.world.ns_router, ["iptables", "-nvxL", "OUTPUT"]).stdout
        for line in out.splitlines():
            if "regcache-fastpath-bytes" in line:
                return int(line.split()[1])
        raise AssertionError(f"counting rule gone:\n{out}")


def proxy_env(world, rc, way: str) -> dict:
    proxy = f"http://{world.router_client_ip}:{PROXY_PORT}"
    env = {"HTTPS_PROXY": proxy, "SSL_CERT_FILE": str(rc.client_bundle())}
    if way == "NO_PROXY-direct":
        env["NO_PROXY"] = world.router_client_ip
    elif way == "HTTP_PROXY-back-through-proxy":
        env["HTTP_PROXY"] = proxy
    return env


def client_driver(name: str, world, rc, request, tmp_path, env: dict):
    """(client(round_name), pull(client, ref, note)) for conftest.pull_twice; pull checks digests."""
    missing = [c for c in CLIENTS[name] if shutil.which(c) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (./test.sh installs them)")
    if name == "skopeo":
        def pull(directory, ref, note):
            out = skopeo_copy(world, f"docker://{ref}", directory, env)
            assert out.returncode == 0, f"{ref}{note}: {out.stderr}" + rc.log_text()[-2000:]
            assert dir_manifest_digest(directory) == world.image(ref).manifest_digest, f"{ref}{note}"

        return (lambda round_name: tmp_path / round_name), pull
    if name == "podman":
        from .test_clients_podman import pull_and_check

        p = request.getfixturevalue("podman")(env=env)
        return (lambda round_name: round_name), (lambda store, ref, note:
                                                 pull_and_check(p, store, world, ref, rc, note))
    if name == "containerd":
        from .test_clients_containerd import pull_and_check

        make = request.getfixturevalue("containerd")
        return ((lambda round_name: make(round_name, env)),
                (lambda c, ref, note: pull_and_check(c, world, rc, ref, None, note)))
    from .test_clients_docker import pull_and_check

    make = request.getfixturevalue("dockerd")
    return (lambda round_name: make(round_name, env)), (lambda d, ref, note: pull_and_check(d, world, ref, None, note))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("client", [pytest.param(c, marks=[pytest.mark.slow] if c == "dockerd" else [])
                                    for c in CLIENTS])
def test_https_proxy_client_takes_the_fast_path_by_default(world, regcache_factory, request, tmp_path, client, way):
    rc = regcache_factory(config=FASTPATH_EVERY_BLOB)  # default config, but small blobs too by the fast path
    env = proxy_env(world, rc, way)
    image = world.image(PUBLIC)
    blob_bytes = sum(image.layer_sizes[d] for d in image.blobs)
    make_client, pull = client_driver(client, world, rc, request, tmp_path, env)
    with FastPathCounter(world) as counter:
        before_hits = {}

        def client_of_round(round_name):
            before_hits[round_name] = counter.bytes()
            return make_client(round_name)

        second = pull_twice(world, [PUBLIC], pull, client=client_of_round)
        sent_in_all = counter.bytes()
        sent_in_hits = sent_in_all - before_hits["b"]
    if hasattr(second, "stop"):
        second.stop()
    log = rc.log_text()
    for digest in image.blobs:
        # every blob of the second round was answered with the redirect
        assert re.search(rf"GET blob registry=docker.io repo=library/small digest={digest} outcome=HIT via=fastpath",
                         log), f"{client}: {digest} not redirected to the fast path:\n{log[-3000:]}"
        came_back = f"fast-path URL for {digest} came back through the proxy from {world.client_ip}; served in-band"
        assert (came_back in log) == (way not in DIRECT_WAYS), f"{client} {way}: {digest}:\n{log[-3000:]}"
    if way in DIRECT_WAYS:
        assert sent_in_hits >= blob_bytes, f"{client}: {sent_in_hits} bytes from :{FASTPATH_PORT}, blobs {blob_bytes}"
    else:
        assert sent_in_all == 0, f"{client}: a redirect that came back through the proxy went to :{FASTPATH_PORT}"
    assert "refused fast-path request" not in log


def test_default_config_answers_small_hits_inline_and_large_ones_by_the_fast_path(world, regcache_factory, request,
                                                                                  tmp_path):
    """By default a stored blob of up to 64 KiB is answered inline (one request, inside TLS), a
    larger one with the 307 to the fast path: a proxied skopeo gets both right from the cache."""
    rc = regcache_factory()
    env = proxy_env(world, rc, "NO_PROXY-direct")
    small, big = world.image(PUBLIC), world.image(BIG)
    big_layer = max(big.blobs, key=big.layer_sizes.get)
    make_client, pull = client_driver("skopeo", world, rc, request, tmp_path, env)
    with FastPathCounter(world) as counter:
        before = {}

        def client_of_round(round_name):
            before[round_name] = counter.bytes()
            return make_client(round_name)

        pull_twice(world, [PUBLIC, BIG], pull, client=client_of_round)
        sent_in_hits = counter.bytes() - before["b"]
    log = rc.log_text()
    for digest in small.blobs:
        size = small.layer_sizes[digest]
        assert re.search(rf"repo=library/small digest={digest} outcome=HIT bytes={size} via=inband", log), \
            f"{digest} ({size} bytes) not answered inline:\n{log[-3000:]}"
        assert f"digest={digest} outcome=HIT via=fastpath" not in log
    assert re.search(rf"repo=library/big digest={big_layer} outcome=HIT via=fastpath", log), log[-3000:]
    assert big.layer_sizes[big_layer] <= sent_in_hits < big.layer_sizes[big_layer] + 64 * 1024, sent_in_hits


def test_private_repository_stays_in_band_for_a_proxied_client(world, regcache_factory, tmp_path):
    """fastpath_private is false by default: a repository not known to be public is served
    inside TLS through the proxy even where the client could reach the fast path directly."""
    rc = regcache_factory()
    env = proxy_env(world, rc, "NO_PROXY-direct")
    image = world.image(PRIVATE)
    creds = ["--src-creds", f"{world.username}:{world.password}"]
    with FastPathCounter(world) as counter:
        for round_name in ("a", "b"):
            out = skopeo_copy(world, f"docker://{PRIVATE}", tmp_path / round_name, env, creds)
            assert out.returncode == 0, f"{round_name}: {out.stderr}" + rc.log_text()[-2000:]
            assert dir_manifest_digest(tmp_path / round_name) == image.manifest_digest
        assert counter.bytes() == 0
    log = rc.log_text()
    for digest in image.blobs:
        # a small blob is answered inline (its bytes logged), a larger one streams from the blob server
        line = rf"GET blob registry=docker.io repo=private/secret digest={digest} outcome=HIT( bytes=\d+)? via=inband"
        assert re.search(line, log), log[-3000:]
    assert "via=fastpath" not in log


def test_redirect_back_through_the_proxy_is_bound_to_the_client(world, regcache_factory, tmp_path):
    """The URL a proxied client was redirected to works through the proxy for that client and
    is refused from any other address (here: the router's own, through the same proxy)."""
    rc = regcache_factory(config=FASTPATH_EVERY_BLOB)
    env = proxy_env(world, rc, "HTTP_PROXY-back-through-proxy")
    ref = "ghcr.io/owner/small:1"  # an open registry: a plain curl may ask for its blobs
    image = world.image(ref)
    out = skopeo_copy(world, f"docker://{ref}", tmp_path / "pulled", env)
    assert out.returncode == 0, out.stderr
    digest = max(image.layer_sizes, key=image.layer_sizes.get)
    proxy = f"http://{world.router_client_ip}:{PROXY_PORT}"
    blob_url = f"https://ghcr.io/v2/owner/small/blobs/{digest}"
    answer = world.run(world.ns_client, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                                         "-x", proxy, "--cacert", str(rc.client_bundle()), blob_url]).stdout
    status, location = answer.split(" ", 1)
    assert status == "307", answer
    assert location.startswith(f"http://{world.router_client_ip}:{FASTPATH_PORT}/"), location

    def fetch(ns, name):
        body = tmp_path / name
        r = world.run(ns, ["curl", "-sS", "-o", str(body), "-w", "%{http_code}", "-x", proxy, location])
        return r.stdout, body

    status, body = fetch(world.ns_router, "stranger")
    assert status == "403", status
    assert "URL" in body.read_text() or "DENIED" in body.read_text()
    status, body = fetch(world.ns_client, "owner")
    assert status == "200", status
    assert "sha256:" + hashlib.sha256(body.read_bytes()).hexdigest() == digest
    assert f"came back through the proxy from {world.client_ip}" in rc.log_text()
    assert f"refused fast-path request from {world.router_client_ip} through the proxy" in rc.log_text()



OTHER_PROXY_PORT = 3128


@pytest.fixture
def other_http_proxy(world, tmp_path):
    """A plain HTTP proxy that is not regcache (tinyproxy on the router, so what it forwards
    reaches the fast path from the router's address, not the client's): the client's HTTP_PROXY."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (./test.sh installs it)")
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {OTHER_PROXY_PORT}\nListen {world.router_client_ip}\nTimeout 60\nAllow {world.client_ip}\n"
                    f"LogLevel Info\nLogFile \"{tmp_path}/tinyproxy.log\"\nMaxClients 20\n")
    proc = world.popen(world.ns_router, ["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not world.run(world.ns_router, ["ss", "-Htln", f"sport = :{OTHER_PROXY_PORT}"]).stdout.strip():
            assert proc.poll() is None and time.monotonic() < deadline, "tinyproxy did not start"
            time.sleep(0.1)
        yield f"http://{world.router_client_ip}:{OTHER_PROXY_PORT}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("client", [pytest.param(c, marks=[pytest.mark.slow] if c == "dockerd" else [])
                                    for c in CLIENTS])
def test_redirect_through_another_http_proxy_is_sent_back_in_band(world, regcache_factory, request, tmp_path, client,
                                                                   other_http_proxy):
    """HTTPS_PROXY is regcache, HTTP_PROXY another proxy, NO_PROXY empty: the redirect reaches
    the fast path from that proxy's address, where the URL (bound to the client) is no good.
    Instead of a 403 that fails the pull, the blob server sends it back to the https URL the
    client asked for, which comes through HTTPS_PROXY and is served in-band; from then on this
    client gets its blobs in-band straight away."""
    rc = regcache_factory(config=FASTPATH_EVERY_BLOB)
    env = proxy_env(world, rc, "HTTPS_PROXY-only")
    env["HTTP_PROXY"] = other_http_proxy
    image = world.image(PUBLIC)
    make_client, pull = client_driver(client, world, rc, request, tmp_path, env)
    second = pull_twice(world, [PUBLIC], pull, client=make_client)
    if hasattr(second, "stop"):
        second.stop()
    log = rc.log_text()
    assert (f"fast-path URL came from {world.router_client_ip}, not from the proxied client it was issued to"
            in log), log[-3000:]
    assert "sent back to https://registry-1.docker.io/v2/library/small/blobs/sha256:" in log
    for digest in image.blobs:
        # the cache hits of the second round: in-band, no more round trips through the other proxy
        assert re.search(rf"GET blob registry=docker.io repo=library/small digest={digest} outcome=HIT( bytes=\d+)? via=inband",
                         log), \
            f"{client}: {digest}:\n{log[-3000:]}"
        assert f"digest={digest} outcome=HIT via=fastpath" not in log, f"{client}: {digest}:\n{log[-3000:]}"

"""Issue 9 (3c): `regcache import` does not take a bundle's word for anything but its bytes.

Real parts: `regcache warm` fills a source cache from the world's docker.io (token auth),
`regcache export` writes the bundle, the test edits its index.json as a hostile author would,
`regcache import` reads it into a fresh cache, and a real mitmdump serves that cache online to
skopeo in the client namespace through HTTPS_PROXY, with upstream up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from regcachelib.store import Store

from .conftest import PROXY_PORT, dir_manifest_digest, skopeo_copy
from .test_cli import cli, cli_in
from .test_privacy import CREDS, PRIVATE, refused
from .test_singleflight import client_bundle

pytestmark = pytest.mark.e2e

CHECKED_AT = "io.regcache.checked-at"
PUBLIC = "io.regcache.public"


def proxy_env(world, rc) -> dict:
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(client_bundle(rc))}


def warmed_bundle(world, tmp_path: Path, image: str, annotations: dict, credentials: bool = False) -> Path:
    """A bundle of `image` made by regcache itself, its index entry's annotations then overwritten."""
    source = tmp_path / "source"
    args = ["--dir", source, "warm", image, "--upstream-ca", world.ca_bundle_path]
    env = None
    if credentials:
        args += ["--username", "testuser"]
        env = {"REGCACHE_PASSWORD": "testpass"}
    out = cli_in(world, world.ns_router, *args, env=env)
    assert "warmed 1 of 1 image(s)" in out.stdout, out.stdout + out.stderr
    bundle = tmp_path / "bundle"
    cli("--dir", source, "export", image, "-o", bundle)
    index = json.loads((bundle / "index.json").read_text())
    index["manifests"][0]["annotations"].update(annotations)
    (bundle / "index.json").write_text(json.dumps(index))
    return bundle


def test_a_tag_dated_in_the_future_is_revalidated_once_its_ttl_is_over(world, regcache_factory, tmp_path):
    image = world.image("docker.io/library/small:1")
    # what a careless or hostile exporter writes: "confirmed" in the year 31 million
    bundle = warmed_bundle(world, tmp_path, image.ref, {CHECKED_AT: "1e18"})
    assert json.loads((bundle / "index.json").read_text())["manifests"][0]["annotations"][PUBLIC] == "true"
    fresh = tmp_path / "fresh"
    before = time.time()
    cli("--dir", fresh, "import", bundle)
    store = Store(str(fresh))
    try:
        entry = store.tag_entries("docker.io", "library/small", "1")[0]
        assert before <= entry.checked_at <= time.time()
        # imported under its repository: the proxy may serve it from the cache there
        assert all(store.holds("docker.io", "library/small", d) for d in [image.digest, *image.blobs])
    finally:
        store.close()
    rc = regcache_factory(cache_dir=fresh, config="tag_ttl: 1s\n")
    time.sleep(1.5)  # the imported tag is past its TTL now
    mark = len(world.request_log("registry-1.docker.io"))
    out = skopeo_copy(world, "docker://" + image.host_ref, tmp_path / "pull", proxy_env(world, rc))
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "pull") == image.digest
    asked = [e for e in world.wait_request_log("registry-1.docker.io", lambda e: e["path"] == "/v2/library/small/manifests/1")[mark:]
             if e["path"] == "/v2/library/small/manifests/1"]
    assert asked, world.request_log("registry-1.docker.io")[mark:]
    assert "repo=library/small tag=1 outcome=REVALIDATED" in rc.log_text(), rc.log_text()[-3000:]


def test_a_bundle_calling_a_private_repository_public_opens_it_to_no_one(world, regcache_factory, tmp_path):
    secret = world.image("docker.io/private/secret:1")
    bundle = warmed_bundle(world, tmp_path, secret.ref, {PUBLIC: "true"}, credentials=True)
    fresh = tmp_path / "fresh"
    out = cli("--dir", fresh, "import", bundle)
    assert "not taken on its word" in out.stderr
    rc = regcache_factory(cache_dir=fresh)
    env = proxy_env(world, rc)
    anon = skopeo_copy(world, PRIVATE, tmp_path / "anon", env)
    assert refused(anon), anon.stderr + rc.log_text()[-3000:]
    assert "not serving cached docker.io/private/secret" in rc.log_text()
    # the operator's --public never overrides what upstream answered meanwhile
    out = cli("--dir", fresh, "import", bundle, "--public")
    assert "recorded as public" not in out.stdout
    # and into a cache that never asked upstream it is a claim upstream's answer replaces: still refused online
    rc.stop()
    vouched = tmp_path / "vouched"
    out = cli("--dir", vouched, "import", bundle, "--public")
    assert "recorded as public (--public, until upstream says otherwise): docker.io/private/secret" in out.stdout
    rc = regcache_factory(cache_dir=vouched)
    env = proxy_env(world, rc)
    anon = skopeo_copy(world, PRIVATE, tmp_path / "anon2", env)
    assert refused(anon), anon.stderr + rc.log_text()[-3000:]
    store = Store(str(vouched))
    try:
        public, when = store.tags.get(("public", "docker.io", "private/secret"))
        assert public is False and when > 0
    finally:
        store.close()
    # the imported image itself is fine: a client upstream accepts is served
    user = skopeo_copy(world, PRIVATE, tmp_path / "user", env, CREDS)
    assert user.returncode == 0, user.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "user") == secret.digest

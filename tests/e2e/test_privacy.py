"""Issue 5: privacy — private-repository isolation, credentials never leave the registry
they are meant for and never reach the disk, non-registry TLS is not intercepted.

Real parts: skopeo and curl in the client namespace through regcache's HTTPS proxy; the
world's docker.io with Docker-Hub-style token auth (anonymous pull everywhere except
private/*, testuser/testpass pull+push) and its 307 blob CDN.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from .conftest import PROXY_PORT, dir_manifest_digest, skopeo_copy
from .test_singleflight import DOCKER_API, blob_url, client_bundle, curl, pull_token

pytestmark = pytest.mark.e2e

PRIVATE = "docker://registry-1.docker.io/private/secret:1"
PUBLIC = "docker://registry-1.docker.io/library/small:1"
CREDS = ["--src-creds", "testuser:testpass"]
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def proxy_env(world, rc) -> dict:
    return {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(client_bundle(rc))}


def refused(out) -> bool:
    err = out.stderr.lower()
    return out.returncode != 0 and ("unauthorized" in err or "401" in err or "denied" in err or "authentication required" in err)


def secret_layer(world) -> str:
    img = world.image("docker.io/private/secret:1")
    return max((d for d in img.blobs if d != img.config_digest), key=img.layer_sizes.get)


def test_private_image_is_served_only_to_clients_upstream_accepts(world, regcache_factory, tmp_path):
    rc = regcache_factory()
    env = proxy_env(world, rc)
    secret = world.image("docker.io/private/secret:1")
    layer = secret_layer(world)
    cdn_start = len(world.request_log(world.cdn_host))

    first = skopeo_copy(world, PRIVATE, tmp_path / "user1", env, CREDS)
    assert first.returncode == 0, first.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "user1") == secret.manifest_digest
    assert "repo=private/secret" in rc.log_text() and "outcome=MISS" in rc.log_text()

    # everything is cached now, yet an anonymous client gets nothing of it
    anon = skopeo_copy(world, PRIVATE, tmp_path / "anon", env)
    assert refused(anon), anon.stderr
    assert "not serving cached docker.io/private/secret" in rc.log_text()
    # not even a blob by digest, with an anonymous token or with no credentials at all
    anon_token = pull_token(world, "private/secret")
    for name, headers in (("anon-token", [f"Authorization: Bearer {anon_token}"]), ("no-auth", [])):
        c = curl(world, rc, blob_url("private/secret", layer), tmp_path / name, headers=headers).run()
        assert c.exit_code == 0 and c.status == 401, c.describe()
        assert c.headers.get("x-cache") is None
        assert json.loads(c.out.read_bytes())["errors"][0]["code"] == "UNAUTHORIZED"
    c = curl(world, rc, f"{DOCKER_API}/v2/private/secret/manifests/{secret.digest}", tmp_path / "anon-manifest",
             headers=[f"Authorization: Bearer {anon_token}"]).run()
    assert c.status == 401 and c.headers.get("x-cache") is None, c.describe()

    # testuser again: from the cache, no new download of the layer
    gets_before = [e for e in world.request_log(world.cdn_host)[cdn_start:] if layer.split(":")[1] in e["path"]]
    assert len(gets_before) == 1
    log_mark = len(rc.log_text())
    second = skopeo_copy(world, PRIVATE, tmp_path / "user2", env, CREDS)
    assert second.returncode == 0, second.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "user2") == secret.manifest_digest
    new_log = rc.log_text()[log_mark:]
    assert f"GET blob registry=docker.io repo=private/secret digest={layer} outcome=HIT" in new_log, new_log[-3000:]
    assert [e for e in world.request_log(world.cdn_host)[cdn_start:] if layer.split(":")[1] in e["path"]] == gets_before

    # a public image is served to anonymous clients, from the cache the second time
    for n in range(2):
        out = skopeo_copy(world, PUBLIC, tmp_path / f"public{n}", env)
        assert out.returncode == 0, out.stderr
        assert dir_manifest_digest(tmp_path / f"public{n}") == world.image("docker.io/library/small:1").manifest_digest
    assert [l for l in rc.log_text().splitlines() if "repo=library/small " in l and "outcome=HIT" in l]

    # the registry's Authorization never travelled to the CDN
    cdn = world.request_log(world.cdn_host)[cdn_start:]
    assert cdn and not [e for e in cdn if e["auth"]], cdn


def test_private_image_with_upstream_down_refused_unless_trusted(world, regcache_factory, tmp_path):
    cache = tmp_path / "cache"
    rc = regcache_factory(cache_dir=cache)
    env = proxy_env(world, rc)
    secret = world.image("docker.io/private/secret:1")
    assert skopeo_copy(world, PRIVATE, tmp_path / "warm", env, CREDS).returncode == 0
    assert skopeo_copy(world, PUBLIC, tmp_path / "warm-public", env).returncode == 0

    world.stop_upstream()
    try:
        user = skopeo_copy(world, PRIVATE, tmp_path / "user-down", env, CREDS)
        assert refused(user), user.stderr + rc.log_text()[-2000:]
        anon = skopeo_copy(world, PRIVATE, tmp_path / "anon-down", env)
        assert refused(anon), anon.stderr
        assert "credentials cannot be checked" in rc.log_text()
        public = skopeo_copy(world, PUBLIC, tmp_path / "public-down", env)
        assert public.returncode == 0, public.stderr + rc.log_text()[-2000:]
    finally:
        world.start_upstream()
    rc.stop()

    trusting = regcache_factory(cache_dir=cache, config="trust_clients_offline: true\n")
    env = proxy_env(world, trusting)
    world.stop_upstream()
    try:
        user = skopeo_copy(world, PRIVATE, tmp_path / "user-trusted", env, CREDS)
        assert user.returncode == 0, user.stderr + trusting.log_text()[-3000:]
        assert dir_manifest_digest(tmp_path / "user-trusted") == secret.manifest_digest
    finally:
        world.start_upstream()


def _issuer(world, rc, url: str) -> str:
    r = world.run(world.ns_client, ["curl", "-sS", "-v", "-o", "/dev/null", "--proxy", f"http://{world.router_client_ip}:{PROXY_PORT}",
                                    "--cacert", str(client_bundle(rc)), url], check=False)
    lines = [l for l in r.stderr.splitlines() if "issuer:" in l]
    assert r.returncode == 0 and lines, r.stderr
    return lines[0]


def test_non_registry_tls_is_not_intercepted(world, regcache_factory):
    rc = regcache_factory()
    world_ca = "regcache test world CA"
    for url in ("https://auth.docker.io/token?service=registry.docker.io&scope=repository:library/small:pull",
                "https://production.cloudflare.docker.com/nothing"):
        issuer = _issuer(world, rc, url)
        assert world_ca in issuer and "mitmproxy" not in issuer, issuer
    # control: a registry host is intercepted, with regcache's CA
    issuer = _issuer(world, rc, "https://registry-1.docker.io/v2/")
    assert "mitmproxy" in issuer and world_ca not in issuer, issuer


def test_credentials_never_written_to_cache_dir_or_logs(world, regcache_factory, tmp_path):
    rc = regcache_factory()
    env = proxy_env(world, rc)
    secret = world.image("docker.io/private/secret:1")
    layer = secret_layer(world)
    token = pull_token(world, "private/secret", creds="testuser:testpass")
    auth = [f"Authorization: Bearer {token}"]

    # this client's token is the one regcache's own downloads use (misses)
    m = curl(world, rc, f"{DOCKER_API}/v2/private/secret/manifests/1", tmp_path / "m", headers=[*auth, f"Accept: {secret.media_type}"]).run()
    assert m.status == 200 and m.headers.get("x-cache") == "MISS", m.describe()
    b = curl(world, rc, blob_url("private/secret", layer), tmp_path / "b", headers=auth).run()
    assert b.status == 200 and b.headers.get("x-cache") == "MISS" and b.sha256() == layer, b.describe()
    # Basic credentials sent straight to the registry through regcache
    basic = curl(world, rc, f"{DOCKER_API}/v2/private/secret/manifests/{secret.digest}", tmp_path / "basic", extra=["-u", "testuser:testpass"]).run()
    assert basic.status == 401, basic.describe()
    out = skopeo_copy(world, PRIVATE, tmp_path / "pull", env, CREDS)
    assert out.returncode == 0, out.stderr
    rc.stop()

    misses = [json.loads(l) for l in (rc.cache_dir / "misses.jsonl").read_text().splitlines()]
    assert {(e["repo"], e["kind"]) for e in misses} >= {("private/secret", "manifest"), ("private/secret", "blob")}
    secrets = [
        b"testpass",
        base64.b64encode(b"testuser:testpass"),
        token.encode(),
        token.split(".")[2].encode(),  # the token's signature alone
        b"Bearer ",
    ]
    files = [p for p in Path(rc.cache_dir).rglob("*") if p.is_file()]
    assert any(p.name == "misses.jsonl" for p in files) and len(files) > 3
    for p in files:
        data = p.read_bytes()
        for s in secrets:
            assert s not in data, f"{s[:20]!r}... found in {p}"
        assert not JWT.search(data), f"a JWT in {p}: {JWT.search(data).group()[:40]!r}"
        if p.name == "misses.jsonl":
            assert b"authorization" not in data.lower() and b"bearer" not in data.lower()
    log = rc.log_text().encode()
    for s in secrets[:4]:
        assert s not in log, f"{s[:20]!r}... in regcache's log"

"""Issue 13: upstream credentials -- regcache's own Docker Hub account for clients without
credentials, never widening who may read what; rate-limit figures per credential; a 429 from
upstream answered from the cache.

Real parts: mitmdump with `credentials:` naming a secret file, skopeo and curl in the client
namespace through its HTTPS proxy; the world's docker.io (token auth, `hubuser` is the
configured account and may read private/* too; nginx adds Docker Hub's ratelimit-* headers to
manifest answers and answers 429 while world.ratelimited(True)).
"""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import urlencode

import pytest

from tests.world.world import HUB_PASSWORD, HUB_USERNAME, RATELIMITS

from .conftest import dir_manifest_digest, skopeo_copy
from .test_privacy import CREDS, JWT, PRIVATE, PUBLIC, proxy_env, refused
from .test_singleflight import DOCKER_API, blob_url, curl, pull_token

pytestmark = pytest.mark.e2e

METRICS = "127.0.0.1:9091"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def config(tmp_path, extra: str = "") -> str:
    secret = tmp_path / "hub-token"
    secret.write_text(HUB_PASSWORD + "\n")
    secret.chmod(0o600)
    return f"credentials:\n  docker.io:\n    username: {HUB_USERNAME}\n    password_file: {secret}\n{extra}"


def fetch(world, path: str) -> str:
    r = world.run(world.ns_router, ["curl", "-sS", "--fail", "--max-time", "10", f"http://{METRICS}{path}"],
                  check=False)
    assert r.returncode == 0, f"{path}: {r.stderr}"
    return r.stdout


def hub_tokens(world, since: int = 0) -> list[dict]:
    """Tokens the token service issued to the configured account."""
    return [e for e in world.token_log()[since:] if e.get("subject") == HUB_USERNAME and e["status"] == 200]


def test_anonymous_clients_pull_public_images_as_the_account_never_private_ones(world, regcache_factory, tmp_path):
    rc = regcache_factory(options={"regcache_metrics": METRICS}, config=config(tmp_path))
    env = proxy_env(world, rc)
    tokens_before = len(world.token_log())
    requests_before = len(world.request_log(world.docker_host))

    # skopeo without credentials (it fetches an anonymous token itself): regcache pulls as hubuser
    small = world.image("docker.io/library/small:1")
    out = skopeo_copy(world, PUBLIC, tmp_path / "small", env)
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "small") == small.manifest_digest
    granted = hub_tokens(world, tokens_before)
    assert granted, world.token_log()[tokens_before:]
    assert {a["name"] for e in granted for a in e["access"]} == {"library/small"}
    # every manifest GET upstream went with an Authorization (the account's token)
    gets = [e for e in world.request_log(world.docker_host)[requests_before:]
            if e["method"] == "GET" and "/library/small/manifests/" in e["path"]]
    assert gets and all(e["auth"] for e in gets)

    # a client with no Authorization at all gets a public manifest (upstream would answer it 401)
    s2 = world.image("docker.io/library/s2:1")
    c = curl(world, rc, f"{DOCKER_API}/v2/library/s2/manifests/1", tmp_path / "s2.json",
             headers=["Accept: application/vnd.docker.distribution.manifest.v2+json"]).run()
    assert c.status == 200, c.describe() + rc.log_text()[-3000:]
    assert c.headers.get("docker-content-digest") == s2.manifest_digest
    # and a public blob nobody fetched yet (the download goes as hubuser, the CDN gets no credentials)
    layer = max((d for d in s2.blobs if d != s2.config_digest), key=s2.layer_sizes.get)
    c = curl(world, rc, blob_url("library/s2", layer), tmp_path / "s2.layer", extra=["-L"]).run()
    assert c.status == 200 and c.sha256() == layer, c.describe() + rc.log_text()[-3000:]

    # private/*: hubuser could read it, an anonymous client still cannot -- not even once testuser
    # has put it in the cache
    anon = skopeo_copy(world, PRIVATE, tmp_path / "anon", env)
    assert refused(anon), anon.stderr
    c = curl(world, rc, f"{DOCKER_API}/v2/private/secret/manifests/1", tmp_path / "secret-noauth.json",
             headers=[f"Accept: {OCI_MANIFEST}"]).run()
    assert c.status == 401, c.describe()
    user = skopeo_copy(world, PRIVATE, tmp_path / "user", env, CREDS)
    assert user.returncode == 0, user.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "user") == world.image("docker.io/private/secret:1").manifest_digest
    anon_token = pull_token(world, "private/secret")
    for name, headers in (("anon-token", [f"Authorization: Bearer {anon_token}"]), ("no-auth", [])):
        c = curl(world, rc, f"{DOCKER_API}/v2/private/secret/manifests/1", tmp_path / f"secret-{name}.json",
                 headers=[f"Accept: {OCI_MANIFEST}", *headers]).run()
        assert c.status == 401 and c.headers.get("x-cache") is None, c.describe()
    assert refused(skopeo_copy(world, PRIVATE, tmp_path / "anon2", env))
    # the account was never even asked to log in for a private repository
    assert not [e for e in hub_tokens(world, tokens_before) if any(a["name"].startswith("private/")
                                                                   for a in e["access"])]

    # Docker Hub's figures per credential: the account's and the anonymous address's
    status = json.loads(fetch(world, "/status.json"))
    limits = {(r["registry"], r["credential"]): r for r in status["upstream_ratelimits"]}
    hub = limits[("docker.io", HUB_USERNAME)]
    assert hub["limit"] == RATELIMITS["*"] and 0 < hub["remaining"] < RATELIMITS["*"], limits
    anonymous = limits[("docker.io", "anonymous")]
    assert anonymous["limit"] == RATELIMITS["anonymous"] and anonymous["source"] == world.router_upstream_ip, limits
    metrics = fetch(world, "/metrics")
    line = f'regcache_upstream_ratelimit_remaining{{credential="{HUB_USERNAME}",registry="docker.io"}} '
    assert line + f"{float(hub['remaining'])}" in metrics, [m for m in metrics.splitlines() if "ratelimit" in m]
    assert f'regcache_upstream_ratelimit_limit{{credential="anonymous",registry="docker.io"}} ' \
           f'{float(RATELIMITS["anonymous"])}' in metrics
    page = fetch(world, "/")
    assert f"<td>{HUB_USERNAME}</td><td>{hub['remaining']}</td>" in page.split('id="upstream-ratelimits"')[1]

    # the secret is nowhere: not in the log, the cache dir, the status page or /metrics
    basic = base64.b64encode(f"{HUB_USERNAME}:{HUB_PASSWORD}".encode())
    assert HUB_PASSWORD not in rc.log_text() and basic.decode() not in rc.log_text()
    for path in rc.cache_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert HUB_PASSWORD.encode() not in data and basic not in data, path
            assert not JWT.search(data), path  # nor a token obtained with it
    for text in (json.dumps(status), metrics, page):
        assert HUB_PASSWORD not in text


def _registry(world, method: str, path: str, token: str, body: bytes | None = None, content_type: str = ""):
    """Straight to the world's docker.io (not through regcache): (status, headers text, body)."""
    argv = ["curl", "-sS", "-X", method, "-D", "-", "--cacert", str(world.ca_bundle_path),
            "-H", f"Authorization: Bearer {token}", "-H", f"Accept: {OCI_MANIFEST}"]
    if body is not None:
        argv += ["-H", f"Content-Type: {content_type}", "--data-binary", "@-"]
    r = world.run(world.ns_client, [*argv, f"{DOCKER_API}{path}"], input=body, check=False, text=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode(errors="replace")


def _push_token(world, repo: str) -> str:
    query = urlencode({"service": "registry.docker.io", "scope": f"repository:{repo}:pull,push"})
    argv = ["curl", "-sS", "--fail", "--cacert", str(world.ca_bundle_path), "-u", "testuser:testpass",
            f"https://auth.docker.io/token?{query}"]
    return json.loads(world.run(world.ns_client, argv).stdout)["token"]


def test_pull_limit_429_on_a_moved_tag_is_answered_from_the_cache(world, regcache_factory, tmp_path):
    """Docker Hub answers HEADs past the pull limit, GETs 429: a tag that moved upstream while
    the limit is reached is answered with what it named until now (stale), not with the 429."""
    rc = regcache_factory(config=config(tmp_path, "tag_ttl: 1s\n"))
    small = world.image("docker.io/library/small:1")
    token = _push_token(world, "library/small")
    tag = f"moving-{int(time.time() * 1000)}"
    original = world.run(world.ns_client, ["curl", "-sS", "--fail", "--cacert", str(world.ca_bundle_path),
                                           "-H", f"Authorization: Bearer {token}", "-H", f"Accept: {OCI_MANIFEST}",
                                           f"{DOCKER_API}/v2/library/small/manifests/{small.manifest_digest}"],
                         text=False).stdout
    media_type = json.loads(original)["mediaType"]
    _registry(world, "PUT", f"/v2/library/small/manifests/{tag}", token, original, media_type)

    url = f"{DOCKER_API}/v2/library/small/manifests/{tag}"
    first = curl(world, rc, url, tmp_path / "first.json", headers=[f"Accept: {media_type}"]).run()
    assert first.status == 200 and first.headers.get("docker-content-digest") == small.manifest_digest, \
        first.describe() + rc.log_text()[-3000:]

    # the tag moves upstream (same layers, one annotation more), then the limit is reached
    moved = json.loads(original)
    moved.setdefault("annotations", {})["moved"] = tag
    _registry(world, "PUT", f"/v2/library/small/manifests/{tag}", token, json.dumps(moved).encode(), media_type)
    time.sleep(1.5)  # past tag_ttl
    world.ratelimited(True)
    try:
        direct = _registry(world, "GET", f"/v2/library/small/manifests/{tag}", token)
        assert direct.startswith("HTTP/1.1 429") or direct.startswith("HTTP/2 429"), direct[:300]
        mark = len(rc.log_text())
        second = curl(world, rc, url, tmp_path / "second.json", headers=[f"Accept: {media_type}"]).run()
    finally:
        world.ratelimited(False)
    assert second.status == 200, second.describe() + rc.log_text()[-3000:]
    assert second.headers.get("docker-content-digest") == small.manifest_digest
    assert second.out.read_bytes() == original
    assert "stale" in second.headers.get("warning", ""), second.headers
    log = rc.log_text()[mark:]
    assert f"serving stale docker.io/library/small:{tag}" in log and "429" in log, log[-2000:]

    # the limit over, the moved tag is fetched
    third = curl(world, rc, url, tmp_path / "third.json", headers=[f"Accept: {media_type}"]).run()
    assert third.status == 200 and third.headers.get("docker-content-digest") != small.manifest_digest, \
        third.describe()


def test_an_account_the_token_service_refuses_leaves_pulls_as_they_were(world, regcache_factory, tmp_path):
    wrong = "wrong-" + HUB_PASSWORD
    secret = tmp_path / "hub-token"
    secret.write_text(wrong)
    rc = regcache_factory(config=f"credentials:\n  docker.io:\n    username: {HUB_USERNAME}\n"
                                 f"    password_file: {secret}\n")
    tokens_before = len(world.token_log())
    out = skopeo_copy(world, PUBLIC, tmp_path / "small", proxy_env(world, rc))
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    assert dir_manifest_digest(tmp_path / "small") == world.image("docker.io/library/small:1").manifest_digest
    refusals = [e for e in world.token_log()[tokens_before:] if e["status"] == 401]
    assert len(refusals) == 1, refusals  # one login, then the account rests
    assert f"cannot use the docker.io account {HUB_USERNAME}" in rc.log_text()
    assert wrong not in rc.log_text()

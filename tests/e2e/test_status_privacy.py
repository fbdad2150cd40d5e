"""Issue 9 item 4b: the status page, /status.json and /metrics name no repository that is not
known to be public — not its name, tag or digests — yet count its traffic in aggregate.

Real parts: skopeo in the client namespace through regcache's HTTPS proxy, pulling a private
image with the world's testuser credentials and a public one anonymously from the world's
docker.io (Docker-Hub-style token auth, anonymous pull everywhere except private/*); curl in
the router namespace reading regcache's metrics endpoint.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from .conftest import skopeo_copy
from .test_privacy import CREDS, PRIVATE, PUBLIC, proxy_env

pytestmark = pytest.mark.e2e

METRICS = "127.0.0.1:9090"


def fetch(world, path: str) -> str:
    r = world.run(world.ns_router, ["curl", "-sS", "--fail", "--max-time", "10", f"http://{METRICS}{path}"],
                  check=False)
    assert r.returncode == 0, f"{path}: {r.stderr}"
    return r.stdout


def test_status_page_json_and_metrics_do_not_name_private_repositories(world, regcache_factory, tmp_path):
    rc = regcache_factory(options={"regcache_metrics": METRICS})
    env = proxy_env(world, rc)
    secret = world.image("docker.io/private/secret:1")
    for n in range(2):  # a miss, then a hit
        out = skopeo_copy(world, PRIVATE, tmp_path / f"secret{n}", env, CREDS)
        assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]
    out = skopeo_copy(world, PUBLIC, tmp_path / "small", env)
    assert out.returncode == 0, out.stderr + rc.log_text()[-3000:]

    # library/small is named once regcache has learnt it is public (a probe in the background)
    deadline = time.monotonic() + 20
    while True:
        status = json.loads(fetch(world, "/status.json"))
        if any(t["image"] == "docker.io/library/small" for t in status["stats"]["top_images"]):
            break
        assert time.monotonic() < deadline, status["stats"]["top_images"]
        time.sleep(0.3)
    page = fetch(world, "/")
    metrics = fetch(world, "/metrics")
    raw_json = json.dumps(status)

    # nothing of private/secret: not its name, nor its manifest, config or layer digests (in
    # full or shortened as the page shows them)
    secret_digests = {secret.digest, *secret.blobs, *(c.digest for c in secret.children)}
    for name, text in (("status.json", raw_json), ("status page", page), ("/metrics", metrics)):
        assert "private/secret" not in text, f"{name} names private/secret"
        for digest in secret_digests:
            assert digest.split(":", 1)[1][:12] not in text, f"{name} shows {digest}"
    # nor its tag: no recent miss or download carries a reference of a hidden repository
    assert "docker.io/library/small" in page and "docker.io/library/small" in raw_json
    hidden = [m for m in status["recent_misses"] if m["repo"] == "(private)"]
    assert hidden and not [m for m in hidden if m.get("reference") or m.get("digest")], hidden
    assert {m["repo"] for m in status["recent_misses"]} == {"(private)", "library/small"}
    assert not re.search(r"<td>docker\.io/\(private\)</td><td>\w+</td><td>[^<]", page), page

    # counted all the same, in aggregate: one "(private)" row, one private repository, and
    # every request regcache logged (private or not) in the registry's totals
    log = rc.log_text()
    logged = len(re.findall(r" registry=docker\.io repo=\S+ ", log))
    logged_private = len(re.findall(r" registry=docker\.io repo=private/secret ", log))
    assert logged_private > 0
    assert {"image": "docker.io/(private)", "pulls": 2} in status["stats"]["top_images"]
    assert status["stats"]["private_repositories"] == {"docker.io": 1}
    assert status["stats"]["registries"]["docker.io"]["requests"] == logged
    assert "(private)" in page and "1 repositories" in page
    hub_series = re.findall(r'^regcache_requests_total\{[^}]*registry="docker\.io"[^}]*\} (\S+)$', metrics, re.M)
    prom = sum(float(v) for v in hub_series)
    assert prom == logged, metrics

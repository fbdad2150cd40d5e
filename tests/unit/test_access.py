"""The access rule as a service: membership, publicness, per-client grants — against a fake
upstream that counts what it is asked."""

from __future__ import annotations

import json

import pytest

from regcachelib import access as access_mod
from regcachelib.access import Access, Question
from regcachelib.store import Store
from regcachelib.upstream import Target, UpstreamUnavailable

HELD = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
TARGET = Target("quay.io")


class FakeResponse:
    def __init__(self, status: int, headers=()):
        self.status = status
        self.headers = list(headers)

    def header(self, name):
        return next((v for k, v in self.headers if k.lower() == name), None)

    def close(self):
        pass


class FakeUpstream:
    """answers[(repo, digest, authorized)] -> status; down=True raises UpstreamUnavailable."""

    def __init__(self, answers=None, down=False):
        self.answers = answers or {}
        self.down = down
        self.calls: list[tuple[str, str, bool]] = []

    def request(self, method, target, path, headers, follow_redirects=True):
        if self.down:
            raise UpstreamUnavailable("down")
        repo, _, digest = path[len("/v2/"):].rpartition("/")[0], None, path.rsplit("/", 1)[1]
        repo = repo.rsplit("/", 1)[0]
        authorized = any(k.lower() == "authorization" for k, _ in headers)
        self.calls.append((repo, digest, authorized))
        return FakeResponse(self.answers.get((repo, digest, authorized), 404))


def question(repo="org/img", digest=HELD, auth=None) -> Question:
    headers = (("Authorization", auth),) if auth else ()
    return Question(TARGET, "quay.io", repo, digest, f"/v2/{repo}/blobs/{digest}", headers)


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "cache"))
    yield s
    s.close()


def test_a_known_public_member_is_decided_without_upstream(store):
    up = FakeUpstream()
    acc = Access(up, store)
    store.add_members("quay.io", "org/img", [HELD])
    acc.remember_public("quay.io", "org/img", True)
    assert acc.decide_cached(question(), offline=False).allow
    assert up.calls == []


def test_unknown_membership_is_asked_upstream_as_this_client(store):
    up = FakeUpstream({("org/img", OTHER, False): 200})
    acc = Access(up, store)
    assert acc.decide_cached(question(digest=OTHER), offline=False) is None
    assert acc.decide(question(digest=OTHER), offline=False).allow
    assert store.holds("quay.io", "org/img", OTHER)  # a 200 teaches membership
    # under a repository that does not hold it, upstream's 404 is the answer
    verdict = acc.decide(question(repo="org/public", digest=OTHER), offline=False)
    assert (verdict.allow, verdict.status) == (False, 404)
    assert not store.holds("quay.io", "org/public", OTHER)


def test_unknown_membership_offline_or_upstream_down_is_a_404(store):
    acc = Access(FakeUpstream(down=True), store, trust_clients_offline=True)
    acc.remember_public("quay.io", "org/img", True)
    for offline in (True, False):
        verdict = acc.decide(question(digest=OTHER), offline=offline)
        assert (verdict.allow, verdict.status) == (False, 404)


def test_a_404_never_makes_a_repository_private(store):
    store.add_members("quay.io", "org/img", [HELD])
    up = FakeUpstream({("org/img", HELD, False): 404})
    acc = Access(up, store)
    assert acc.probe_public(TARGET, "quay.io", "org/img", f"/v2/org/img/blobs/{HELD}") is None
    assert acc.known_public("quay.io", "org/img") == (None, 0.0)
    acc.remember_public("quay.io", "org/img", True)
    assert acc.probe_public(TARGET, "quay.io", "org/img", f"/v2/org/img/blobs/{HELD}") is None
    assert acc.known_public("quay.io", "org/img")[0] is True


def test_a_stale_public_verdict_stands_while_upstream_is_down(store, monkeypatch):
    store.add_members("quay.io", "org/img", [HELD])
    acc = Access(FakeUpstream(down=True), store, public_ttl=0.0)
    acc.remember_public("quay.io", "org/img", True)
    assert acc.decide(question(), offline=False).allow


def test_private_repository_needs_the_clients_own_yes_and_remembers_it(store):
    store.add_members("quay.io", "org/img", [HELD])
    up = FakeUpstream({("org/img", HELD, False): 401, ("org/img", HELD, True): 200})
    acc = Access(up, store)
    anon = acc.decide(question(), offline=False)
    assert (anon.allow, anon.status) == (False, 401)
    assert acc.known_public("quay.io", "org/img")[0] is False
    assert acc.decide(question(auth="Bearer good"), offline=False).allow
    calls = len(up.calls)
    assert acc.decide_cached(question(auth="Bearer good"), offline=False).allow  # remembered
    assert len(up.calls) == calls
    assert acc.decide_cached(question(auth="Bearer other"), offline=False) is None


def test_remembered_grants_are_bounded(store, monkeypatch):
    monkeypatch.setattr(access_mod, "MAX_GRANTS", 100)
    acc = Access(FakeUpstream(), store)
    for n in range(1000):
        acc._grant(f"Bearer {n}", "quay.io", "org/img")
    assert len(acc._granted) == 100
    assert acc._granted_now("Bearer 999", "quay.io", "org/img")
    assert not acc._granted_now("Bearer 0", "quay.io", "org/img")


def test_membership_is_learnt_from_manifests_and_tags(store):
    layer, config, child = ("sha256:" + c * 64 for c in "cde")
    manifest = json.dumps({"config": {"digest": config}, "layers": [{"digest": layer}, {"digest": "sha256:../x"}]}).encode()
    digest = "sha256:" + "f" * 64
    store.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json", manifest)
    store.set_tag("quay.io", "org/img", "1", "application/vnd.oci.image.manifest.v1+json", digest)
    for d in (digest, layer, config):
        assert store.holds("quay.io", "org/img", d)
    assert not store.holds("quay.io", "org/other", layer)
    assert not store.holds("ghcr.io", "org/img", layer)
    assert [m for m in store.iter_members() if "../" in m[2]] == []
    index = json.dumps({"manifests": [{"digest": child}]}).encode()
    store.learn_manifest("quay.io", "org/multi", digest, index)
    assert store.holds("quay.io", "org/multi", child)


def test_cache_dirs_from_before_the_index_get_it_from_their_tags(tmp_path):
    layer = "sha256:" + "c" * 64
    manifest = json.dumps({"layers": [{"digest": layer}]}).encode()
    digest = "sha256:" + "f" * 64
    s = Store(str(tmp_path / "cache"))
    s.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json", manifest)
    s.tags.set(("tag", "quay.io", "org/img", "1"), {"application/vnd.oci.image.manifest.v1+json": (digest, 0.0)})
    s.tags.delete(("schema", "membership"))
    s.close()
    s = Store(str(tmp_path / "cache"))
    try:
        assert s.holds("quay.io", "org/img", layer)
    finally:
        s.close()


def test_cache_dir_is_owner_only_whatever_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        s = Store(str(tmp_path / "cache"))
        s.log_miss({"x": 1})
        s.close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "cache" / "misses.jsonl").st_mode & 0o777 == 0o600

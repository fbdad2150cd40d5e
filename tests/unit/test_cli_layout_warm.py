"""layout.py (export/import as an OCI image layout) and warm.py (pre-pulling with anonymous
token auth and CDN redirects) against synthetic images and a local token-auth registry."""

from __future__ import annotations

import builtins
import json
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from regcachelib import inventory, layout, oci
from regcachelib.stats import Stats
from regcachelib.store import Store
from regcachelib.upstream import Upstream
from regcachelib.warm import Warmer, images_from_misses

from .helpers import random_bytes, sha256
from .test_cli_inventory import put_image, put_index, run_cli

# --- export / import --------------------------------------------------------------------------


def test_export_then_import_keeps_digests_tags_and_membership(tmp_path, capsys):
    src = Store(str(tmp_path / "src"))
    small, small_blobs = put_image(src, "docker.io", "library/small", "1", [random_bytes(90_000, 1), random_bytes(5_000, 2)])
    arm, arm_blobs = put_image(src, "quay.io", "org/multi", None, [random_bytes(70_000, 3)])
    idx = put_index(src, "quay.io", "org/multi", "1", [(arm, 500, "linux/arm64"), ("sha256:" + "e" * 64, 500, "linux/amd64")])
    src.tags.set(("public", "docker.io", "library/small"), (True, 1.0))
    checked = src.tag_entries("docker.io", "library/small", "1")[0].checked_at
    src.close()
    bundle = tmp_path / "bundle"
    code, out, err = run_cli(capsys, "--dir", str(tmp_path / "src"), "export", "docker.io/library/small:1", "quay.io/org/multi:1", "-o", str(bundle))
    assert code == 0, err
    assert f"oci:{bundle}:docker.io/library/small:1" in out
    assert "platform manifests are not cached" in err  # the amd64 child was never pulled
    index = json.loads((bundle / "index.json").read_text())
    names = {m["annotations"][layout.REF_NAME]: m for m in index["manifests"]}
    assert names["docker.io/library/small:1"]["digest"] == small
    assert names["docker.io/library/small:1"]["annotations"][layout.PUBLIC] == "true"
    assert names["quay.io/org/multi:1"]["digest"] == idx and names["quay.io/org/multi:1"]["mediaType"] == oci.OCI_INDEX
    assert json.loads((bundle / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    for d in [small, idx, arm, *small_blobs, *arm_blobs]:
        assert sha256((bundle / "blobs" / "sha256" / d.split(":")[1]).read_bytes()) == d
    # exporting again adds nothing new and keeps one entry per name
    assert run_cli(capsys, "--dir", str(tmp_path / "src"), "export", "docker.io/library/small:1", "-o", str(bundle))[0] == 0
    assert len(json.loads((bundle / "index.json").read_text())["manifests"]) == 2

    code, out, err = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 0, out + err
    dst = Store(str(tmp_path / "dst"))
    assert dst.get_manifest(small).body and dst.get_manifest(idx).media_type == oci.OCI_INDEX and dst.get_manifest(arm)
    assert all(dst.has_blob(b) for b in small_blobs + arm_blobs)
    entry = dst.tag_entries("docker.io", "library/small", "1")[0]
    assert (entry.digest, entry.checked_at) == (small, checked)
    # the bundle's word that small is public is not taken (only --public says so), and said so
    assert dst.tags.get(("public", "docker.io", "library/small")) is None
    assert "docker.io/library/small public; not taken on its word" in err
    assert dst.tags.get(("public", "quay.io", "org/multi")) is None
    # each repository is known to hold what was imported under it: servable by the proxy
    members = set(dst.iter_members())
    assert {("docker.io", "library/small", d) for d in [small, *small_blobs]} <= members
    # the index, its exported child, that child's blobs, and the amd64 child the index names (not exported)
    assert {("quay.io", "org/multi", d) for d in [idx, arm, *arm_blobs, "sha256:" + "e" * 64]} <= members
    assert not any(r == "org/multi" and d in small_blobs for _reg, r, d in members)
    assert inventory.verify(dst).bad == []
    dst.close()
    # the new membership keys do not show up as images or tags
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "ls", "--json")
    listed = sorted(f"{r['registry']}/{r['repo']}:{r['tag']}" for r in json.loads(out))
    assert listed == ["docker.io/library/small:1", "quay.io/org/multi:1"]
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "stats", "--json")
    assert json.loads(out)["store"]["tags"] == 2


def test_import_refuses_a_tampered_blob_and_keeps_nothing_of_that_image(tmp_path, capsys):
    src = Store(str(tmp_path / "src"))
    digest, blobs = put_image(src, "quay.io", "org/a", "1", [random_bytes(80_000, 4)])
    src.close()
    bundle = tmp_path / "b"
    assert run_cli(capsys, "--dir", str(tmp_path / "src"), "export", "quay.io/org/a:1", "-o", str(bundle))[0] == 0
    victim = bundle / "blobs" / "sha256" / blobs[1].split(":")[1]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 1 and "skipped quay.io/org/a:1" in out and "hashes to" in out
    dst = Store(str(tmp_path / "dst"))
    assert not dst.has_blob(blobs[1]) and dst.get_manifest(digest) is None
    assert dst.tag_entries("quay.io", "org/a", "1") == []
    assert os.listdir(dst.staging_dir) == []
    dst.close()


def test_export_refuses_an_incomplete_image_and_an_unknown_one(tmp_path, capsys):
    s = Store(str(tmp_path / "c"))
    digest, blobs = put_image(s, "quay.io", "org/a", "1", [random_bytes(80_000, 5)])
    s.content.delete(("blob", blobs[1]))
    s.close()
    code, _, err = run_cli(capsys, "--dir", str(tmp_path / "c"), "export", "quay.io/org/a:1", "-o", str(tmp_path / "b"))
    assert code == 2 and "incomplete" in err
    code, _, err = run_cli(capsys, "--dir", str(tmp_path / "c"), "export", "quay.io/org/none:1", "-o", str(tmp_path / "b"))
    assert code == 2 and "not in the cache" in err


def test_import_of_a_foreign_layout_with_bare_tags_needs_a_name(tmp_path, capsys):
    s = Store(str(tmp_path / "c"))
    digest, _ = put_image(s, "quay.io", "org/a", "1", [random_bytes(1000, 6)])
    s.close()
    bundle = tmp_path / "b"
    assert run_cli(capsys, "--dir", str(tmp_path / "c"), "export", "quay.io/org/a:1", "-o", str(bundle))[0] == 0
    index = json.loads((bundle / "index.json").read_text())
    index["manifests"][0]["annotations"] = {layout.REF_NAME: "v1"}  # what other tools write
    (bundle / "index.json").write_text(json.dumps(index))
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "d"), "import", str(bundle))
    assert code == 1 and "give --name" in out
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "d"), "import", str(bundle), "--name", "ghcr.io/me/a", "--public")
    assert code == 0 and "ghcr.io/me/a:v1" in out
    assert "recorded as public (--public, until upstream says otherwise): ghcr.io/me/a" in out
    d = Store(str(tmp_path / "d"))
    assert d.tag_entries("ghcr.io", "me/a", "v1")[0].digest == digest
    assert d.tag_entries("ghcr.io", "me/a", "v1")[0].checked_at == 0.0  # the bundle does not say: unknown
    # recorded undated: an online cache asks upstream at once, and its answer replaces this
    assert d.tags.get(("public", "ghcr.io", "me/a")) == (True, 0.0)
    assert d.holds("ghcr.io", "me/a", digest)
    d.close()


# --- import of hostile bundles ------------------------------------------------------------------------


def exported_bundle(tmp_path, capsys, image="docker.io/private/secret:1", public=None) -> tuple:
    """A bundle of one image exported by regcache; returns (bundle, manifest digest, blob digests)."""
    ref = inventory.parse_image(image)
    src = Store(str(tmp_path / "src"))
    digest, blobs = put_image(src, ref.registry, ref.repo, ref.tag, [random_bytes(20_000, 30)])
    if public is not None:
        src.tags.set(("public", ref.registry, ref.repo), (public, 1.0))
    src.close()
    bundle = tmp_path / "bundle"
    assert run_cli(capsys, "--dir", str(tmp_path / "src"), "export", image, "-o", str(bundle))[0] == 0
    return bundle, digest, blobs


def edit_index(bundle, change) -> None:
    index = json.loads((bundle / "index.json").read_text())
    change(index["manifests"])
    (bundle / "index.json").write_text(json.dumps(index))


def add_manifest(bundle, doc: dict) -> str:
    body = json.dumps(doc).encode()
    digest = sha256(body)
    (bundle / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(body)
    return digest


def test_import_refuses_a_traversal_digest_in_the_index_and_in_a_manifest(tmp_path, capsys, monkeypatch):
    bundle, digest, blobs = exported_bundle(tmp_path, capsys)
    (tmp_path / "hostname").write_bytes(b"secret host\n")  # where the traversal would lead
    evil_layer = add_manifest(bundle, {
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0], "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:../../../hostname",
                    "size": 12}]})
    edit_index(bundle, lambda ms: ms.extend([
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:../../../hostname", "size": 12,
         "annotations": {layout.REF_NAME: "docker.io/evil/top:1"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": evil_layer, "size": 1,
         "annotations": {layout.REF_NAME: "docker.io/evil/layer:1"}},
    ]))
    opened = []

    def recording(real):
        return lambda path, *a, **kw: opened.append(os.path.realpath(path)) or real(path, *a, **kw)

    monkeypatch.setattr(os, "open", recording(os.open))
    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    code, out, err = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 1, out + err
    assert "skipped docker.io/evil/top:1: 'sha256:../../../hostname': not a valid digest" in out
    assert "skipped docker.io/evil/layer:1: 'sha256:../../../hostname': not a valid digest" in out
    assert "docker.io/private/secret:1" in out.split("skipped")[0]  # the sound image of the bundle is imported
    assert str(tmp_path / "hostname") not in opened
    dst = Store(str(tmp_path / "dst"))
    assert dst.tag_entries("docker.io", "evil/top", "1") == [] and dst.tag_entries("docker.io", "evil/layer", "1") == []
    assert dst.get_manifest(evil_layer) is None
    assert not any(r.startswith("evil/") for _reg, r, _d in dst.iter_members())
    dst.close()
    with pytest.raises(layout.LayoutError, match="not a valid digest"):
        layout.blob_path(str(bundle), "sha256:../../etc/hostname")


def test_import_refuses_a_blob_that_links_out_of_the_bundle(tmp_path, capsys):
    bundle, digest, blobs = exported_bundle(tmp_path, capsys)
    layer_file = bundle / "blobs" / "sha256" / blobs[1].split(":")[1]
    outside = tmp_path / "outside-layer"
    outside.write_bytes(layer_file.read_bytes())  # a local file whose digest the bundle's author knows
    layer_file.unlink()
    layer_file.symlink_to(outside)
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 1 and "points outside the bundle" in out
    dst = Store(str(tmp_path / "dst"))
    assert not dst.has_blob(blobs[1]) and dst.tag_entries("docker.io", "private/secret", "1") == []
    dst.close()


def test_import_refuses_a_manifest_served_as_something_else(tmp_path, capsys):
    bundle, digest, _blobs = exported_bundle(tmp_path, capsys)
    edit_index(bundle, lambda ms: ms[0].update(mediaType="text/html"))
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 1 and "'text/html' is not a manifest media type" in out
    edit_index(bundle, lambda ms: ms[0].update(mediaType={"not": "a string"}))
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 1 and "is not a manifest media type" in out
    dst = Store(str(tmp_path / "dst"))
    assert dst.get_manifest(digest) is None
    dst.close()


@pytest.mark.parametrize("annotation", ["1e18", "inf", "nan", "-5", "soon", None])
def test_import_never_dates_a_tag_after_now(tmp_path, capsys, annotation):
    bundle, digest, _blobs = exported_bundle(tmp_path, capsys)

    def stamp(ms):
        ms[0]["annotations"].pop(layout.CHECKED_AT, None)
        if annotation is not None:
            ms[0]["annotations"][layout.CHECKED_AT] = annotation

    edit_index(bundle, stamp)
    before = time.time()
    assert run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))[0] == 0
    dst = Store(str(tmp_path / "dst"))
    entry = dst.tag_entries("docker.io", "private/secret", "1")[0]
    dst.close()
    assert entry.digest == digest
    if annotation == "1e18":
        assert before <= entry.checked_at <= time.time()  # clamped to the moment of the import
    else:
        assert entry.checked_at == 0.0  # unknown: as old as can be, revalidated at the first online pull


def test_import_keeps_a_tag_the_cache_confirmed_more_recently(tmp_path, capsys):
    bundle, digest, _blobs = exported_bundle(tmp_path, capsys)
    edit_index(bundle, lambda ms: ms[0]["annotations"].update({layout.CHECKED_AT: "1000"}))
    dst = Store(str(tmp_path / "dst"))
    newer = "sha256:" + "a" * 64
    dst.set_tag("docker.io", "private/secret", "1", oci.OCI_MANIFEST, newer, now=2000.0)
    dst.close()
    assert run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))[0] == 0
    dst = Store(str(tmp_path / "dst"))
    assert [(e.digest, e.checked_at) for e in dst.tag_entries("docker.io", "private/secret", "1")] == [(newer, 2000.0)]
    assert dst.get_manifest(digest) is not None and dst.holds("docker.io", "private/secret", digest)
    dst.close()


def test_a_bundle_never_makes_a_repository_public_by_itself(tmp_path, capsys):
    bundle, _digest, _blobs = exported_bundle(tmp_path, capsys)
    edit_index(bundle, lambda ms: ms[0]["annotations"].update({layout.PUBLIC: "true"}))
    code, out, err = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle))
    assert code == 0 and "the bundle calls docker.io/private/secret public; not taken on its word" in err
    dst = Store(str(tmp_path / "dst"))
    assert dst.tags.get(("public", "docker.io", "private/secret")) is None
    # the operator's --public never overrides what upstream answered
    dst.tags.set(("public", "docker.io", "private/secret"), (False, time.time()))
    dst.close()
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle), "--public")
    assert code == 0 and "recorded as public" not in out
    dst = Store(str(tmp_path / "dst"))
    assert dst.tags.get(("public", "docker.io", "private/secret"))[0] is False
    dst.close()


def test_public_flag_skips_a_repository_the_bundle_calls_private(tmp_path, capsys):
    bundle, _digest, _blobs = exported_bundle(tmp_path, capsys, public=False)
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "dst"), "import", str(bundle), "--public")
    assert code == 0 and "recorded as public" not in out
    dst = Store(str(tmp_path / "dst"))
    assert dst.tags.get(("public", "docker.io", "private/secret"))[0] is False
    dst.close()


# --- warm -------------------------------------------------------------------------------------------


class TokenRegistry:
    """A registry that wants a Bearer token from its realm, and redirects blobs to a 'CDN'."""

    def __init__(self):
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []
        reg = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def send(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                url = urlsplit(self.path)
                auth = self.headers.get("Authorization")
                reg.log.append((self.command, url.path, auth))
                if url.path == "/token":
                    q = parse_qs(url.query)
                    assert q["service"] == ["test-registry"]
                    return self.send(200, json.dumps({"token": "tok-" + q["scope"][0]}).encode(), [("Content-Type", "application/json")])
                if url.path.startswith("/cdn/"):
                    if auth:
                        return self.send(400, b"credentials sent to the CDN")
                    return self.send(200, reg.blobs[url.path[5:]], [("Content-Type", "application/octet-stream")])
                parts = url.path.split("/")
                repo = "/".join(parts[2:-2])
                if auth != f"Bearer tok-repository:{repo}:pull":
                    challenge = f'Bearer realm="http://127.0.0.1:{reg.port}/token",service="test-registry",scope="repository:{repo}:pull"'
                    return self.send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', [("WWW-Authenticate", challenge)])
                if parts[-2] == "manifests":
                    mt, body = reg.manifests.get((repo, parts[-1]), (None, None))
                    if body is None:  # as distribution answers
                        return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"1"}}]}\n',
                                         [("Content-Type", "application/json")])
                    return self.send(200, body, [("Content-Type", mt), ("Docker-Content-Digest", sha256(body))])
                if parts[-2] == "blobs" and parts[-1] in reg.blobs:
                    return self.send(307, b"", [("Location", f"http://localhost:{reg.port}/cdn/{parts[-1]}")])  # another host
                return self.send(404, b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_image(self, repo: str, layers: list[bytes]) -> tuple[str, bytes, list[str]]:
        config = json.dumps({"os": "linux", "n": len(self.blobs)}).encode()
        for b in [config, *layers]:
            self.blobs[sha256(b)] = b
        doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(l), "size": len(l)} for l in layers]}
        body = json.dumps(doc).encode()
        self.manifests[(repo, sha256(body))] = (oci.OCI_MANIFEST, body)
        return sha256(body), body, [sha256(config)] + [sha256(l) for l in layers]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_registry():
    r = TokenRegistry()
    yield r
    r.close()


def _multi(reg: TokenRegistry) -> tuple[str, dict]:
    amd, amd_body, amd_blobs = reg.add_image("org/multi", [random_bytes(200_000, 7)])
    arm, arm_body, arm_blobs = reg.add_image("org/multi", [random_bytes(150_000, 8), random_bytes(1000, 9)])
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": amd, "size": len(amd_body), "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": arm, "size": len(arm_body), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}).encode()
    reg.manifests[("org/multi", "1")] = (oci.OCI_INDEX, index)
    reg.manifests[("org/multi", sha256(index))] = (oci.OCI_INDEX, index)
    return sha256(index), {"amd64": (amd, amd_blobs), "arm64": (arm, arm_blobs)}


def test_warm_fetches_the_chosen_platform_with_anonymous_tokens(tmp_path, token_registry):
    import regcachelib.warm as warm_mod

    index, children = _multi(token_registry)
    store = Store(str(tmp_path / "cache"))
    stats = Stats(store.counters)
    registry = f"127.0.0.1:{token_registry.port}"
    w = Warmer(Upstream(ssl.create_default_context(), timeout=10, backoff=0), store, ["linux/arm64"], stats=stats)
    # the registry is "127.0.0.1:port", which the client would reach with TLS: plain HTTP here
    w.client(registry).target = warm_mod.Target("127.0.0.1", token_registry.port, "http")
    report = w.run([f"{registry}/org/multi:1", f"{registry}/org/absent:1"])
    assert report.images == [f"{registry}/org/multi:1"]
    assert [r for r, _ in report.failed] == [f"{registry}/org/absent:1"]
    # the operator reads the registry's own words (regcache warm prints this line as it is)
    assert report.failed[0][1] == f"{registry}/org/absent:1: manifest: upstream answered 404 (MANIFEST_UNKNOWN: manifest unknown)"
    arm, arm_blobs = children["arm64"]
    amd, amd_blobs = children["amd64"]
    assert store.get_manifest(index) and store.get_manifest(arm) and store.get_manifest(amd) is None
    assert all(store.has_blob(b) for b in arm_blobs) and not any(store.has_blob(b) for b in amd_blobs)
    assert store.tag_entries(registry, "org/multi", "1")[0].digest == index
    assert report.blobs_fetched == 3 and report.bytes_fetched == sum(len(token_registry.blobs[b]) for b in arm_blobs)
    # the token came from the realm, anonymously; the CDN never saw a credential
    assert any(p == "/token" and a is None for _m, p, a in token_registry.log)
    assert all(a is None for _m, p, a in token_registry.log if p.startswith("/cdn/"))
    assert stats.snapshot().upstream_bytes == report.bytes_fetched
    misses = [json.loads(l) for l in open(store.miss_log_path)]
    assert {m["outcome"] for m in misses} == {"WARM"}
    # a second run finds everything cached
    w2 = Warmer(Upstream(ssl.create_default_context(), timeout=10, backoff=0), store, ["linux/arm64"])
    w2.client(registry).target = warm_mod.Target("127.0.0.1", token_registry.port, "http")
    again = w2.run([f"{registry}/org/multi:1"])
    assert again.blobs_fetched == 0 and again.blobs_cached == 3
    # and the miss log names the images to warm elsewhere
    assert images_from_misses(store.miss_log_path) == [f"{registry}/org/multi:1"]
    store.close()


def test_warm_platform_not_in_the_index_fails_clearly(tmp_path, token_registry):
    import regcachelib.warm as warm_mod

    _multi(token_registry)
    store = Store(str(tmp_path / "cache"))
    registry = f"127.0.0.1:{token_registry.port}"
    w = Warmer(Upstream(ssl.create_default_context(), timeout=10, backoff=0), store, ["linux/s390x"])
    w.client(registry).target = warm_mod.Target("127.0.0.1", token_registry.port, "http")
    report = w.run([f"{registry}/org/multi:1"])
    assert "no manifest for linux/s390x" in report.failed[0][1] and "linux/arm64/v8" in report.failed[0][1]
    store.close()


@pytest.mark.parametrize("body, text", [
    (b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"},{"code":"X"}]}',
     " (DENIED: requested access to the resource is denied; X)"),
    (b"<html><body>Bad\r\nGateway\x00</body></html>", " (<html><body>Bad Gateway </body></html>)"),
    (b"\xff\xfeoops", " (\ufffd\ufffdoops)"),
    (b"", ""),
    (b"{}", " ({})"),
])
def test_registry_error_text_is_for_people(body, text):
    from regcachelib.warm import registry_error_text

    assert registry_error_text(body) == text


def test_images_from_misses(tmp_path):
    log = tmp_path / "misses.jsonl"
    lines = [
        {"registry": "docker.io", "repo": "library/a", "reference": "1", "kind": "manifest"},
        {"registry": "docker.io", "repo": "library/a", "reference": "sha256:" + "1" * 64, "kind": "manifest"},
        {"registry": "docker.io", "repo": "library/a", "reference": "sha256:" + "2" * 64, "kind": "blob"},
        {"registry": "quay.io", "repo": "org/b", "reference": "sha256:" + "3" * 64, "kind": "manifest"},
        {"registry": "docker.io", "repo": "library/a", "reference": "1", "kind": "manifest"},
    ]
    log.write_text("\n".join(json.dumps(l) for l in lines) + "\nnot json\n")
    assert images_from_misses(str(log)) == ["docker.io/library/a:1", "quay.io/org/b@sha256:" + "3" * 64]


def test_cli_warm_without_images_explains(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--dir", str(tmp_path / "c"), "warm")
    assert code == 2 and "nothing to warm" in err

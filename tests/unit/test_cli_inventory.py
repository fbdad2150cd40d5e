"""inventory.py (image references, manifest references, gc, verify, pins) and the CLI commands
on top of it (ls, gc, pin, verify), on synthetic images in a real store."""

from __future__ import annotations

import json
import os
import time

import pytest

from regcachelib import cli, inventory, oci
from regcachelib.inventory import ImageRef, parse_image
from regcachelib.stats import Stats
from regcachelib.store import Store

from .helpers import random_bytes, sha256, stage_and_commit

# --- building images into a store ------------------------------------------------------------


def put_image(store: Store, registry: str, repo: str, tag: str | None, layers: list[bytes], media_type: str = oci.OCI_MANIFEST) -> tuple[str, list[str]]:
    """Store config + layers + a manifest (+ tag); returns (manifest digest, blob digests)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": [sha256(l) for l in layers]}}).encode()
    blobs = [stage_and_commit(store, config)] + [stage_and_commit(store, l) for l in layers]
    layer_type = "application/vnd.oci.image.layer.v1.tar+gzip" if media_type == oci.OCI_MANIFEST else "application/vnd.docker.image.rootfs.diff.tar.gzip"
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0], "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": d, "size": len(l)} for d, l in zip(blobs[1:], layers)],
    }
    body = json.dumps(manifest, indent=2).encode()
    digest = sha256(body)
    store.put_manifest(digest, media_type, body)
    if tag:
        store.set_tag(registry, repo, tag, media_type, digest)
    return digest, blobs


def put_index(store: Store, registry: str, repo: str, tag: str, children: list[tuple[str, int, str]], media_type: str = oci.OCI_INDEX) -> str:
    """An index over (digest, size, platform 'os/arch') children (stored or not)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {"mediaType": oci.OCI_MANIFEST, "digest": d, "size": n, "platform": dict(zip(("os", "architecture", "variant"), p.split("/")))}
            for d, n, p in children
        ],
    }
    body = json.dumps(doc).encode()
    digest = sha256(body)
    store.put_manifest(digest, media_type, body)
    store.set_tag(registry, repo, tag, media_type, digest)
    return digest


def touch(store: Store, digest: str) -> None:
    """A use, as the proxy makes one (get updates diskcache's access time)."""
    store.get_manifest(digest)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("alpine", ImageRef("docker.io", "library/alpine", "latest", None)),
        ("alpine:3.19", ImageRef("docker.io", "library/alpine", "3.19", None)),
        ("docker.io/library/small:1", ImageRef("docker.io", "library/small", "1", None)),
        ("registry-1.docker.io/library/small:1", ImageRef("docker.io", "library/small", "1", None)),
        ("index.docker.io/user/app", ImageRef("docker.io", "user/app", "latest", None)),
        ("user/app:2", ImageRef("docker.io", "user/app", "2", None)),
        ("quay.io/org/img:1", ImageRef("quay.io", "org/img", "1", None)),
        ("localhost:5000/x/y", ImageRef("localhost:5000", "x/y", "latest", None)),
        ("localhost/x", ImageRef("localhost", "x", "latest", None)),
        ("docker://ghcr.io/o/x:v1", ImageRef("ghcr.io", "o/x", "v1", None)),
        ("gcr.io/p/i@sha256:" + "a" * 64, ImageRef("gcr.io", "p/i", None, "sha256:" + "a" * 64)),
        ("gcr.io/p/i:t@sha256:" + "a" * 64, ImageRef("gcr.io", "p/i", "t", "sha256:" + "a" * 64)),
    ],
)
def test_parse_image(text, expected):
    assert parse_image(text) == expected


@pytest.mark.parametrize("text", ["", "UPPER/case", "a/../b", "x@sha256:short", "quay.io/org/img:bad tag", "x:" + "t" * 200])
def test_parse_image_rejects(text):
    with pytest.raises(ValueError):
        parse_image(text)


def test_manifest_refs_of_every_kind():
    index = json.dumps({"manifests": [{"digest": "sha256:" + "1" * 64, "mediaType": oci.OCI_MANIFEST, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}).encode()
    r = inventory.manifest_refs(index)
    assert r.manifests == [("sha256:" + "1" * 64, oci.OCI_MANIFEST, {"os": "linux", "architecture": "arm64", "variant": "v8"})] and r.blobs == []
    image = json.dumps({"config": {"digest": "sha256:" + "2" * 64}, "layers": [{"digest": "sha256:" + "3" * 64}, {"digest": "sha256:" + "3" * 64}]}).encode()
    assert inventory.manifest_refs(image).blobs == ["sha256:" + "2" * 64, "sha256:" + "3" * 64]
    schema1 = json.dumps({"schemaVersion": 1, "fsLayers": [{"blobSum": "sha256:" + "4" * 64}]}).encode()
    assert inventory.manifest_refs(schema1).blobs == ["sha256:" + "4" * 64]
    assert inventory.manifest_refs(b"not json").blobs == []
    assert inventory.platform_matches({"os": "linux", "architecture": "arm64", "variant": "v8"}, "linux/arm64")
    assert not inventory.platform_matches({"os": "linux", "architecture": "arm64", "variant": "v8"}, "linux/arm64/v7")
    assert inventory.platform_matches(None, "all") and not inventory.platform_matches(None, "linux/amd64")


def test_inventory_reads_without_touching_access_times(store):
    digest, blobs = put_image(store, "quay.io", "org/a", "1", [random_bytes(70_000, 1)])
    rows = lambda: sorted(store.content._sql("SELECT access_time FROM Cache").fetchall())  # noqa: E731
    before = rows()
    time.sleep(0.01)
    inv = inventory.Inventory(store)
    manifests, found, missing = inv.closure(digest)
    assert manifests == {digest} and found == set(blobs) and not missing
    assert inv.manifest(digest)[0] == oci.OCI_MANIFEST
    inventory.verify(store)
    assert rows() == before


# --- gc -----------------------------------------------------------------------------------------------


def test_gc_evicts_least_recently_used_image_and_keeps_shared_blobs(store):
    base = random_bytes(100_000, 1)
    old, old_blobs = put_image(store, "docker.io", "library/old", "1", [base, random_bytes(100_000, 2)])
    new, new_blobs = put_image(store, "docker.io", "library/new", "1", [base, random_bytes(100_000, 3)])
    time.sleep(0.02)
    touch(store, new)  # "new" was pulled recently, "old" not
    before = inventory.store_volume(store)
    result = inventory.gc(store, before - 50_000)
    assert result.removed_manifests == [old]
    # old's own layer and config went; the shared base layer stays (new references it)
    assert set(result.removed_blobs) == set(old_blobs) - {new_blobs[1]}
    assert store.has_blob(new_blobs[1]) and all(store.has_blob(b) for b in new_blobs)
    assert not store.has_blob(old_blobs[2])
    assert store.get_manifest(new) is not None and store.get_manifest(old) is None
    assert result.removed_images == ["docker.io/library/old:1"]
    assert store.tag_entries("docker.io", "library/old", "1") == []
    assert store.tag_entries("docker.io", "library/new", "1")


def test_gc_never_removes_a_pinned_image_or_what_a_retained_manifest_references(store):
    a, a_blobs = put_image(store, "quay.io", "org/a", "1", [random_bytes(80_000, 4)])
    b, b_blobs = put_image(store, "quay.io", "org/b", "1", [random_bytes(80_000, 5)])
    arm, arm_blobs = put_image(store, "quay.io", "org/multi", None, [random_bytes(80_000, 6)])
    idx = put_index(store, "quay.io", "org/multi", "1", [(arm, 100, "linux/arm64"), ("sha256:" + "9" * 64, 100, "linux/amd64")])
    orphan = stage_and_commit(store, random_bytes(80_000, 7))
    inventory.pin(store, parse_image("quay.io/org/a:1"))
    stats = Stats(store.counters)
    result = inventory.gc(store, 0, stats=stats)  # evict everything evictable
    assert store.get_manifest(a) is not None and all(store.has_blob(d) for d in a_blobs)
    for gone in (b, arm, idx):
        assert store.get_manifest(gone) is None
    assert not any(store.has_blob(d) for d in b_blobs + arm_blobs + [orphan])
    assert result.protected == 1
    assert result.after > 0
    snap = stats.snapshot()
    assert snap.evictions == len(result.removed_manifests) + len(result.removed_blobs) and snap.evicted_bytes == result.removed_bytes
    # after unpinning it can go too
    assert inventory.unpin(store, parse_image("quay.io/org/a:1"))
    inventory.gc(store, 0)
    assert store.get_manifest(a) is None


def test_gc_within_the_limit_and_dry_run_change_nothing(store):
    a, blobs = put_image(store, "quay.io", "org/a", "1", [random_bytes(80_000, 8)])
    assert inventory.gc(store, 10**12).removed_manifests == []
    dry = inventory.gc(store, 0, dry_run=True)
    assert dry.removed_manifests == [a] and dry.dry_run
    assert store.get_manifest(a) is not None and all(store.has_blob(b) for b in blobs)


def test_gc_keeps_a_child_manifest_an_index_still_references(store):
    child, child_blobs = put_image(store, "quay.io", "org/m", None, [random_bytes(80_000, 9)])
    put_index(store, "quay.io", "org/m", "1", [(child, 100, "linux/amd64")])
    # the child is older than an orphan blob, but only reachable through the retained index
    time.sleep(0.02)
    orphan = stage_and_commit(store, random_bytes(200_000, 10))
    touch(store, child)
    result = inventory.gc(store, inventory.store_volume(store) - 100_000)
    assert result.removed_blobs == [orphan] and result.removed_manifests == []
    assert store.get_manifest(child) is not None and all(store.has_blob(b) for b in child_blobs)


def test_gc_forgets_the_membership_of_what_it_removed_and_only_that(store):
    base = random_bytes(100_000, 14)
    old, old_blobs = put_image(store, "docker.io", "library/old", "1", [base, random_bytes(100_000, 15)])
    new, new_blobs = put_image(store, "docker.io", "library/new", "1", [base, random_bytes(100_000, 16)])
    for repo, digest in (("library/old", old), ("library/new", new)):
        store.learn_manifest("docker.io", repo, digest, store.get_manifest(digest).body)
    time.sleep(0.02)
    touch(store, new)
    dry = inventory.gc(store, inventory.store_volume(store) - 50_000, dry_run=True)
    assert dry.removed_manifests == [old] and store.holds("docker.io", "library/old", old)  # a dry run forgets nothing
    result = inventory.gc(store, inventory.store_volume(store) - 50_000)
    assert result.removed_manifests == [old]
    # what left the store is no longer held anywhere; the shared base layer (still stored) still is
    assert not store.holds("docker.io", "library/old", old)
    assert not any(store.holds("docker.io", "library/old", b) for b in result.removed_blobs)
    assert store.holds("docker.io", "library/old", new_blobs[1])
    assert all(store.holds("docker.io", "library/new", d) for d in [new, *new_blobs])


# --- verify -----------------------------------------------------------------------------------------------


def test_verify_quarantines_a_flipped_byte_and_a_bad_manifest(store):
    digest, blobs = put_image(store, "quay.io", "org/a", "1", [random_bytes(90_000, 11)])
    inv = inventory.Inventory(store)
    path = inv.blob_path(blobs[1])
    with open(path, "r+b") as f:
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0xFF]))
    bogus = "sha256:" + "7" * 64
    store.put_manifest(bogus, oci.OCI_MANIFEST, b'{"not":"matching"}')
    stats = Stats(store.counters)
    result = inventory.verify(store, stats=stats)
    assert {(k, d) for k, d, _r in result.bad} == {("blob", blobs[1]), ("manifest", bogus)}
    assert not store.has_blob(blobs[1]) and store.get_manifest(bogus) is None
    assert store.has_blob(blobs[0]) and store.get_manifest(digest) is not None
    qdir = inventory.quarantine_dir(store)
    names = os.listdir(qdir)
    assert any(n.startswith(blobs[1].replace(":", "-") + ".blob") and not n.endswith(".json") for n in names)
    assert any(n.endswith(".json") and json.load(open(os.path.join(qdir, n)))["digest"] == bogus for n in names)
    assert stats.snapshot().verify_failures == 2
    again = inventory.verify(store)
    assert again.bad == [] and again.checked_blobs == 1


def test_verify_forgets_the_membership_of_what_it_quarantined(store):
    digest, blobs = put_image(store, "quay.io", "org/a", "1", [random_bytes(90_000, 17)])
    store.learn_manifest("quay.io", "org/a", digest, store.get_manifest(digest).body)
    store.add_members("quay.io", "org/b", [blobs[1]])  # the same layer, learnt under another repository
    with open(inventory.Inventory(store).blob_path(blobs[1]), "r+b") as f:
        f.write(b"X")
    report_only = inventory.verify(store, quarantine=False)
    assert [d for _k, d, _r in report_only.bad] == [blobs[1]] and store.holds("quay.io", "org/a", blobs[1])
    inventory.verify(store)
    assert not store.holds("quay.io", "org/a", blobs[1]) and not store.holds("quay.io", "org/b", blobs[1])
    assert store.holds("quay.io", "org/a", digest) and store.holds("quay.io", "org/a", blobs[0])


# --- the CLI on top -------------------------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    s = Store(str(d))
    put_image(s, "docker.io", "library/small", "1", [random_bytes(70_000, 12)])
    put_image(s, "quay.io", "org/s2", "1", [random_bytes(70_000, 13)], media_type=oci.DOCKER_MANIFEST)
    s.close()
    return str(d)


def test_cli_ls_levels(cache_dir, capsys):
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "ls")
    assert code == 0 and "docker.io" in out and "quay.io" in out and "registry" in out
    code, out, _ = run_cli(capsys, "ls", "quay.io", "--dir", cache_dir)
    assert "quay.io/org/s2" in out
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "ls", "docker.io/small")
    assert "docker.io/library/small:1" in out and "complete" in out and "oci" in out
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "ls", "--json")
    records = json.loads(out)
    assert {(r["registry"], r["repo"], r["tag"]) for r in records} == {("docker.io", "library/small", "1"), ("quay.io", "org/s2", "1")}
    assert all(r["size"] > 70_000 and r["state"] == "complete" for r in records)


def test_cli_pin_gc_unpin(cache_dir, capsys):
    assert run_cli(capsys, "--dir", cache_dir, "pin", "quay.io/org/s2:1")[0] == 0
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "pin")
    assert "quay.io/org/s2:1  -> sha256:" in out
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "gc", "--max-size", "1", "--dry-run")
    assert code == 0 and "would remove" in out and "docker.io/library/small:1" in out
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "gc", "--max-size", "1")
    assert "removed" in out and "kept 1 pinned" in out
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "ls", "-a")
    assert "quay.io/org/s2:1" in out and "pinned" in out and "library/small" not in out
    assert run_cli(capsys, "--dir", cache_dir, "unpin", "quay.io/org/s2:1")[0] == 0
    assert run_cli(capsys, "--dir", cache_dir, "unpin", "quay.io/org/s2:1")[0] == 1


def test_cli_verify_exit_status(cache_dir, capsys):
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "verify")
    assert code == 0 and "all match" in out
    s = Store(cache_dir)
    inv = inventory.Inventory(s)
    victim = sorted(d for d, e in inv.blobs.items() if e.size > 60_000)[0]
    with open(inv.blob_path(victim), "r+b") as f:
        f.write(b"X")
    s.close()
    code, out, _ = run_cli(capsys, "--dir", cache_dir, "verify", "--json")
    doc = json.loads(out)
    assert code == 1 and [b["digest"] for b in doc["bad"]] == [victim]


def test_cli_refuses_a_missing_cache_and_keeps_the_proxys_size_limit(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--dir", str(tmp_path / "nope"), "ls")
    assert code == 2 and "no cache at" in err
    s = Store(str(tmp_path / "c"), size_limit=123_456_789)
    s.close()
    code, out, _ = run_cli(capsys, "--dir", str(tmp_path / "c"), "gc")
    assert code == 0 and "empty" in out and "(limit 117.7 MiB)" in out  # the limit the proxy set, not a default
    assert cli._persisted_size_limit(str(tmp_path / "c")) == 123_456_789


def test_progress_bar_renders_on_a_terminal_only():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = cli.Progress("exporting", 1000, stream=out)
    bar.advance(500)
    bar.close()
    text = out.getvalue()
    assert "exporting" in text and "[##############--------------]" in text and " 50.0%" in text and text.endswith("\n")
    quiet = io.StringIO()
    bar = cli.Progress("x", 10, stream=quiet)
    bar.advance(5)
    bar.close()
    assert quiet.getvalue() == ""


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("stats", "ls", "warm", "export", "import", "gc", "pin", "unpin", "verify", "client-config", "ca"):
        assert f"\n    {command}" in out
    assert "examples:" in out

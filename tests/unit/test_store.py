"""store.py: blobs renamed into place, LRU eviction, manifests, tags, staging sweep, miss log."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from regcachelib import oci
from regcachelib.store import Store

from .helpers import random_bytes, sha256, stage_and_commit
from .procs import commit_and_tag


def test_commit_blob_moves_the_staging_file(store):
    data = random_bytes(200_000)
    digest = sha256(data)
    path, f = store.new_staging_file(digest)
    with f:
        f.write(data)
    assert os.path.dirname(path) == store.staging_dir
    staged_inode = os.stat(path).st_ino
    store.commit_blob(digest, path, len(data))
    assert not os.path.exists(path), "the staging file must be renamed away, not copied"
    assert os.listdir(store.staging_dir) == []
    with store.open_blob(digest) as blob:
        assert os.fstat(blob.fileno()).st_ino == staged_inode
        assert os.path.realpath(blob.name).startswith(os.path.realpath(store.directory) + os.sep)
        assert blob.read() == data
    assert store.has_blob(digest)
    assert store.blob_size(digest) == len(data)


def test_small_blob_is_a_file_too(store):
    digest = stage_and_commit(store, b"tiny")
    with store.open_blob(digest) as blob:
        assert blob.read() == b"tiny"
    assert store.blob_size(digest) == 4


def test_unknown_blob(store):
    digest = sha256(b"nothing")
    assert store.open_blob(digest) is None
    assert store.blob_size(digest) is None
    assert not store.has_blob(digest)


def test_staging_files_are_locked_while_open(store):
    path, f = store.new_staging_file(sha256(b"x"))
    with f, open(path, "rb") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _fill_store_to(store: Store, blob_size: int, count: int) -> list[str]:
    return [stage_and_commit(store, random_bytes(blob_size, seed=i)) for i in range(count)]


def test_size_limit_evicts_least_recently_used(tmp_path):
    store = Store(str(tmp_path / "cache"))
    try:
        blob = 200 * 1024
        store.set_size_limit(store.content.volume() + int(3.5 * blob))
        first, second, third = _fill_store_to(store, blob, 3)
        with store.open_blob(first):  # first is now more recently used than second
            pass
        fourth = stage_and_commit(store, random_bytes(blob, seed=99))
        assert store.has_blob(fourth), "the blob just committed must survive"
        assert not store.has_blob(second), "the least recently used blob is evicted"
        assert store.has_blob(first) and store.has_blob(third)
    finally:
        store.close()


def test_reads_never_wait_for_a_writer_and_their_uses_are_written_behind(tmp_path):
    """A hit's reads (manifest, blob, blob size) are SELECTs only: another process holding the
    index's write lock (a gc, a commit) does not hold them up; the uses reach access_time once
    it is free, and the LRU order counts them."""
    import sqlite3
    import threading
    import time

    store = Store(str(tmp_path / "cache"))
    try:
        blob = stage_and_commit(store, random_bytes(100_000, seed=3))
        store.put_manifest(sha256(b"m"), oci.OCI_MANIFEST, b"m")
        writer = sqlite3.connect(os.path.join(store.content.directory, "cache.db"), isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        read_at = time.time()
        answers = []

        def hit():
            f = store.open_blob(blob)
            with f:
                answers.append((f.read(), store.blob_size(blob), store.get_manifest(sha256(b"m")).body))

        reader = threading.Thread(target=hit, daemon=True)
        reader.start()
        reader.join(5)
        try:
            assert not reader.is_alive(), "a read waited for the index's writer"
            assert answers == [(random_bytes(100_000, seed=3), 100_000, b"m")]
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        deadline = time.monotonic() + 5
        while store.content._sql("SELECT COUNT(*) FROM Cache WHERE access_time >= ?", (read_at,)).fetchone()[0] < 2:
            assert time.monotonic() < deadline, "the uses were never written"
            time.sleep(0.05)
    finally:
        store.close()


def test_size_limit_keeps_volume_bounded(tmp_path):
    store = Store(str(tmp_path / "cache"))
    try:
        blob = 100 * 1024
        limit = store.content.volume() + 5 * blob
        store.set_size_limit(limit)
        digests = _fill_store_to(store, blob, 12)
        assert store.content.volume() <= limit
        assert not all(store.has_blob(d) for d in digests)
        # what remains is intact
        for d in digests:
            f = store.open_blob(d)
            if f is not None:
                with f:
                    assert sha256(f.read()) == d
    finally:
        store.close()


def test_manifest_round_trip(store):
    body = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST}).encode()
    digest = sha256(body)
    store.put_manifest(digest, oci.OCI_MANIFEST, body)
    m = store.get_manifest(digest)
    assert (m.digest, m.media_type, m.body) == (digest, oci.OCI_MANIFEST, body)
    assert store.get_manifest(sha256(b"other")) is None


def test_big_manifest_round_trip(store):
    body = random_bytes(300_000)  # above disk_min_file_size: lives in a file
    digest = sha256(body)
    store.put_manifest(digest, oci.DOCKER_MANIFEST, body)
    assert store.get_manifest(digest).body == body


def test_tags_round_trip_per_media_type(store):
    store.set_tag("quay.io", "org/img", "latest", oci.OCI_INDEX, "sha256:" + "1" * 64, now=100.0)
    store.set_tag("quay.io", "org/img", "latest", oci.DOCKER_MANIFEST, "sha256:" + "2" * 64, now=200.0)
    store.set_tag("quay.io", "org/img", "latest", oci.OCI_INDEX, "sha256:" + "3" * 64, now=300.0)  # replaces
    entries = sorted(store.tag_entries("quay.io", "org/img", "latest"), key=lambda e: e.media_type)
    assert [(e.media_type, e.digest, e.checked_at) for e in entries] == [
        (oci.DOCKER_MANIFEST, "sha256:" + "2" * 64, 200.0),
        (oci.OCI_INDEX, "sha256:" + "3" * 64, 300.0),
    ]
    assert store.tag_entries("quay.io", "org/img", "other") == []
    assert store.tag_entries("docker.io", "org/img", "latest") == []
    tags = dict(store.iter_tags())
    assert set(tags) == {("quay.io", "org/img", "latest")}


def test_find_tag_honours_accept(store):
    store.set_tag("quay.io", "org/img", "v1", oci.OCI_INDEX, "sha256:" + "1" * 64, now=100.0)
    store.set_tag("quay.io", "org/img", "v1", oci.DOCKER_MANIFEST, "sha256:" + "2" * 64, now=200.0)
    store.set_tag("quay.io", "org/img", "v1", oci.DOCKER_SCHEMA1_SIGNED, "sha256:" + "3" * 64, now=50.0)
    assert store.find_tag("quay.io", "org/img", "v1", {oci.OCI_INDEX}).digest == "sha256:" + "1" * 64
    assert store.find_tag("quay.io", "org/img", "v1", {oci.OCI_INDEX, oci.DOCKER_MANIFEST}).digest == "sha256:" + "2" * 64
    assert store.find_tag("quay.io", "org/img", "v1", None).digest == "sha256:" + "2" * 64  # most recent
    assert store.find_tag("quay.io", "org/img", "v1", {oci.DOCKER_SCHEMA1}).media_type == oci.DOCKER_SCHEMA1_SIGNED
    assert store.find_tag("quay.io", "org/img", "v1", {oci.OCI_MANIFEST}) is None
    assert store.find_tag("quay.io", "org/img", "v1", {oci.DOCKER_LIST}) is None
    for accepted in ({oci.OCI_MANIFEST}, {oci.DOCKER_LIST, oci.OCI_INDEX}, {oci.DOCKER_MANIFEST}, None):
        entry = store.find_tag("quay.io", "org/img", "v1", accepted)
        assert entry is None or oci.client_accepts(entry.media_type, accepted)


def test_sweep_removes_unlocked_staging_files(store):
    debris = os.path.join(store.staging_dir, "sha256-dead.1234.abcd")
    with open(debris, "wb") as f:
        f.write(b"partial")
    assert store.sweep_staging() == 1
    assert os.listdir(store.staging_dir) == []


def test_sweep_keeps_a_file_locked_in_this_process(store):
    path, f = store.new_staging_file(sha256(b"live"))
    with f:
        f.write(b"in progress")
        assert store.sweep_staging() == 0
        assert os.path.exists(path)
    assert store.sweep_staging() == 1  # the writer is gone (lock released): debris now
    assert not os.path.exists(path)


def test_sweep_keeps_a_file_locked_by_another_process(store):
    path = os.path.join(store.staging_dir, "sha256-live.999.beef")
    with open(path, "wb") as f:
        f.write(b"in progress")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.unit.procs import hold_flock; hold_flock(sys.argv[1])", path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert store.sweep_staging() == 0
        assert os.path.exists(path)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert store.sweep_staging() == 1
    assert not os.path.exists(path)


def test_two_stores_on_one_directory_share_content(tmp_path):
    a = Store(str(tmp_path / "cache"))
    b = Store(str(tmp_path / "cache"))
    try:
        digest = stage_and_commit(a, b"shared blob")
        with b.open_blob(digest) as f:
            assert f.read() == b"shared blob"
        b.put_manifest(sha256(b"m"), oci.OCI_MANIFEST, b"m")
        b.set_tag("quay.io", "org/img", "t", oci.OCI_MANIFEST, sha256(b"m"))
        assert a.get_manifest(sha256(b"m")).body == b"m"
        assert a.find_tag("quay.io", "org/img", "t", None).digest == sha256(b"m")
    finally:
        a.close()
        b.close()


def test_two_processes_on_one_directory(tmp_path):
    directory = str(tmp_path / "cache")
    Store(directory).close()
    payloads = [(directory, f"blob from process {i}".encode() * 1000, f"t{i}", oci.OCI_MANIFEST) for i in range(2)]
    # One pool per payload: a shared pool may hand both to one worker under load.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as first, ctx.Pool(1) as second:
        pending = [pool.apply_async(commit_and_tag, args) for pool, args in zip((first, second), payloads)]
        digests = [p.get(60) for p in pending]
    store = Store(directory)
    try:
        for (_, data, tag, _), digest in zip(payloads, digests):
            assert digest == sha256(data)
            with store.open_blob(digest) as f:
                assert f.read() == data
            assert store.find_tag("quay.io", "org/img", tag, None).digest == digest
        with open(store.miss_log_path) as f:
            lines = [json.loads(line) for line in f]
        assert sorted(r["digest"] for r in lines) == sorted(digests)
        assert len({r["pid"] for r in lines}) == 2
    finally:
        store.close()


def test_log_miss_appends_json_lines(store):
    store.log_miss({"registry": "quay.io", "repo": "org/img", "digest": sha256(b"a"), "kind": "blob", "size": 1})
    store.log_miss({"registry": "docker.io", "repo": "library/alpine", "reference": "latest", "kind": "manifest"})
    with open(store.miss_log_path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [r["registry"] for r in lines] == ["quay.io", "docker.io"]
    assert lines[0]["digest"] == sha256(b"a") and lines[1]["reference"] == "latest"
    assert all(isinstance(r["time"], float) for r in lines)
    assert os.path.dirname(store.miss_log_path) == store.directory


def test_store_reopens_with_content(tmp_path):
    directory = str(tmp_path / "cache")
    s = Store(directory)
    digest = stage_and_commit(s, b"persist me")
    s.set_tag("docker.io", "library/alpine", "latest", oci.OCI_INDEX, digest)
    s.close()
    s = Store(directory)
    try:
        with s.open_blob(digest) as f:
            assert f.read() == b"persist me"
        assert s.find_tag("docker.io", "library/alpine", "latest", {oci.OCI_INDEX}).digest == digest
    finally:
        s.close()


# --- the schema stays inside the store: what others read and write goes through methods ------------


def test_publicness_pins_and_counts_survive_a_reopen(tmp_path):
    s = Store(str(tmp_path / "cache"))
    assert s.get_public("quay.io", "org/a") == (None, 0.0)
    s.set_public("quay.io", "org/a", True)
    s.set_public("quay.io", "org/b", False, checked=5.0)
    s.pin("quay.io", "org/a", "1")
    digest = stage_and_commit(s, b"blob")
    s.put_manifest(sha256(b"{}"), oci.OCI_MANIFEST, b"{}")
    s.set_tag("quay.io", "org/a", "1", oci.OCI_MANIFEST, sha256(b"{}"))
    s.close()
    s = Store(str(tmp_path / "cache"))
    assert s.get_public("quay.io", "org/a")[0] is True
    assert s.get_public("quay.io", "org/b") == (False, 5.0)
    assert list(s.iter_pins()) == [("quay.io", "org/a", "1")]
    assert s.entry_counts() == {"blobs": 1, "manifests": 1, "tags": 1, "pins": 1}
    rows = {(r.kind, r.digest) for r in s.content_rows()}
    assert rows == {("blob", digest), ("manifest", sha256(b"{}"))}
    assert s.unpin("quay.io", "org/a", "1") and list(s.iter_pins()) == []
    s.set_tag_entries("quay.io", "org/a", "1", lambda value: value.clear())
    assert s.tag_entries("quay.io", "org/a", "1") == []
    s.close()

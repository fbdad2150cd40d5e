"""The on-disk store: blobs and manifests by digest, tags by (registry, repo, tag), a miss log.

Layout of the cache directory (the directory is the whole state; copy it to migrate):

    content/   diskcache Cache: ("blob", digest) -> blob file, ("manifest", digest) -> manifest.
               Size-limited, least-recently-used eviction, process-safe (SQLite).
    tags/      diskcache Cache without eviction: ("tag", registry, repo, tag) -> {media type: entry};
               ("member", registry, repo, digest) -> when learnt: the membership index, which
               digests a repository is known to hold (a digest is only ever served under one)
    staging/   partial downloads; a file only leaves here by being verified and renamed into content/
    misses.jsonl  one JSON line per upstream fetch, for warming and replay
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import diskcache

from . import oci

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 50 * 1024**3


class StagedFile:
    """A verified staging file, handed to diskcache to be renamed (not copied) into place."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size

    def read(self, n: int = -1) -> bytes:  # pragma: no cover - diskcache never calls it for us
        raise RuntimeError("StagedFile is moved, not read")


class KeyMemoDisk(diskcache.Disk):
    """diskcache Disk that converts each tuple key to its database form once.

    diskcache pickles a tuple key and runs pickletools.optimize over it on every lookup: about
    half of what a cache hit cost regcache. The database form of a key never changes, so it is
    kept (bounded: keys are client-chosen names), byte for byte what diskcache computes.
    """

    MEMO_MAX = 65536

    def __init__(self, directory, **kwargs):
        super().__init__(directory, **kwargs)
        self._memo: dict = {}

    def put(self, key):
        if type(key) is not tuple:
            return super().put(key)
        try:
            return self._memo[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable part: not memoised
            return super().put(key)
        converted = super().put(key)
        if len(self._memo) >= self.MEMO_MAX:
            self._memo.clear()
        self._memo[key] = converted
        return converted


class RenamingDisk(KeyMemoDisk):
    """diskcache Disk that moves a StagedFile into the cache instead of copying it.

    Copying a verified 1 GiB blob costs ~2 s here; a rename on the same filesystem is free.
    Everything else (eviction, removal of files, the SQLite index) stays diskcache's.
    """

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read and isinstance(value, StagedFile):
            filename, full_path = self.filename(key, value)
            _makedirs_owner_only(os.path.dirname(full_path))
            os.rename(value.path, full_path)
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


def restrict_to_owner(directory: str) -> None:
    """The cache dir holds private images: owner only (0700 dirs, 0600 files), whatever the umask.

    The directory itself and the files regcache keeps at its top (the SQLite indexes, the miss
    log) are tightened here; everything deeper is unreachable by others through the 0700
    directories above it, and what regcache creates there is 0600/0700 anyway. No walk over
    the whole tree: with 100k blobs that alone took ~2 s on every start and every command.
    """
    _chmod(directory, 0o700)
    for sub in ("content", "tags", "staging"):
        path = os.path.join(directory, sub)
        _chmod(path, 0o700)
        try:
            names = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]
        except OSError:
            continue
        for name in names:  # cache.db and its -wal/-shm companions
            _chmod(os.path.join(path, name), 0o600)
    _chmod(os.path.join(directory, "misses.jsonl"), 0o600)


def _makedirs_owner_only(path: str) -> None:
    # os.makedirs applies its mode to the last component only; every new one here is 0700.
    if os.path.isdir(path):
        return
    _makedirs_owner_only(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _chmod(path: str, mode: int) -> None:
    try:
        if os.stat(path, follow_symlinks=False).st_mode & 0o777 != mode:
            os.chmod(path, mode, follow_symlinks=False)
    except (FileNotFoundError, NotImplementedError, PermissionError):
        pass


def hash_copy(read, hasher, write=None, progress=None, chunk: int = 1024 * 1024) -> int:
    """Feed everything read() yields to hasher (and to write, if given); return the byte count.

    The one loop behind import, export, verify and warm: bytes are checked as they pass.
    """
    n = 0
    while True:
        data = read(chunk)
        if not data:
            return n
        hasher.update(data)
        if write is not None:
            write(data)
        n += len(data)
        if progress:
            progress(len(data))


@dataclass
class TagEntry:
    digest: str
    media_type: str
    checked_at: float  # when upstream last confirmed this digest for the tag


@dataclass
class Manifest:
    digest: str
    media_type: str
    body: bytes


def blob_key(digest: str) -> tuple:
    return ("blob", digest)


def manifest_key(digest: str) -> tuple:
    return ("manifest", digest)


def tag_key(registry: str, repo: str, tag: str) -> tuple:
    return ("tag", registry, repo, tag)


def member_key(registry: str, repo: str, digest: str) -> tuple:
    return ("member", registry, repo, digest)


def public_key(registry: str, repo: str) -> tuple:
    return ("public", registry, repo)


def pin_key(registry: str, repo: str, reference: str) -> tuple:
    return ("pin", registry, repo, reference)


@dataclass
class ContentRow:
    """One row of the content index, read without touching its access time."""

    kind: str  # "blob" | "manifest"
    digest: str
    size: int
    access_time: float
    store_time: float
    filename: str | None
    mode: int
    value: object  # inline value (manifests), raw from SQLite


def tagged_rows(cache: diskcache.Cache, tag: str):
    """(key, value) of every entry of a diskcache with this diskcache tag (stats.Stats' counters)."""
    rows = cache._sql("SELECT key, raw, value FROM Cache WHERE tag = ?", (tag,)).fetchall()
    for db_key, raw, value in rows:
        try:
            yield cache._disk.get(db_key, raw), value
        except Exception:  # noqa: BLE001 - an unreadable key is not ours
            continue


def count_tagged_rows(cache: diskcache.Cache, tag: str) -> int:
    return cache._sql("SELECT COUNT(*) FROM Cache WHERE tag = ?", (tag,)).fetchone()[0]


COUNTER_PREFIX = "stats"  # key prefix and diskcache tag of the counter rows in the tags db


class Counters:
    """The store's persisted counters (stats.Stats counts into them): rows `(name, *labels) ->
    number` kept in the tags db under the "stats" prefix and tag, so they travel with the cache
    dir, survive restarts and several processes add up (diskcache's atomic incr). Callers name
    rows by (name, *labels); the key layout is this class's."""

    def __init__(self, cache: diskcache.Cache):
        self._cache = cache

    def _key(self, row: tuple) -> tuple:
        return (COUNTER_PREFIX, *row)

    def transact(self):
        return self._cache.transact()

    def ensure(self, row: tuple, initial: float = 0) -> None:
        """Create the row with initial unless it exists (add keeps an existing row)."""
        self._cache.add(self._key(row), initial, tag=COUNTER_PREFIX)

    def incr(self, row: tuple, n: int = 1) -> None:
        self._cache.incr(self._key(row), n)

    def get(self, row: tuple, default=0):
        return self._cache.get(self._key(row), default)

    def set(self, row: tuple, value) -> None:
        self._cache.set(self._key(row), value, tag=COUNTER_PREFIX)

    def __contains__(self, row: tuple) -> bool:
        return self._key(row) in self._cache

    def rows(self) -> dict[tuple, float]:
        """Every counter row, in one query."""
        out: dict[tuple, float] = {}
        for key, value in tagged_rows(self._cache, COUNTER_PREFIX):
            if isinstance(key, tuple) and len(key) > 1 and key[0] == COUNTER_PREFIX and isinstance(value, (int, float)):
                out[key[1:]] = value
        return out

    def count(self) -> int:
        return count_tagged_rows(self._cache, COUNTER_PREFIX)

    def clear(self) -> int:
        """Remove every counter row; how many went."""
        return self._cache.evict(COUNTER_PREFIX)

    def close(self) -> None:
        self._cache.close()


# Present once the membership index covers every tag (cache dirs from before it existed get
# it derived from their tags and manifests when first opened).
MEMBERSHIP_SCHEMA = ("schema", "membership")


class Store:
    def __init__(self, directory: str, size_limit: int = DEFAULT_SIZE_LIMIT):
        self.directory = os.path.abspath(directory)
        self.staging_dir = os.path.join(self.directory, "staging")
        os.makedirs(self.staging_dir, exist_ok=True)
        self.content = diskcache.Cache(
            os.path.join(self.directory, "content"),
            disk=RenamingDisk,
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            # diskcache culls up to cull_limit entries per set, the new one included, once
            # the limit is passed; regcache evicts one at a time instead (evict_to_limit).
            cull_limit=0,
            # Keep manifests and small values inside SQLite; blobs always arrive as files.
            disk_min_file_size=64 * 1024,
        )
        self.tags = diskcache.Cache(os.path.join(self.directory, "tags"), disk=KeyMemoDisk, eviction_policy="none",
                                    size_limit=2**62)
        # rowid -> when it was read: uses of content not yet written to its access_time (below)
        self._touched: dict[int, float] = {}
        self._touch_lock = threading.Lock()
        self._toucher: threading.Thread | None = None
        self._closing = threading.Event()
        self.miss_log_path = os.path.join(self.directory, "misses.jsonl")
        self.counters = Counters(self.tags)
        # A cache tier's shared knowledge (tier.Tier), or None on a single node: membership,
        # publicness and tags are also written there, and read from there on a local miss.
        self.shared = None
        restrict_to_owner(self.directory)
        if MEMBERSHIP_SCHEMA not in self.tags:
            self._derive_membership()

    def close(self) -> None:
        self._closing.set()
        toucher, self._toucher = self._toucher, None
        if toucher is not None and toucher is not threading.current_thread():
            toucher.join(5)
        self.flush_touches()
        self.content.close()
        self.tags.close()

    # --- uses of content: the LRU order, written behind ----------------------------------
    # diskcache's "least-recently-used" get writes the row's access_time in a transaction on
    # every read: a SQLite write (and its lock) on every cache hit, on the event loop, waiting
    # behind any other writer of the cache dir (a `regcache gc` holds it for seconds). Reads
    # here are plain SELECTs; the uses they make are written every TOUCH_INTERVAL seconds by a
    # thread of their own, and before anything reads the order (eviction, gc, ls).

    TOUCH_INTERVAL = 1.0

    def _read_content(self, key: tuple, read: bool = False, use: bool = True):
        """A content entry's value (an open file with read=True), or None; counts as a use
        unless use is False (regcache's own bookkeeping reads)."""
        cache = self.content
        db_key, raw = cache._disk.put(key)
        rows = cache._sql("SELECT rowid, mode, filename, value FROM Cache WHERE key = ? AND raw = ?"
                          " AND (expire_time IS NULL OR expire_time > ?)", (db_key, raw, time.time())).fetchall()
        if not rows:
            return None
        rowid, mode, filename, value = rows[0]
        try:
            result = cache._disk.fetch(mode, filename, value, read)
        except OSError:  # removed between the SELECT and the open
            return None
        if use:
            self._touch(rowid)
        return result

    def _touch(self, rowid: int) -> None:
        self._touched[rowid] = time.time()
        if self._toucher is None and not self._closing.is_set():
            with self._touch_lock:
                if self._toucher is None:
                    self._toucher = threading.Thread(target=self._write_touches, name="regcache-store-lru",
                                                     daemon=True)
                    self._toucher.start()

    def _write_touches(self) -> None:
        while not self._closing.wait(self.TOUCH_INTERVAL):
            self.flush_touches()

    def flush_touches(self) -> None:
        """Write the uses read since the last flush into the content index's access times."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            # A row deleted meanwhile updates nothing, or a row stored since under its rowid,
            # which is as recent; access times only ever move forward.
            with self.content.transact():
                self.content._con.executemany(
                    "UPDATE Cache SET access_time = ? WHERE rowid = ? AND access_time < ?",
                    [(when, rowid, when) for rowid, when in touched.items()])
        except Exception as e:  # noqa: BLE001 - a busy or closed index: kept for the next flush
            log.debug("could not record %d content uses yet: %s", len(touched), e)
            with self._touch_lock:
                for rowid, when in touched.items():
                    self._touched[rowid] = max(when, self._touched.get(rowid, 0.0))

    def set_size_limit(self, size_limit: int) -> None:
        self.content.reset("size_limit", size_limit)

    @property
    def size_limit(self) -> int:
        return int(self.content.size_limit)

    def volume(self) -> int:
        return int(self.content.volume())

    # --- the content index, as inventory and gc see it ---------------------------------

    def content_rows(self):
        """Every blob and manifest entry (ContentRow), without counting as a use."""
        self.flush_touches()  # the access times as of now
        cache = self.content
        rows = cache._sql("SELECT key, raw, size, access_time, store_time, mode, filename, value FROM Cache").fetchall()
        for db_key, raw, size, atime, stime, mode, filename, value in rows:
            try:
                key = cache._disk.get(db_key, raw)
            except Exception:  # noqa: BLE001 - an unreadable key is not ours
                continue
            if isinstance(key, tuple) and len(key) == 2 and key[0] in ("blob", "manifest"):
                yield ContentRow(key[0], key[1], size or 0, atime or 0.0, stime or 0.0, filename, mode, value)

    def row_value(self, row: ContentRow):
        """The stored value of a row (a manifest's (media type, body)), without counting as a use."""
        return self.content._disk.fetch(row.mode, row.filename, row.value, False)

    def row_path(self, row: ContentRow) -> str | None:
        return os.path.join(self.content.directory, row.filename) if row.filename else None

    def holds_file(self, filename: str) -> bool:
        """Whether a content file is still in the index (not evicted meanwhile)."""
        return self.content._sql("SELECT filename FROM Cache WHERE filename = ?", (filename,)).fetchone() is not None

    def delete_content(self, kind: str, digest: str) -> bool:
        return self.content.delete(blob_key(digest) if kind == "blob" else manifest_key(digest))

    def entry_counts(self) -> dict[str, int]:
        """How many blobs, manifests, tags and pins the store holds, from the SQLite index only."""
        modes = dict(self.content._sql("SELECT mode, COUNT(*) FROM Cache GROUP BY mode").fetchall())
        counts = {"blobs": int(modes.get(diskcache.core.MODE_BINARY, 0)),
                  "manifests": int(modes.get(diskcache.core.MODE_PICKLE, 0)), "tags": 0, "pins": 0}
        for key in self._tag_keys(("tag", "pin")):
            counts[key[0] + "s"] += 1
        return counts

    def _tag_keys(self, kinds: tuple[str, ...]) -> list[tuple]:
        """Keys of the tags db whose first element is one of kinds, in one query.

        diskcache's iterkeys() pages 100 keys at a time with a query SQLite cannot answer from
        its index: quadratic, ~10 s for 140k keys, where one SELECT takes a quarter second.
        """
        disk = self.tags._disk
        keys = []
        for db_key, raw in self.tags._sql("SELECT key, raw FROM Cache").fetchall():
            try:
                key = disk.get(db_key, raw)
            except Exception:  # noqa: BLE001 - an unreadable key is not ours
                continue
            if isinstance(key, tuple) and key and key[0] in kinds:
                keys.append(key)
        return keys

    # --- blobs -----------------------------------------------------------------

    def open_blob(self, digest: str):
        """An open binary file of a stored blob, or None. The caller closes it.

        An open file stays readable even if the blob is evicted meanwhile (POSIX unlink).
        """
        return self._read_content(blob_key(digest), read=True)

    def blob_size(self, digest: str) -> int | None:
        """A stored blob's size (counts as a use, as serving it would), or None."""
        cache = self.content
        db_key, raw = cache._disk.put(blob_key(digest))
        rows = cache._sql("SELECT rowid, filename FROM Cache WHERE key = ? AND raw = ?"
                          " AND (expire_time IS NULL OR expire_time > ?)", (db_key, raw, time.time())).fetchall()
        if not rows or not rows[0][1]:
            return None
        try:
            size = os.stat(os.path.join(cache.directory, rows[0][1])).st_size  # the file, not the index's word
        except OSError:
            return None
        self._touch(rows[0][0])
        return size

    def has_room(self, size: int | None, reserve: int = 64 * 1024 * 1024) -> bool:
        """Whether a blob of this size fits on the cache filesystem with some room to spare."""
        try:
            st = os.statvfs(self.staging_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= (size or 0) + reserve

    def has_blob(self, digest: str) -> bool:
        return blob_key(digest) in self.content

    def new_staging_file(self, digest: str):
        """Create and lock a staging file; the lock tells sweep_staging it is alive."""
        name = f"{digest.replace(':', '-')}.{os.getpid()}.{os.urandom(4).hex()}"
        path = os.path.join(self.staging_dir, name)
        # Created under a dot-name and renamed once locked: another process's sweep never sees
        # the unlocked moment between creating and locking (the lock follows the inode).
        hidden = os.path.join(self.staging_dir, "." + name)
        f = os.fdopen(os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, path)
        return path, f

    def commit_blob(self, digest: str, staging_path: str, size: int) -> None:
        """Move a verified staging file into the store under its digest."""
        self.content.set(blob_key(digest), StagedFile(staging_path, size), read=True)
        self.evict_to_limit(protect={blob_key(digest)})

    def evict_to_limit(self, protect=frozenset()) -> int:
        """Evict least recently used content until the store fits its size limit.

        Never the entries in protect (what was just stored). Returns how many were evicted.
        """
        evicted = 0
        cache = self.content
        self.flush_touches()  # evict by the uses as of now
        while cache.volume() > cache.size_limit:
            # diskcache keeps access_time per row ("least-recently-used" updates it on get)
            rows = cache._sql("SELECT key, raw FROM Cache ORDER BY access_time LIMIT ?", (len(protect) + 1,)).fetchall()
            victims = [k for k in (cache._disk.get(key, raw) for key, raw in rows) if k not in protect]
            if not victims:
                break
            cache.delete(victims[0])
            evicted += 1
        return evicted

    def sweep_staging(self) -> int:
        """Remove staging files no live writer holds (debris of a crash or kill -9)."""
        removed = 0
        for name in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, name)
            try:
                if name.startswith(".") and time.time() - os.stat(path).st_mtime < 60:
                    continue  # being created right now (see new_staging_file)
                with open(path, "rb") as f:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EACCES):
                            continue  # another process is filling it right now
                        raise
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- manifests -------------------------------------------------------------------

    def put_manifest(self, digest: str, media_type: str, body: bytes, share: bool = True) -> None:
        self.content.set(manifest_key(digest), (media_type, body))
        self.evict_to_limit(protect={manifest_key(digest)})
        if share and self.shared is not None:
            self.shared.put_manifest(digest, media_type, body)

    def get_manifest(self, digest: str, use: bool = True) -> Manifest | None:
        """A stored manifest; use=False: without counting as a use (bookkeeping reads)."""
        value = self._read_content(manifest_key(digest), use=use)
        if value is None:
            return None
        media_type, body = value
        return Manifest(digest, media_type, body)

    # --- tags --------------------------------------------------------------------------

    def tag_entries(self, registry: str, repo: str, tag: str) -> list[TagEntry]:
        value = dict(self.tags.get(tag_key(registry, repo, tag)) or {})
        if self.shared is not None:
            # per media type, the most recently confirmed digest of any node
            for mt, (d, checked) in self.shared.tag_entries(registry, repo, tag).items():
                if mt not in value or value[mt][1] < checked:
                    value[mt] = (d, checked)
        return [TagEntry(d, mt, checked) for mt, (d, checked) in value.items()]

    def find_tag(self, registry: str, repo: str, tag: str, accepted: set[str] | None) -> TagEntry | None:
        """The most recently confirmed tag entry whose media type the client accepts."""
        candidates = [e for e in self.tag_entries(registry, repo, tag) if oci.client_accepts(e.media_type, accepted)]
        candidates.sort(key=lambda e: e.checked_at, reverse=True)
        return candidates[0] if candidates else None

    def set_tag(self, registry: str, repo: str, tag: str, media_type: str, digest: str,
                now: float | None = None) -> None:
        key = tag_key(registry, repo, tag)
        with self.tags.transact():
            value = dict(self.tags.get(key) or {})
            value[media_type] = (digest, now if now is not None else time.time())
            self.tags.set(key, value)
        if self.shared is not None:
            self.shared.set_tag(registry, repo, tag, media_type, digest, value[media_type][1])
        # The tag's repository holds its manifest (and what the manifest references). Already
        # known on every revalidation, and whoever stores a manifest learns it right then.
        if self.holds(registry, repo, digest):
            return
        manifest = self.get_manifest(digest, use=False)
        if manifest is not None:
            self.learn_manifest(registry, repo, digest, manifest.body)
        else:
            self.add_members(registry, repo, [digest])

    def set_tag_entries(self, registry: str, repo: str, tag: str, change) -> None:
        """Apply change({media type: (digest, checked)}) to a tag's entries, atomically; a tag
        left without entries is removed."""
        key = tag_key(registry, repo, tag)
        with self.tags.transact():
            value = dict(self.tags.get(key) or {})
            change(value)
            if value:
                self.tags.set(key, value)
            else:
                self.tags.delete(key)

    def iter_tags(self):
        for key in self._tag_keys(("tag",)):
            yield key[1:], self.tags.get(key) or {}

    # --- repository membership ---------------------------------------------------------
    # Upstream serves a digest only under a repository that holds it; so does regcache. A
    # repository is known to hold a digest once upstream served it there (200) or a manifest
    # upstream served there names it. Kept with the tags: a copied cache dir keeps it.

    def add_members(self, registry: str, repo: str, digests) -> None:
        now = time.time()
        valid = [d for d in map(oci.valid_digest, digests) if d is not None]
        with self.tags.transact():
            for digest in valid:
                self.tags.set(member_key(registry, repo, digest), now)
        if self.shared is not None:
            self.shared.add_members(registry, repo, valid)

    def learn_manifest(self, registry: str, repo: str, digest: str, body: bytes) -> None:
        """repo holds this manifest and everything it references."""
        self.add_members(registry, repo, [digest, *oci.referenced_digests(body)])

    def _derive_membership(self) -> None:
        for (registry, repo, _tag), entries in list(self.iter_tags()):
            pending = [digest for digest, _checked in entries.values()]
            seen: set[str] = set()
            while pending:
                digest = pending.pop()
                if digest in seen:
                    continue
                seen.add(digest)
                self.add_members(registry, repo, [digest])
                manifest = self.get_manifest(digest, use=False)
                if manifest is not None:
                    refs = oci.referenced_digests(manifest.body)
                    self.add_members(registry, repo, refs)
                    pending.extend(refs)
        self.tags.set(MEMBERSHIP_SCHEMA, 1)

    def holds(self, registry: str, repo: str, digest: str) -> bool:
        if member_key(registry, repo, digest) in self.tags:
            return True
        if self.shared is not None and self.shared.holds(registry, repo, digest):
            self.tags.set(member_key(registry, repo, digest), time.time())  # learnt from the tier
            return True
        return False

    def iter_members(self):
        """(registry, repo, digest) for every membership entry."""
        for key in self._tag_keys(("member",)):
            yield key[1:]

    def forget_members(self, digests) -> int:
        """Drop membership of digests no longer stored (gc, verify's quarantine)."""
        gone = set(digests)
        if not gone:
            return 0
        removed = 0
        with self.tags.transact():
            for registry, repo, digest in list(self.iter_members()):
                if digest in gone and self.tags.delete(member_key(registry, repo, digest)):
                    removed += 1
        return removed

    # --- publicness and pins ----------------------------------------------------------

    def get_public(self, registry: str, repo: str) -> tuple[bool | None, float]:
        """The remembered publicness verdict of a repository and when it was reached."""
        value = self.tags.get(public_key(registry, repo))
        local = (None, 0.0) if value is None else (bool(value[0]), float(value[1]))
        if self.shared is not None:
            shared = self.shared.get_public(registry, repo)
            if shared[0] is not None and shared[1] > local[1]:
                return shared  # a more recent verdict of another node
        return local

    def set_public(self, registry: str, repo: str, public: bool, checked: float | None = None) -> None:
        checked = time.time() if checked is None else checked
        self.tags.set(public_key(registry, repo), (public, checked))
        if self.shared is not None:
            self.shared.set_public(registry, repo, public, checked)

    def pin(self, registry: str, repo: str, reference: str) -> None:
        self.tags.set(pin_key(registry, repo, reference), time.time())

    def unpin(self, registry: str, repo: str, reference: str) -> bool:
        return self.tags.delete(pin_key(registry, repo, reference))

    def iter_pins(self):
        """(registry, repo, reference) of every pin."""
        for key in self._tag_keys(("pin",)):
            if len(key) == 4:
                yield key[1:]

    # --- miss log ----------------------------------------------------------------------

    def log_miss(self, record: dict) -> None:
        line = json.dumps({"time": round(time.time(), 3), **record}, separators=(",", ":")) + "\n"
        # One write of one line with O_APPEND: lines from two processes never interleave.
        try:
            fd = os.open(self.miss_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not append to miss log %s: %s", self.miss_log_path, e)

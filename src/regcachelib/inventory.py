"""What is in a cache directory, read without disturbing it; manifest-aware gc, verify, pins.

Everything here reads the content index (diskcache's SQLite table) directly, so listing,
collecting garbage or rehashing never counts as a use: the least-recently-used order the
proxy relies on stays what the clients made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

from . import oci
from .store import Store, hash_copy

# --- image references --------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.registry}/{self.repo}@{self.digest}"
        return f"{self.registry}/{self.repo}:{self.tag}"


def parse_image(text: str, default_tag: str = "latest") -> ImageRef:
    """`alpine`, `alpine:3.19`, `quay.io/org/img:1`, `host:5000/x@sha256:...` (docker rules).

    The registry is the first path component when it has a dot or a port or is localhost;
    otherwise Docker Hub. Docker Hub aliases fold to docker.io; one-component Hub names get
    library/. Raises ValueError for anything a registry would not accept.
    """
    ref = text.strip()
    for prefix in ("docker://", "https://", "http://"):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
    if not ref:
        raise ValueError("empty image reference")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        try:
            digest = str(oci.parse_digest(digest))
        except oci.ProtocolError as e:
            raise ValueError(f"{text}: {e.message}") from None
    tag = None
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        ref, tag = ref[:colon], ref[colon + 1:]
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, name = oci.canonical_registry(first), rest
    else:
        registry, name = oci.DOCKER_HUB, ref
    try:
        oci.validate_name(name)
    except oci.ProtocolError:
        raise ValueError(f"{text}: invalid repository name {name!r}") from None
    name = oci.normalise_name(registry, name)
    if tag is not None and not oci._TAG.fullmatch(tag):
        raise ValueError(f"{text}: invalid tag {tag!r}")
    if tag is None and digest is None:
        tag = default_tag
    return ImageRef(registry, name, tag, digest)


def format_platform(p: dict | None) -> str:
    if not isinstance(p, dict):
        return "unknown"
    parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))]
    if p.get("variant"):
        parts.append(str(p["variant"]))
    return "/".join(parts)


def platform_matches(p: dict | None, wanted: str) -> bool:
    """`linux/arm64` matches linux/arm64/v8; `linux/arm64/v8` needs the variant; `all` all."""
    if wanted == "all":
        return True
    have = format_platform(p).split("/")
    want = wanted.split("/")
    if len(want) < 2:
        return False
    return have[: len(want)] == want


# --- manifest references ------------------------------------------------------------------


@dataclass
class Refs:
    manifests: list[tuple[str, str, dict | None]] = field(default_factory=list)  # (digest, media type, platform)
    blobs: list[str] = field(default_factory=list)


def manifest_refs(body: bytes) -> Refs:
    """What a manifest points at: child manifests (index/list) or config + layers."""
    refs = Refs()
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return refs
    if not isinstance(doc, dict):
        return refs
    for m in doc.get("manifests") or []:
        if isinstance(m, dict) and isinstance(m.get("digest"), str):
            refs.manifests.append((m["digest"], str(m.get("mediaType") or ""), m.get("platform")))
    cfg = doc.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("digest"), str):
        refs.blobs.append(cfg["digest"])
    for key in ("layers", "blobs"):
        for layer in doc.get(key) or []:
            if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
                refs.blobs.append(layer["digest"])
    for layer in doc.get("fsLayers") or []:  # schema 1
        if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str):
            refs.blobs.append(layer["blobSum"])
    seen: set[str] = set()
    refs.blobs = [b for b in refs.blobs if not (b in seen or seen.add(b))]
    return refs


# --- the content index ---------------------------------------------------------------------


@dataclass
class Entry:
    kind: str  # "blob" | "manifest"
    digest: str
    size: int  # bytes of the blob, or of the manifest body
    access_time: float
    store_time: float
    filename: str | None  # relative to content/, for blobs (and large manifests)
    mode: int
    value: object = None  # inline value (manifests), raw from SQLite


class Inventory:
    """A snapshot of the content index of a store, read without touching access times."""

    def __init__(self, store: Store):
        self.store = store
        self.blobs: dict[str, Entry] = {}
        self.manifests: dict[str, Entry] = {}
        self._bodies: dict[str, tuple[str, bytes] | None] = {}
        for row in store.content_rows():
            entry = Entry(row.kind, row.digest, row.size, row.access_time, row.store_time, row.filename, row.mode,
                          row.value)
            (self.blobs if row.kind == "blob" else self.manifests)[row.digest] = entry
        for entry in self.manifests.values():
            body = self.manifest(entry.digest)
            entry.size = len(body[1]) if body else entry.size

    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, body) of a stored manifest, without counting as a use."""
        if digest in self._bodies:
            return self._bodies[digest]
        entry = self.manifests.get(digest)
        result = None
        if entry is not None:
            try:
                value = self.store.row_value(entry)
                media_type, body = value
                result = (media_type, bytes(body))
            except Exception:  # noqa: BLE001 - evicted meanwhile, or damaged
                result = None
        self._bodies[digest] = result
        return result

    def blob_path(self, digest: str) -> str | None:
        entry = self.blobs.get(digest)
        if entry is None or not entry.filename:
            return None
        return self.store.row_path(entry)

    def refs(self, digest: str) -> Refs:
        m = self.manifest(digest)
        return manifest_refs(m[1]) if m else Refs()

    def closure(self, digest: str) -> tuple[set[str], set[str], set[str]]:
        """(stored manifests, stored blobs, missing digests) reachable from a manifest."""
        manifests: set[str] = set()
        blobs: set[str] = set()
        missing: set[str] = set()
        todo = [digest]
        while todo:
            d = todo.pop()
            if d in manifests:
                continue
            if d not in self.manifests:
                missing.add(d)
                continue
            manifests.add(d)
            refs = self.refs(d)
            todo.extend(child for child, _mt, _p in refs.manifests)
            for b in refs.blobs:
                (blobs if b in self.blobs else missing).add(b)
        return manifests, blobs, missing

    def size_of(self, manifests: set[str], blobs: set[str]) -> int:
        return sum(self.manifests[m].size for m in manifests) + sum(self.blobs[b].size for b in blobs)

    def last_access(self, manifests: set[str], blobs: set[str] = frozenset()) -> float:
        times = [self.manifests[m].access_time for m in manifests] + [self.blobs[b].access_time for b in blobs]
        return max(times, default=0.0)


# --- tags and pins ---------------------------------------------------------------------------


@dataclass
class TaggedImage:
    registry: str
    repo: str
    tag: str
    media_type: str
    digest: str
    checked_at: float

    @property
    def ref(self) -> str:
        return f"{self.registry}/{self.repo}:{self.tag}"


def tagged_images(store: Store) -> list[TaggedImage]:
    out = []
    for (registry, repo, tag), value in store.iter_tags():
        for media_type, (digest, checked) in (value or {}).items():
            out.append(TaggedImage(registry, repo, tag, media_type, digest, checked))
    out.sort(key=lambda t: (t.registry, t.repo, t.tag, t.media_type))
    return out


def pin(store: Store, ref: ImageRef) -> None:
    store.pin(ref.registry, ref.repo, ref.reference)


def unpin(store: Store, ref: ImageRef) -> bool:
    return store.unpin(ref.registry, ref.repo, ref.reference)


def pins(store: Store) -> list[ImageRef]:
    out = []
    for registry, repo, reference in store.iter_pins():
        if oci.is_digest(reference):
            out.append(ImageRef(registry, repo, None, reference))
        else:
            out.append(ImageRef(registry, repo, reference, None))
    return sorted(out, key=str)


def resolve(store: Store, ref: ImageRef) -> list[str]:
    """Manifest digests a reference names: a digest itself, or every media type of a tag."""
    if ref.digest:
        return [ref.digest]
    entries = sorted(store.tag_entries(ref.registry, ref.repo, ref.tag), key=lambda e: e.checked_at, reverse=True)
    return [e.digest for e in entries]


# --- gc --------------------------------------------------------------------------------------------


@dataclass
class GcResult:
    before: int
    after: int
    target: int
    removed_manifests: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    removed_images: list[str] = field(default_factory=list)  # tags whose manifest went
    protected: int = 0  # manifests kept because pinned
    dry_run: bool = False


def store_volume(store: Store) -> int:
    return store.volume()


def gc(store: Store, max_size: int, dry_run: bool = False, stats=None, progress=None) -> GcResult:
    """Evict least recently used images until the store fits max_size.

    The unit of eviction is an image: a top-level manifest (one no stored manifest points
    at) with everything only it references; unreferenced blobs are units of their own. A
    unit's age is the last use of its manifests (every pull reads them). A blob or child
    manifest is removed only when no retained manifest references it, and nothing reachable
    from a pinned image is ever removed.
    """
    inv = Inventory(store)
    before = store_volume(store)
    result = GcResult(before=before, after=before, target=max_size, dry_run=dry_run)
    if before <= max_size:
        return result
    # reference counts from every stored manifest
    refcount: dict[str, int] = {}
    referenced_by: dict[str, list[str]] = {}
    for m in inv.manifests:
        refs = inv.refs(m)
        children = [d for d, _mt, _p in refs.manifests] + refs.blobs
        referenced_by[m] = children
        for c in children:
            refcount[c] = refcount.get(c, 0) + 1
    protected: set[str] = set()
    for ref in pins(store):
        for digest in resolve(store, ref):
            ms, bs, _missing = inv.closure(digest)
            protected |= ms | bs
    result.protected = len([m for m in protected if m in inv.manifests])
    units: list[tuple[float, str, str]] = []  # (age, kind, digest)
    for m, entry in inv.manifests.items():
        if refcount.get(m, 0) == 0:
            ms, _bs, _ = inv.closure(m)
            units.append((inv.last_access(ms), "manifest", m))
    for b, entry in inv.blobs.items():
        if refcount.get(b, 0) == 0:
            units.append((entry.access_time, "blob", b))
    units.sort()
    current = before
    removed: set[str] = set()

    def remove(kind: str, digest: str) -> None:
        nonlocal current
        entry = inv.manifests[digest] if kind == "manifest" else inv.blobs[digest]
        if not dry_run:
            store.delete_content(kind, digest)
        removed.add(digest)
        current -= entry.size
        result.removed_bytes += entry.size
        (result.removed_manifests if kind == "manifest" else result.removed_blobs).append(digest)

    for _age, kind, digest in units:
        if current <= max_size:
            break
        if digest in protected:
            continue
        # remove the unit's root, then whatever only it kept alive (index -> children -> blobs)
        todo = [(kind, digest)]
        while todo:
            k, d = todo.pop()
            if d in removed or d in protected:
                continue
            remove(k, d)
            if k == "manifest":
                for child in referenced_by.get(d, []):
                    refcount[child] -= 1
                    if refcount[child] == 0 and child not in removed and child not in protected:
                        if child in inv.manifests:
                            todo.append(("manifest", child))
                        elif child in inv.blobs:
                            todo.append(("blob", child))
        if progress:
            progress(before - current)
    # tags whose manifest is gone now point nowhere: drop those entries
    gone = set(result.removed_manifests)
    for image in tagged_images(store):
        if image.digest in gone:
            result.removed_images.append(image.ref)
            if not dry_run:
                store.set_tag_entries(image.registry, image.repo, image.tag,
                                      lambda value, media_type=image.media_type: value.pop(media_type, None))
    result.removed_images = sorted(set(result.removed_images))
    if not dry_run:
        # a repository holds only what is stored: the proxy never answers from a digest gc took
        store.forget_members(set(result.removed_manifests) | set(result.removed_blobs))
    result.after = store_volume(store) if not dry_run else current
    if stats is not None and not dry_run:
        stats.add("evictions", n=len(result.removed_manifests) + len(result.removed_blobs))
        stats.add("evicted_bytes", n=result.removed_bytes)
        stats.flush()
    return result


# --- verify ------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    checked_blobs: int = 0
    checked_manifests: int = 0
    checked_bytes: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, digest, reason)
    quarantined: list[str] = field(default_factory=list)  # paths written under quarantine/


def _hash_file(path: str, algorithm: str, progress=None) -> tuple[str, int]:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        n = hash_copy(f.read, h, progress=progress)
    return h.hexdigest(), n


def quarantine_dir(store: Store) -> str:
    return os.path.join(store.directory, "quarantine")


def verify(store: Store, quarantine: bool = True, stats=None, progress=None,
           only: set[str] | None = None) -> VerifyResult:
    """Rehash every stored blob and manifest; move every mismatch out of the store.

    A mismatching blob file is moved to quarantine/<digest> (with a .json note) and its
    entry removed, so the next pull fetches it again; a mismatching manifest likewise.
    """
    inv = Inventory(store)
    result = VerifyResult()
    qdir = quarantine_dir(store)
    stamp = time.strftime("%Y%m%dT%H%M%S")

    def bad(kind: str, digest: str, reason: str, path: str | None = None, body: bytes | None = None) -> None:
        result.bad.append((kind, digest, reason))
        if not quarantine:
            return
        os.makedirs(qdir, exist_ok=True)
        base = os.path.join(qdir, f"{digest.replace(':', '-')}.{kind}.{stamp}")
        moved = None
        if path is not None and os.path.exists(path):
            try:
                os.rename(path, base)
                moved = base
            except OSError:
                shutil.copyfile(path, base)
                moved = base
        elif body is not None:
            with open(base, "wb") as f:
                f.write(body)
            moved = base
        note = {"kind": kind, "digest": digest, "reason": reason, "time": time.time(),
                "file": os.path.basename(moved) if moved else None}
        with open(base + ".json", "w") as f:
            json.dump(note, f, indent=1)
        store.delete_content(kind, digest)
        result.quarantined.append(moved or base + ".json")

    for digest, entry in sorted(inv.blobs.items()):
        if only is not None and digest not in only:
            continue
        result.checked_blobs += 1
        path = inv.blob_path(digest)
        try:
            d = oci.parse_digest(digest)
        except oci.ProtocolError:
            bad("blob", digest, "not a valid digest", path)
            continue
        try:
            hexdigest, n = _hash_file(path, d.algorithm, progress)
        except (OSError, TypeError) as e:
            if not store.holds_file(entry.filename):
                continue  # evicted while we looked
            bad("blob", digest, f"unreadable: {e}")
            continue
        result.checked_bytes += n
        if hexdigest != d.hex:
            bad("blob", digest, f"content hashes to {d.algorithm}:{hexdigest}", path)
        elif entry.size and n != entry.size:
            bad("blob", digest, f"size {n} differs from the recorded {entry.size}", path)
    for digest in sorted(inv.manifests):
        if only is not None and digest not in only:
            continue
        result.checked_manifests += 1
        m = inv.manifest(digest)
        if m is None:
            bad("manifest", digest, "unreadable")
            continue
        body = m[1]
        result.checked_bytes += len(body)
        if progress:
            progress(len(body))
        try:
            ok = oci.parse_digest(digest).matches(body)
        except oci.ProtocolError:
            ok = False
        if not ok:
            bad("manifest", digest, f"body hashes to {oci.sha256_digest(body)}", body=body)
    if quarantine and result.bad:
        # what left the store is no longer held by any repository; the next pull learns it again
        store.forget_members({digest for _kind, digest, _reason in result.bad})
    if stats is not None:
        stats.add("verify_failures", n=len(result.bad))
        stats.add("verify_runs")
        stats.flush()
    return result


def content_bytes(store: Store) -> int:
    inv = Inventory(store)
    return sum(e.size for e in inv.blobs.values()) + sum(e.size for e in inv.manifests.values())

"""Moving images between caches as an OCI image layout (image-spec image-layout.md).

    BUNDLE/oci-layout       {"imageLayoutVersion": "1.0.0"}
    BUNDLE/index.json       one descriptor per exported image, named by the annotation
                            org.opencontainers.image.ref.name = "docker.io/library/alpine:3.19"
    BUNDLE/blobs/sha256/…   every manifest, config and layer, byte for byte (digests kept)

`skopeo copy oci:BUNDLE:docker.io/library/alpine:3.19 …` reads it. Manifests keep their own
media type (converting would change the digest): a Docker-typed image (schema 2, manifest
list) stays Docker-typed in the layout, which the image-spec allows but containers/image's
oci: transport does not look up by name (it only resolves OCI-typed descriptors); it reads
one when the bundle holds that image alone (`skopeo copy oci:BUNDLE …`, no name), and
`regcache import` reads every image. regcache's own
annotations (io.regcache.*) say when upstream last confirmed the tag and whether the
repository was public at the source.

A bundle is untrusted input (it may come from anywhere on a USB stick): import checks every
digest before it names a file (no path outside BUNDLE/blobs is ever opened), hashes every
byte, dates a tag no later than now (so it is revalidated once its tag_ttl is over) and never
takes the bundle's word that a repository is public: only the operator's --public says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from dataclasses import dataclass, field

from . import oci
from .inventory import ImageRef, Inventory, manifest_refs, parse_image
from .store import Store, hash_copy

REF_NAME = "org.opencontainers.image.ref.name"
CHECKED_AT = "io.regcache.checked-at"
PUBLIC = "io.regcache.public"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
INDEX_TYPES = (oci.OCI_INDEX, oci.DOCKER_LIST)


log = logging.getLogger(__name__)


class LayoutError(Exception):
    pass


def checked_digest(digest: object) -> str:
    """A digest read from a bundle or the store, checked before it names anything.

    Only a well-formed sha256/sha512 digest gets through, so `sha256:../../etc/x` can
    never turn into a path outside the bundle.
    """
    valid = oci.valid_digest(digest)
    if valid is None:
        raise LayoutError(f"{str(digest)[:100]!r}: not a valid digest (algorithm:hex)")
    return valid


def blob_path(bundle: str, digest: str) -> str:
    d = oci.parse_digest(checked_digest(digest))
    return os.path.join(bundle, "blobs", d.algorithm, d.hex)


@dataclass
class ExportReport:
    images: list[str] = field(default_factory=list)
    docker_typed: list[str] = field(default_factory=list)  # names skopeo's oci: transport will not resolve
    warnings: list[str] = field(default_factory=list)
    blobs_written: int = 0
    blobs_present: int = 0
    bytes_written: int = 0


def _copy_verified(src, dest: str, digest: str, progress=None) -> int:
    """Copy an open file to dest while hashing; refuse (and remove) on a mismatch."""
    d = oci.parse_digest(digest)
    h = d.hasher()
    tmp = dest + ".part"
    with open(tmp, "wb") as out:
        n = hash_copy(src.read, h, out.write, progress)
    if h.hexdigest() != d.hex:
        os.unlink(tmp)
        raise LayoutError(f"{digest}: the stored bytes hash to {d.algorithm}:{h.hexdigest()} (run `regcache verify`)")
    os.replace(tmp, dest)
    return n


def _write_bytes(bundle: str, digest: str, data: bytes) -> bool:
    path = blob_path(bundle, digest)
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    return True


def read_index(bundle: str) -> dict:
    path = os.path.join(bundle, "index.json")
    if not os.path.exists(path):
        return {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []}
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise LayoutError(f"{path}: not an OCI image index")
    return doc


def plan_export(store: Store, images: list[str]) -> tuple[list[tuple[ImageRef, str, str, float | None]], Inventory]:
    """Resolve each image to (ref, manifest digest, media type, checked_at) from the store."""
    inv = Inventory(store)
    out = []
    for text in images:
        ref = parse_image(text)
        if ref.digest:
            m = inv.manifest(ref.digest)
            if m is None:
                raise LayoutError(f"{ref}: not in the cache")
            out.append((ref, ref.digest, m[0], None))
            continue
        entries = store.tag_entries(ref.registry, ref.repo, ref.tag)
        entries = [e for e in entries if e.digest in inv.manifests]
        if not entries:
            raise LayoutError(f"{ref}: not in the cache (`regcache ls {ref.registry}/{ref.repo}` shows what is)")
        # prefer an index (all platforms), then the most recently confirmed
        entries.sort(key=lambda e: (e.media_type in INDEX_TYPES, e.checked_at), reverse=True)
        e = entries[0]
        out.append((ref, e.digest, e.media_type, e.checked_at))
    return out, inv


def export(store: Store, images: list[str], bundle: str, progress=None, total_cb=None) -> ExportReport:
    report = ExportReport()
    plan, inv = plan_export(store, images)
    # what to write, checked complete before anything is written
    needed_blobs: dict[str, int] = {}
    needed_manifests: set[str] = set()
    for ref, digest, _mt, _checked in plan:
        manifests, blobs, missing = inv.closure(digest)
        children = {c for m in manifests for c, _t, _p in inv.refs(m).manifests}
        missing_manifests = {d for d in missing if d in children}
        missing_blobs = missing - missing_manifests
        if missing_blobs:
            raise LayoutError(f"{ref}: incomplete in the cache, {len(missing_blobs)} blob(s) missing "
                              f"(e.g. {sorted(missing_blobs)[0]}); pull or `regcache warm` it first")
        if missing_manifests:
            report.warnings.append(f"{ref}: {len(missing_manifests)} of the index's platform manifests are not "
                                   "cached and not exported (pull them with --platform all to include them)")
        needed_manifests |= manifests
        for b in blobs:
            needed_blobs[b] = inv.blobs[b].size
    if total_cb:
        total_cb(sum(needed_blobs.values()))
    os.makedirs(bundle, exist_ok=True)
    index = read_index(bundle)
    with open(os.path.join(bundle, "oci-layout"), "w", encoding="utf-8") as f:
        json.dump(LAYOUT_VERSION, f)
    for d in sorted(needed_manifests):
        _write_bytes(bundle, d, inv.manifest(d)[1])
    for d, size in sorted(needed_blobs.items()):
        path = blob_path(bundle, d)
        if os.path.exists(path) and os.path.getsize(path) == size:
            report.blobs_present += 1
            if progress:
                progress(size)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = store.open_blob(d)
        if f is None:
            raise LayoutError(f"{d}: evicted from the cache while exporting")
        with f:
            report.bytes_written += _copy_verified(f, path, d, progress)
        report.blobs_written += 1
    for ref, digest, media_type, checked in plan:
        name = str(ref)
        public, _when = _known_public(store, ref.registry, ref.repo)
        annotations = {REF_NAME: name}
        if checked is not None:
            annotations[CHECKED_AT] = str(checked)
        if public is not None:
            annotations[PUBLIC] = "true" if public else "false"
        desc = {"mediaType": media_type, "digest": digest, "size": len(inv.manifest(digest)[1]),
                "annotations": annotations}
        index["manifests"] = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != name]
        index["manifests"].append(desc)
        report.images.append(name)
        if not media_type.startswith("application/vnd.oci."):
            report.docker_typed.append(name)
    tmp = os.path.join(bundle, "index.json.part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(bundle, "index.json"))
    return report


def _known_public(store: Store, registry: str, repo: str) -> tuple[bool | None, float]:
    return store.get_public(registry, repo)


# --- import ------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    images: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifests: int = 0
    blobs_imported: int = 0
    blobs_present: int = 0
    bytes_imported: int = 0
    marked_public: list[str] = field(default_factory=list)  # REGISTRY/REPO recorded public (--public)
    said_public: list[str] = field(default_factory=list)  # the bundle calls them public; not recorded


def _open_bundle_file(bundle: str, digest: str):
    """Open BUNDLE/blobs/ALG/HEX for reading: a regular file inside the bundle, or None if absent.

    The digest is checked first; a symlink pointing out of the bundle, a FIFO or a device is
    refused (a FIFO would block, a link could copy a local file into the cache).
    """
    path = blob_path(bundle, digest)
    root = os.path.realpath(bundle)
    if not os.path.lexists(path):
        return None
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise LayoutError(f"{digest}: the bundle's file points outside the bundle")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LayoutError(f"{digest}: the bundle's blob is not a regular file")
    return os.fdopen(fd, "rb")


def _read_verified(bundle: str, digest: str) -> bytes | None:
    """A manifest's bytes from the bundle, checked against its digest; None if absent."""
    f = _open_bundle_file(bundle, digest)
    if f is None:
        return None
    with f:
        data = f.read(oci.MAX_MANIFEST_BYTES + 1)
    if len(data) > oci.MAX_MANIFEST_BYTES or not oci.parse_digest(digest).matches(data):
        raise LayoutError(f"{digest}: the bundle's manifest does not match its digest")
    return data


def _manifest_type(declared: object, body: bytes, digest: str) -> str:
    """The media type to store (and later serve as Content-Type) a bundle manifest under:
    the descriptor's, else the document's own, and only ever a manifest media type (a bundle
    cannot make regcache serve something as text/html)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise LayoutError(f"{digest}: not a JSON manifest")
    media_type = declared or oci.manifest_media_type(body, None)
    if media_type not in oci.MANIFEST_MEDIA_TYPES:
        raise LayoutError(f"{digest}: {str(media_type)[:100]!r} is not a manifest media type")
    return media_type


def tag_checked_at(annotation: object, now: float) -> float:
    """When a bundle says upstream last confirmed its tag, clamped to what can be true.

    Never later than now (a future date would keep the tag "fresh" past its tag_ttl for
    ever). Missing, unreadable, infinite or negative means unknown: 0, as old as can be, so
    an online cache asks upstream at the first pull (an offline one serves it regardless).
    """
    try:
        value = float(annotation)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not math.isfinite(value) or value < 0:
        return 0.0
    return min(value, now)


def _parse_ref(annotations: dict, name: str | None) -> ImageRef:
    ref_name = annotations.get(REF_NAME)
    if not ref_name or not isinstance(ref_name, str):
        raise ValueError("no org.opencontainers.image.ref.name annotation")
    if "/" not in ref_name and ":" not in ref_name and "@" not in ref_name:
        if not name:
            raise ValueError(f"ref.name {ref_name!r} names no repository; give --name REGISTRY/REPO")
        return parse_image(f"{name}:{ref_name}")
    return parse_image(ref_name)


def _read_tree(bundle: str, top: str, declared: object) -> tuple[dict[str, tuple[str, bytes]], dict[str, int]]:
    """Every manifest of an image (an index's children where the bundle has them) verified,
    and the size of every blob they need. Raises LayoutError on anything not as it should be."""
    manifests: dict[str, tuple[str, bytes]] = {}
    blobs: dict[str, int] = {}
    todo = [(top, declared)]
    while todo:
        d, mt = todo.pop()
        d = checked_digest(d)
        if d in manifests:
            continue
        body = _read_verified(bundle, d)
        if body is None:
            if d == top:
                raise LayoutError(f"{d}: missing from the bundle")
            continue  # a platform of an index that was not exported
        manifests[d] = (_manifest_type(mt, body, d), body)
        refs = manifest_refs(body)
        todo.extend((c, cmt or None) for c, cmt, _p in refs.manifests)
        for b in refs.blobs:
            b = checked_digest(b)
            f = _open_bundle_file(bundle, b)
            if f is None:
                raise LayoutError(f"{b}: missing from the bundle")
            with f:
                blobs[b] = os.fstat(f.fileno()).st_size
    return manifests, blobs


def _record_public(store: Store, registry: str, repo: str, public: bool) -> bool:
    """Record an operator's word on publicness, dated 0 so that an online cache asks upstream
    at the first pull and upstream's answer replaces it; never over a verdict upstream gave."""
    _known, checked = store.get_public(registry, repo)
    if _known is not None and checked > 0 and public:
        return False
    store.set_public(registry, repo, public, checked=0.0)
    return True


def import_bundle(store: Store, bundle: str, name: str | None = None, mark_public: bool | None = None, progress=None,
                  total_cb=None) -> ImportReport:
    """Verify every manifest and blob of every named image in a layout, then store them.

    name: REGISTRY/REPO for descriptors whose ref.name is a bare tag (layouts made by other
    tools). mark_public: the operator's word that the imported repositories are public
    (True; not for one the bundle calls private) or private (False). The bundle's own
    io.regcache.public is never taken as proof of publicness: without the operator's word
    an online cache asks upstream, and an offline one serves the images only with
    trust_clients_offline.

    Every manifest imported under REGISTRY/REPO teaches the store that the repository holds
    it and everything it references (the membership index the proxy serves by).
    """
    report = ImportReport()
    if not os.path.exists(os.path.join(bundle, "oci-layout")):
        raise LayoutError(f"{bundle}: not an OCI image layout (no oci-layout file)")
    index = read_index(bundle)
    work: list[tuple[ImageRef, str, dict, dict[str, tuple[str, bytes]], dict[str, int]]] = []
    for desc in index["manifests"]:
        if not isinstance(desc, dict):
            report.skipped.append((str(desc)[:100], "not a descriptor"))
            continue
        annotations = desc.get("annotations")
        annotations = annotations if isinstance(annotations, dict) else {}
        label = str(annotations.get(REF_NAME) or desc.get("digest"))[:200]
        try:
            ref = _parse_ref(annotations, name)
            top = checked_digest(desc.get("digest"))
            manifests, blobs = _read_tree(bundle, top, desc.get("mediaType"))
        except (ValueError, LayoutError) as e:
            log.warning("import of %s refused: %s", label, e)
            report.skipped.append((label, str(e)))
            continue
        work.append((ref, top, annotations, manifests, blobs))
    if total_cb:
        total_cb(sum(size for *_rest, blobs in work for size in blobs.values()))
    now = time.time()
    for ref, top, annotations, manifests, blobs in work:
        try:
            for b, size in sorted(blobs.items()):
                if store.has_blob(b):
                    report.blobs_present += 1
                    if progress:
                        progress(size)
                    continue
                report.bytes_imported += _import_blob(store, bundle, b, progress)
                report.blobs_imported += 1
        except LayoutError as e:
            report.skipped.append((str(ref), str(e)))
            continue
        for d, (media_type, body) in manifests.items():
            store.put_manifest(d, media_type, body)
            # served under this repository from now on (offline too): it holds them upstream
            store.learn_manifest(ref.registry, ref.repo, d, body)
            report.manifests += 1
        if ref.tag:
            checked_at = tag_checked_at(annotations.get(CHECKED_AT), now)
            media_type = manifests[top][0]
            known = {e.media_type: e for e in store.tag_entries(ref.registry, ref.repo, ref.tag)}.get(media_type)
            # a bundle never takes back what upstream confirmed later
            if known is None or known.checked_at <= checked_at:
                store.set_tag(ref.registry, ref.repo, ref.tag, media_type, top, now=checked_at)
        repo = f"{ref.registry}/{ref.repo}"
        said = annotations.get(PUBLIC)
        if mark_public is False or (mark_public and said == "false"):
            _record_public(store, ref.registry, ref.repo, False)
        elif mark_public:
            if _record_public(store, ref.registry, ref.repo, True) and repo not in report.marked_public:
                report.marked_public.append(repo)
        elif said == "true" and repo not in report.said_public:
            report.said_public.append(repo)
        report.images.append(str(ref))
    return report


def _import_blob(store: Store, bundle: str, digest: str, progress=None) -> int:
    """Copy a bundle blob into a staging file while hashing; commit only if it verifies."""
    d = oci.parse_digest(checked_digest(digest))
    src = _open_bundle_file(bundle, digest)
    if src is None:
        raise LayoutError(f"{digest}: missing from the bundle")
    staging, out = store.new_staging_file(digest)
    committed = False
    try:
        h = d.hasher()
        with src, out:
            n = hash_copy(src.read, h, out.write, progress)
            if h.hexdigest() != d.hex:
                raise LayoutError(f"{digest}: the bundle's blob hashes to {d.algorithm}:{h.hexdigest()}")
            out.flush()
            os.fsync(out.fileno())
            store.commit_blob(digest, staging, n)  # under the staging lock, as a fill does
            committed = True
        return n
    finally:
        if not committed:
            try:
                os.unlink(staging)
            except FileNotFoundError:
                pass

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
annotations (io.regcache.*) carry what an offline cache needs besides the bytes: when
upstream last confirmed the tag, and whether the repository is public (a cache serves
cached content of a repository it does not know to be public only to clients whose
credentials upstream accepts, which an offline cache cannot check).
"""

from __future__ import annotations

import json
import os
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


class LayoutError(Exception):
    pass


def blob_path(bundle: str, digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return os.path.join(bundle, "blobs", algorithm, hexpart)


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
        missing_manifests = {d for d in missing if any(d == c for m in manifests for c, _t, _p in inv.refs(m).manifests)}
        missing_blobs = missing - missing_manifests
        if missing_blobs:
            raise LayoutError(f"{ref}: incomplete in the cache, {len(missing_blobs)} blob(s) missing (e.g. {sorted(missing_blobs)[0]}); pull or `regcache warm` it first")
        if missing_manifests:
            report.warnings.append(f"{ref}: {len(missing_manifests)} of the index's platform manifests are not cached and not exported (pull them with --platform all to include them)")
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
        desc = {"mediaType": media_type, "digest": digest, "size": len(inv.manifest(digest)[1]), "annotations": annotations}
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
    value = store.tags.get(("public", registry, repo))
    if value is None:
        return None, 0.0
    return bool(value[0]), float(value[1])


# --- import ------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    images: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifests: int = 0
    blobs_imported: int = 0
    blobs_present: int = 0
    bytes_imported: int = 0


def _read_verified(bundle: str, digest: str) -> bytes:
    path = blob_path(bundle, digest)
    try:
        with open(path, "rb") as f:
            data = f.read(oci.MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise LayoutError(f"{digest}: missing from the bundle") from None
    if len(data) > oci.MAX_MANIFEST_BYTES or not oci.parse_digest(digest).matches(data):
        raise LayoutError(f"{digest}: the bundle's manifest does not match its digest")
    return data


def import_bundle(store: Store, bundle: str, name: str | None = None, mark_public: bool | None = None, progress=None, total_cb=None) -> ImportReport:
    """Verify every manifest and blob of every named image in a layout, then store them.

    name: REGISTRY/REPO for descriptors whose ref.name is a bare tag (layouts made by other
    tools). mark_public: record the repositories as public (True) or private (False) when the
    bundle does not say; None leaves that to the cache's probe (online) — an offline cache
    serves only repositories it knows to be public.
    """
    report = ImportReport()
    if not os.path.exists(os.path.join(bundle, "oci-layout")):
        raise LayoutError(f"{bundle}: not an OCI image layout (no oci-layout file)")
    index = read_index(bundle)
    work: list[tuple[ImageRef, str, dict, dict[str, tuple[str, bytes]], dict[str, int]]] = []
    for desc in index["manifests"]:
        annotations = desc.get("annotations") or {}
        ref_name = annotations.get(REF_NAME)
        digest = desc.get("digest")
        if not isinstance(digest, str):
            continue
        try:
            if not ref_name:
                raise ValueError("no org.opencontainers.image.ref.name annotation")
            if "/" not in ref_name and ":" not in ref_name.split("/")[-1] and "@" not in ref_name:
                if not name:
                    raise ValueError(f"ref.name {ref_name!r} names no repository; give --name REGISTRY/REPO")
                ref = parse_image(f"{name}:{ref_name}")
            else:
                ref = parse_image(ref_name)
        except ValueError as e:
            report.skipped.append((str(ref_name or digest), str(e)))
            continue
        # read and verify the manifest tree; collect the blobs it needs
        manifests: dict[str, tuple[str, bytes]] = {}
        blobs: dict[str, int] = {}
        try:
            todo = [(digest, desc.get("mediaType"))]
            while todo:
                d, mt = todo.pop()
                if d in manifests:
                    continue
                try:
                    body = _read_verified(bundle, d)
                except LayoutError:
                    if d != digest:  # a platform of an index that was not exported
                        continue
                    raise
                media_type = mt or oci.manifest_media_type(body, None)
                manifests[d] = (media_type, body)
                refs = manifest_refs(body)
                todo.extend((c, cmt or None) for c, cmt, _p in refs.manifests)
                for b in refs.blobs:
                    path = blob_path(bundle, b)
                    if not os.path.exists(path):
                        raise LayoutError(f"{b}: missing from the bundle")
                    blobs[b] = os.path.getsize(path)
        except LayoutError as e:
            report.skipped.append((str(ref), str(e)))
            continue
        work.append((ref, digest, annotations, manifests, blobs))
    if total_cb:
        total_cb(sum(size for *_rest, blobs in work for size in blobs.values()))
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
            report.manifests += 1
        if ref.tag:
            checked = annotations.get(CHECKED_AT)
            try:
                checked_at = float(checked) if checked else time.time()
            except ValueError:
                checked_at = time.time()
            store.set_tag(ref.registry, ref.repo, ref.tag, manifests[top][0], top, now=checked_at)
        public = annotations.get(PUBLIC)
        if public in ("true", "false"):
            store.tags.set(("public", ref.registry, ref.repo), (public == "true", time.time()))
        elif mark_public is not None:
            store.tags.set(("public", ref.registry, ref.repo), (mark_public, time.time()))
        report.images.append(str(ref))
    return report


def _import_blob(store: Store, bundle: str, digest: str, progress=None) -> int:
    """Copy a bundle blob into a staging file while hashing; commit only if it verifies."""
    d = oci.parse_digest(digest)
    src = blob_path(bundle, digest)
    staging, out = store.new_staging_file(digest)
    committed = False
    try:
        h = d.hasher()
        with open(src, "rb") as f, out:
            n = hash_copy(f.read, h, out.write, progress)
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

"""Deterministic test images for the world.

Every image is generated from seeded ``random.Random`` content, tar entries
with fixed mtimes/owners and gzip with ``mtime=0``, so its digests are the same
on every run (on the same zlib; tests should still read digests from
``World.images`` rather than hard-code them).

Each image is written as an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/...``) and also as a containers-image ``dir:`` layout that
shares the same blob files (hard links).  Pushing uses skopeo with
``--all --preserve-digests``: from ``oci:`` for OCI-typed images and from
``dir:`` for Docker-typed ones, because skopeo's ``oci:`` source assumes OCI
media types for the children of an index (a Docker manifest list would be
mangled) while ``dir:`` keeps manifest bytes exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

# media types
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

TAR_MTIME = 1700000000  # 2023-11-14T22:13:20Z, fixed
CREATED = "2023-11-14T22:13:20Z"

# registry name as users write it -> host that serves it
REGISTRY_HOSTS = {
    "docker.io": "registry-1.docker.io",
    "quay.io": "quay.io",
    "gcr.io": "gcr.io",
    "registry.k8s.io": "registry.k8s.io",
    "ghcr.io": "ghcr.io",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


def canonical_json(obj) -> bytes:
    return json.dumps(obj, indent=3).encode()


# --------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class LayerSpec:
    """A layer is identified by ``name``: same name -> same bytes (shared layers)."""

    name: str
    size: int = 4096  # bytes of random payload in the layer's data file
    compresslevel: int = 6


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, s: str) -> "Platform":
        parts = s.split("/")
        return cls(parts[0], parts[1], parts[2] if len(parts) > 2 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def as_json(self) -> dict:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d


@dataclass(frozen=True)
class ImageSpec:
    registry: str  # "docker.io", "quay.io", ...
    repository: str  # "library/small"
    tag: str
    # "oci" (OCI manifest), "docker" (schema2), "oci-index", "docker-list"
    kind: str = "oci"
    layers: tuple[LayerSpec, ...] = ()
    platforms: tuple[str, ...] = ("linux/amd64",)  # for index kinds: one child each

    @property
    def ref(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def slug(self) -> str:
        return self.ref.replace("/", "_").replace(":", "_")


def _L(name, size=4096, level=6):
    return LayerSpec(name, size, level)


KiB, MiB = 1024, 1024 * 1024

# The default image set.  Layers with the same name are byte-identical, so
# "base-amd64" is shared between several images/registries (dedup tests).
DEFAULT_SPECS: tuple[ImageSpec, ...] = (
    ImageSpec("docker.io", "library/small", "1", "oci",
              (_L("base-amd64", 8 * KiB), _L("small-1", 4 * KiB), _L("small-2", 16 * KiB))),
    ImageSpec("docker.io", "library/s2", "1", "docker",
              (_L("base-amd64", 8 * KiB), _L("s2-1", 12 * KiB))),
    ImageSpec("docker.io", "library/multi", "1", "docker-list",
              (_L("multi-app", 6 * KiB),), ("linux/amd64", "linux/arm64/v8")),
    ImageSpec("docker.io", "library/big", "1", "oci",
              (_L("big-30m", 30 * MiB, 0),)),
    ImageSpec("docker.io", "private/secret", "1", "oci",
              (_L("secret-1", 4 * KiB),)),
    # Same name as docker.io/library/small:1, other contents: a cache that mixes up registries
    # serves one for the other.
    ImageSpec("quay.io", "library/small", "1", "oci",
              (_L("quay-small-1", 6 * KiB), _L("quay-small-2", 5 * KiB))),
    ImageSpec("quay.io", "org/s2", "1", "docker",
              (_L("base-amd64", 8 * KiB), _L("quay-s2-1", 10 * KiB))),
    ImageSpec("quay.io", "org/multi-oci", "1", "oci-index",
              (_L("multi-oci-app", 5 * KiB),), ("linux/amd64", "linux/arm64/v8")),
    ImageSpec("gcr.io", "proj/small", "1", "oci",
              (_L("base-amd64", 8 * KiB), _L("gcr-small-1", 3 * KiB))),
    ImageSpec("registry.k8s.io", "pause", "1", "docker",
              (_L("pause-1", 2 * KiB),)),
    ImageSpec("ghcr.io", "owner/small", "1", "oci",
              (_L("ghcr-small-1", 4 * KiB), _L("ghcr-small-2", 4 * KiB))),
)


# --------------------------------------------------------------------------
# built images


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    def as_json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = self.platform.as_json()
        return d


@dataclass
class ChildManifest:
    platform: str  # "linux/arm64/v8"
    digest: str
    media_type: str
    size: int
    config_digest: str
    layer_digests: list[str]

    @property
    def blobs(self) -> list[str]:
        return [self.config_digest, *self.layer_digests]


@dataclass
class Image:
    """One pushed image (what ``World.images`` lists)."""

    registry: str  # "docker.io"
    host: str  # "registry-1.docker.io"
    repository: str
    tag: str
    digest: str  # manifest (or index) digest, as the registry reports it
    media_type: str
    size: int  # manifest bytes
    blobs: list[str]  # every config+layer digest, children included, unique
    layer_sizes: dict[str, int]  # blob digest -> size (configs included)
    children: list[ChildManifest] = field(default_factory=list)
    oci_layout: Path | None = None
    dir_layout: Path | None = None
    kind: str = "oci"

    @property
    def ref(self) -> str:
        """``docker.io/library/small:1``"""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def host_ref(self) -> str:
        """``registry-1.docker.io/library/small:1`` (what a client really talks to)"""
        return f"{self.host}/{self.repository}:{self.tag}"

    @property
    def manifest_digest(self) -> str:
        """Same as ``digest`` (the top-level manifest or index digest)."""
        return self.digest

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def platform_digests(self) -> dict[str, str]:
        return {c.platform: c.digest for c in self.children}

    @property
    def config_digest(self) -> str | None:
        return None if self.is_index else self.children[0].config_digest if self.children else None

    def child(self, platform: str) -> ChildManifest:
        for c in self.children:
            if c.platform == platform or c.platform.startswith(platform + "/"):
                return c
        raise KeyError(platform)

    def as_dict(self) -> dict:
        return {
            "ref": self.ref,
            "registry": self.registry,
            "host": self.host,
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "blobs": self.blobs,
            "children": [c.__dict__ for c in self.children],
        }


class _Store:
    """Blob store for one layout directory."""

    def __init__(self, root: Path):
        self.root = root
        self.blobdir = root / "blobs" / "sha256"
        self.blobdir.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> tuple[str, int]:
        d = sha256(data)
        p = self.blobdir / d.split(":", 1)[1]
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return d, len(data)

    def path(self, digest: str) -> Path:
        return self.blobdir / digest.split(":", 1)[1]


# cache of generated layer bytes within one process: name -> (blob, diff_id)
_layer_cache: dict[tuple, tuple[bytes, str]] = {}


def _tarinfo(name: str, *, size=0, mode=0o644, type_=tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = mode
    ti.type = type_
    ti.mtime = TAR_MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def build_layer(spec: LayerSpec) -> tuple[bytes, str]:
    """Return (gzip blob, diff_id) for a layer spec; deterministic."""
    key = (spec.name, spec.size, spec.compresslevel)
    if key in _layer_cache:
        return _layer_cache[key]
    rng = random.Random(_seed("layer", spec.name, spec.size))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        d = f"opt/{spec.name}"
        for dname in ("etc", "opt", d):
            tf.addfile(_tarinfo(dname + "/", mode=0o755, type_=tarfile.DIRTYPE))
        text = (
            f"NAME=regcache-test\nLAYER={spec.name}\nSEED={rng.getrandbits(64):016x}\n"
        ).encode()
        tf.addfile(_tarinfo(f"etc/{spec.name}-release", size=len(text)), io.BytesIO(text))
        payload = rng.randbytes(spec.size)
        tf.addfile(_tarinfo(f"{d}/data.bin", size=len(payload)), io.BytesIO(payload))
        hello = f"#!/bin/sh\necho 'hello from {spec.name}'\n".encode()
        tf.addfile(_tarinfo("hello", size=len(hello), mode=0o755), io.BytesIO(hello))
    tar = raw.getvalue()
    diff_id = sha256(tar)
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0,
                       compresslevel=spec.compresslevel) as g:
        g.write(tar)
    blob = gz.getvalue()
    _layer_cache[key] = (blob, diff_id)
    return blob, diff_id


def _platform_layers(spec: ImageSpec, platform: Platform) -> list[LayerSpec]:
    if not spec.kind.endswith(("index", "list")):
        return list(spec.layers)
    # per-platform: a base layer for the arch + the image's own layers, made
    # distinct per arch so the children really differ
    base = _L(f"base-{platform.architecture}", 8 * KiB)
    return [base] + [LayerSpec(f"{l.name}-{platform.architecture}", l.size, l.compresslevel)
                     for l in spec.layers]


def _build_single(store: _Store, spec: ImageSpec, platform: Platform, docker: bool):
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    layer_descs: list[Descriptor] = []
    diff_ids: list[str] = []
    history = []
    for l in _platform_layers(spec, platform):
        blob, diff_id = build_layer(l)
        dg, size = store.put(blob)
        layer_descs.append(Descriptor(layer_type, dg, size))
        diff_ids.append(diff_id)
        history.append({"created": CREATED, "created_by": f"/bin/sh -c #(nop) ADD {l.name}"})
    config = {
        "architecture": platform.architecture,
        "os": platform.os,
        **({"variant": platform.variant} if platform.variant else {}),
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/hello"],
            "Labels": {"org.opencontainers.image.title": spec.ref},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    cfg_dg, cfg_size = store.put(canonical_json(config))
    mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": Descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, cfg_dg, cfg_size).as_json(),
        "layers": [d.as_json() for d in layer_descs],
    }
    mbytes = canonical_json(manifest)
    mdg, msize = store.put(mbytes)
    child = ChildManifest(str(platform), mdg, mtype, msize, cfg_dg, [d.digest for d in layer_descs])
    sizes = {cfg_dg: cfg_size, **{d.digest: d.size for d in layer_descs}}
    return child, mbytes, sizes


def build_image(spec: ImageSpec, root: Path) -> Image:
    """Write ``spec`` as an OCI layout at ``root/<slug>`` (+ a ``dir:`` view)."""
    layout = Path(root) / spec.slug
    store = _Store(layout)
    docker = spec.kind.startswith("docker")
    children: list[ChildManifest] = []
    sizes: dict[str, int] = {}
    child_bytes: dict[str, bytes] = {}
    for p in spec.platforms if spec.kind in ("oci-index", "docker-list") else spec.platforms[:1]:
        c, mb, sz = _build_single(store, spec, Platform.parse(p), docker)
        children.append(c)
        child_bytes[c.digest] = mb
        sizes.update(sz)

    if spec.kind in ("oci-index", "docker-list"):
        mtype = DOCKER_LIST if docker else OCI_INDEX
        index = {
            "schemaVersion": 2,
            "mediaType": mtype,
            "manifests": [
                Descriptor(c.media_type, c.digest, c.size, Platform.parse(c.platform)).as_json()
                for c in children
            ],
        }
        top = canonical_json(index)
        top_dg, top_size = store.put(top)
    else:
        mtype = children[0].media_type
        top_dg, top_size = children[0].digest, children[0].size
        top = child_bytes[top_dg]

    # OCI layout
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    oci_index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": mtype,
                "digest": top_dg,
                "size": top_size,
                "annotations": {"org.opencontainers.image.ref.name": spec.tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(oci_index, indent=2))

    # dir: view (containers/image "dir" transport): manifest.json, blobs by
    # hex, child manifests as <hex>.manifest.json
    dview = Path(root) / (spec.slug + ".dir")
    dview.mkdir(parents=True, exist_ok=True)
    (dview / "version").write_text("Directory Transport Version: 1.1\n")
    (dview / "manifest.json").write_bytes(top)
    if mtype in INDEX_TYPES:
        for dg, b in child_bytes.items():
            (dview / (dg.split(":", 1)[1] + ".manifest.json")).write_bytes(b)
    for dg in sizes:
        target = dview / dg.split(":", 1)[1]
        if not target.exists():
            try:
                os.link(store.path(dg), target)
            except OSError:
                target.write_bytes(store.path(dg).read_bytes())

    blobs: list[str] = []
    for c in children:
        for b in c.blobs:
            if b not in blobs:
                blobs.append(b)
    return Image(
        registry=spec.registry,
        host=REGISTRY_HOSTS.get(spec.registry, spec.registry),
        repository=spec.repository,
        tag=spec.tag,
        digest=top_dg,
        media_type=mtype,
        size=top_size,
        blobs=blobs,
        layer_sizes=sizes,
        children=children,
        oci_layout=layout,
        dir_layout=dview,
        kind=spec.kind,
    )


def build_all(root: Path, specs=DEFAULT_SPECS) -> list[Image]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return [build_image(s, root) for s in specs]


def skopeo_source(img: Image) -> str:
    """The skopeo source reference used to push ``img`` (see module doc)."""
    if img.media_type in (OCI_MANIFEST, OCI_INDEX):
        return f"oci:{img.oci_layout}:{img.tag}"
    return f"dir:{img.dir_layout}"

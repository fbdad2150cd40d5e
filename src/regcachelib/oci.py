"""Pure OCI distribution protocol: routes, names, digests, media types, errors, ranges.

Nothing here does I/O; everything is tested without a proxy.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

# --- registry identity -----------------------------------------------------------

DOCKER_HUB = "docker.io"
# Every name Docker Hub is reached by; they are one registry.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# Where Docker Hub's API actually lives.
DOCKER_HUB_API_HOST = "registry-1.docker.io"


def canonical_registry(host: str) -> str:
    """Registry identity of a host name: lowercase, default port dropped, Hub aliases folded."""
    host = host.strip().lower().rstrip(".")
    if host.endswith(":443"):
        host = host[:-4]
    if host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host


def api_host(registry: str) -> str:
    """The host that serves a registry's /v2 API."""
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


# --- repository names and references ------------------------------------------------

# distribution's grammar (reference/regexp.go): path components separated by "/".
# Always applied with fullmatch: "$" would also match before a trailing newline.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_NAME_LENGTH = 255

_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([A-Za-z0-9=_-]+)$")
SUPPORTED_ALGORITHMS = {"sha256": 64, "sha512": 128}


# The one table of OCI error codes and the HTTP status each is answered with (distribution-spec
# "Error Codes", plus UNAVAILABLE and UNKNOWN for a cache that cannot reach its upstream).
ERROR_STATUS = {
    "BLOB_UNKNOWN": 404,
    "MANIFEST_UNKNOWN": 404,
    "NAME_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "DIGEST_INVALID": 400,
    "MANIFEST_INVALID": 400,
    "RANGE_INVALID": 416,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "TOOMANYREQUESTS": 429,
    "UNSUPPORTED": 405,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,
}


class RegistryError(Exception):
    """An answer in OCI error form: what the request gets instead of content.

    Raised by the protocol parsers and the services; the addons turn it into a response in one
    place. headers are sent along (a WWW-Authenticate that starts a client's token flow).
    """

    def __init__(self, status: int, code: str, message: str, detail: object = None, headers=(),
                 outcome: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = list(headers)
        self.outcome = outcome  # how the cache's log and statistics count it (UNKNOWN...), if at all

    @classmethod
    def of(cls, code: str, message: str, detail: object = None, headers=(), outcome: str | None = None):
        """The error with the status the table gives its code."""
        return cls(ERROR_STATUS[code], code, message, detail, headers, outcome)

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


# The protocol parsers' name for it; one type all the same.
ProtocolError = RegistryError


def refusal_code(status: int, kind: str) -> str:
    """The code of a refusal with this status, for a blob or a manifest."""
    if status == 404:
        return "BLOB_UNKNOWN" if kind == BLOB else "MANIFEST_UNKNOWN"
    return {401: "UNAUTHORIZED", 403: "DENIED"}.get(status, "NAME_UNKNOWN")


def error_body(code: str, message: str, detail: object = None) -> bytes:
    """An OCI distribution-spec error document."""
    err: dict = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return json.dumps({"errors": [err]}).encode()


def validate_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise RegistryError.of("NAME_INVALID", "invalid repository name", {"name": name[:300]})
    for component in name.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise RegistryError.of("NAME_INVALID", "invalid repository name", {"name": name})
    return name


def normalise_name(registry: str, name: str) -> str:
    """Docker Hub's single-component names live under library/."""
    if registry == DOCKER_HUB and "/" not in name:
        return "library/" + name
    return name


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self):
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


def parse_digest(text: str) -> Digest:
    m = _DIGEST.fullmatch(text)
    if not m:
        raise RegistryError.of("DIGEST_INVALID", "invalid digest", {"digest": text[:200]})
    algorithm, hexpart = m.group(1), m.group(2)
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise RegistryError.of("DIGEST_INVALID", "unsupported digest algorithm", {"digest": text[:200]})
    if len(hexpart) != SUPPORTED_ALGORITHMS[algorithm] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise RegistryError.of("DIGEST_INVALID", "invalid digest", {"digest": text[:200]})
    return Digest(algorithm, hexpart)


def valid_digest(text: object) -> str | None:
    """The digest as text if it is a well-formed, supported digest; else None."""
    if not isinstance(text, str):
        return None
    try:
        return str(parse_digest(text))
    except RegistryError:
        return None


def referenced_digests(body: bytes) -> list[str]:
    """Every well-formed digest a manifest points at: an index's manifests, config, layers.

    What upstream serves under a repository whose manifest names it, so the repository is
    known to hold each of them (the membership index, see store.Store.learn_manifest).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(doc, dict):
        return []

    def listed(key: str) -> list:
        value = doc.get(key)
        return value if isinstance(value, list) else []

    found: list[object] = []
    for entry in listed("manifests") + [doc.get("config")] + listed("layers") + listed("blobs"):
        if isinstance(entry, dict):
            found.append(entry.get("digest"))
    for layer in listed("fsLayers"):  # schema 1
        if isinstance(layer, dict):
            found.append(layer.get("blobSum"))
    digests = [d for d in map(valid_digest, found) if d]
    return list(dict.fromkeys(digests))


def is_digest(reference: str) -> bool:
    return ":" in reference


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- routes --------------------------------------------------------------------------

BLOB = "blob"
MANIFEST = "manifest"


@dataclass(frozen=True)
class Route:
    """A /v2 request this cache answers: a blob or manifest fetch."""

    kind: str  # BLOB | MANIFEST
    name: str  # repository, normalised
    reference: str  # tag or digest string
    digest: Digest | None  # parsed when the reference is a digest

    @property
    def is_tag(self) -> bool:
        return self.digest is None


_ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<ref>[^/]+)$")


def parse_route(registry: str, path: str) -> Route | None:
    """Classify a /v2 path.

    Returns None for API traffic the cache does not handle (the /v2/ ping, uploads, tag
    lists, referrers...): those pass through untouched. Raises ProtocolError for requests
    that look like blob/manifest fetches but are malformed; they must never reach the store.
    """
    raw = path.split("?", 1)[0]
    if not raw.startswith("/v2/"):
        return None
    # Percent-encoding is legal on the wire but never needed in valid names or
    # references; decoding first means "%2e%2e" is judged as "..".
    decoded = unquote(raw)
    if "\x00" in decoded or "\\" in decoded:
        raise RegistryError.of("NAME_INVALID", "invalid characters in request path")
    m = _ROUTE.fullmatch(decoded)
    if not m:
        return None
    name, kind, ref = m.group("name"), m.group("kind"), m.group("ref")
    if name.endswith("/blobs/uploads") or "/blobs/uploads/" in decoded:
        return None  # pushes are not cached
    validate_name(name)
    name = normalise_name(registry, name)
    if kind == "blobs":
        if ref == "uploads":
            return None
        return Route(BLOB, name, ref, parse_digest(ref))
    if is_digest(ref):
        digest = parse_digest(ref)
        return Route(MANIFEST, name, str(digest), digest)
    if not _TAG.fullmatch(ref):
        raise RegistryError.of("MANIFEST_INVALID", "invalid tag", {"tag": ref[:200]})
    return Route(MANIFEST, name, ref, None)


# --- media types -------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1)
# The OCI spec caps manifests at 4 MiB; registries reject larger ones.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def accepted_media_types(accept_headers: list[str]) -> set[str] | None:
    """Media types a client accepts, from all its Accept headers.

    None means "anything": no Accept header at all, or a wildcard. Registries then answer
    with whatever the manifest is, so the cache may too.
    """
    types: set[str] = set()
    for header in accept_headers:
        for part in header.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if not media_type:
                continue
            if media_type in ("*/*", "application/*"):
                return None
            types.add(media_type)
    return types or None


def client_accepts(media_type: str, accepted: set[str] | None) -> bool:
    if accepted is None:
        return True
    mt = media_type.lower()
    if mt in accepted:
        return True
    # schema1 comes signed or not; a client asking for one takes the other.
    schema1 = {DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED}
    return mt in schema1 and bool(accepted & schema1)


def manifest_media_type(body: bytes, content_type: str | None) -> str:
    """The media type of a manifest: the upstream's Content-Type, else the document's own."""
    if content_type:
        mt = content_type.split(";", 1)[0].strip()
        if mt and mt not in ("application/json", "application/octet-stream", "text/plain"):
            return mt
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON from upstream
        return content_type or "application/octet-stream"
    if isinstance(doc, dict):
        if isinstance(doc.get("mediaType"), str):
            return doc["mediaType"]
        if doc.get("schemaVersion") == 1:
            return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
        if "manifests" in doc:
            return OCI_INDEX
        return OCI_MANIFEST
    return content_type or "application/octet-stream"


# --- Range -----------------------------------------------------------------------------


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single byte range (inclusive start, exclusive end) from a Range header.

    None means "the whole body". Multiple ranges are answered with the whole body, which
    RFC 9110 permits. An unsatisfiable range raises ProtocolError(416).
    """
    if not header:
        return None
    header = header.strip()
    if not header.lower().startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    first, last = first.strip(), last.strip()
    try:
        if first == "":
            if not _ascii_digits(last):
                return None
            length = int(last)
            if length == 0 or size == 0:
                raise RegistryError.of("RANGE_INVALID", "unsatisfiable range", {"size": size})
            return (max(0, size - length), size)
        if not _ascii_digits(first) or (last and not _ascii_digits(last)):
            return None
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        raise RegistryError.of("RANGE_INVALID", "unsatisfiable range", {"size": size})
    return (start, min(end, size))


def _ascii_digits(text: str) -> bool:
    # str.isdigit() also accepts "²" and "١"; HTTP's DIGIT is ASCII only.
    return text.isascii() and text.isdigit()

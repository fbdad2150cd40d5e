"""Pre-pulling images: straight into the store (reusing upstream.Upstream and fill.Fills, as
the proxy does) or through a running cache's registry mirror.

Both speak the registry API as a client does: manifest by tag with every manifest media type
accepted, the platforms asked for out of an index, then config and layers; a 401 with a
Bearer challenge is answered with an anonymous token from the challenge's realm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlencode

from . import oci
from .fill import Fills
from .inventory import ImageRef, format_platform, parse_image, platform_matches
from .store import Store
from .upstream import Target, Upstream, UpstreamError, fetch_bearer_token

log = logging.getLogger(__name__)

ACCEPT = ", ".join(oci.MANIFEST_MEDIA_TYPES)
INDEX_TYPES = (oci.OCI_INDEX, oci.DOCKER_LIST)


def registry_error_text(body: bytes) -> str:
    """What a registry's error body says, for a person: the OCI errors' codes and messages
    ("MANIFEST_UNKNOWN: manifest unknown"), else the start of the text; printable only."""
    text = ""
    try:
        errors = json.loads(body).get("errors")
        if isinstance(errors, list):
            text = "; ".join(
                ": ".join(str(e[k]) for k in ("code", "message") if isinstance(e, dict) and e.get(k)) for e in errors
            )
    except (ValueError, AttributeError):
        pass
    if not text:
        text = body.decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())[:200]
    return f" ({text})" if text else ""


class WarmError(Exception):
    pass


class RegistryClient:
    """A blocking registry client for one registry, with anonymous Bearer token auth.

    mirror: (host, port) of a running regcache's plain-HTTP mirror listener; requests then
    go there with ?ns=<registry> (the way containerd names the registry to a mirror).
    """

    def __init__(
        self,
        upstream: Upstream,
        registry: str,
        mirror: tuple[str, int] | None = None,
        credentials: tuple[str, str] | None = None,
    ):
        self.upstream = upstream
        self.registry = registry
        self.mirror = mirror
        self.credentials = credentials
        if mirror:
            self.target = Target(mirror[0], mirror[1], "http")
        else:
            self.target = Target(oci.api_host(registry))
        self._tokens: dict[str, str] = {}  # repo -> Authorization header value

    def path(self, path: str) -> str:
        if self.mirror:
            return path + ("&" if "?" in path else "?") + urlencode({"ns": self.registry})
        return path

    def auth_headers(self, repo: str) -> list[tuple[str, str]]:
        token = self._tokens.get(repo)
        return [("Authorization", token)] if token else []

    def request(self, method: str, repo: str, path: str, headers: list[tuple[str, str]] = ()):
        """Send a request; on a Bearer 401 fetch a token once and retry. Caller closes."""
        resp = self.upstream.request(method, self.target, self.path(path), [*headers, *self.auth_headers(repo)])
        if resp.status != 401:
            return resp
        challenge = resp.header("www-authenticate")
        resp.close()
        token = self._token(repo, challenge)
        if token is None:
            raise WarmError(
                f"{self.registry}/{repo}: 401 Unauthorized and no anonymous token " f"({challenge or 'no challenge'})"
            )
        self._tokens[repo] = token
        return self.upstream.request(method, self.target, self.path(path), [*headers, ("Authorization", token)])

    def _token(self, repo: str, challenge: str | None) -> str | None:
        token = fetch_bearer_token(self.upstream, challenge, repo, self.credentials, allow_http=True)
        return f"Bearer {token}" if token else None

    def manifest(self, repo: str, reference: str) -> tuple[str, str, bytes]:
        """(digest, media type, body) of a manifest, verified."""
        resp = self.request("GET", repo, f"/v2/{repo}/manifests/{reference}", [("Accept", ACCEPT)])
        try:
            if resp.status != 200:
                body = resp.read_all(64 * 1024) if resp.status != 304 else b""
                raise WarmError(
                    f"{self.registry}/{repo}:{reference}: manifest: upstream answered "
                    f"{resp.status}{registry_error_text(body)}"
                )
            body = resp.read_all(oci.MAX_MANIFEST_BYTES)
            media_type = oci.manifest_media_type(body, resp.header("content-type"))
            claimed = resp.header("docker-content-digest")
        finally:
            resp.close()
        digest = oci.sha256_digest(body)
        if oci.is_digest(reference):
            if not oci.parse_digest(reference).matches(body):
                raise WarmError(f"{self.registry}/{repo}@{reference}: manifest does not match its digest")
            digest = reference
        elif claimed and claimed.startswith("sha256:") and claimed != digest:
            raise WarmError(
                f"{self.registry}/{repo}:{reference}: manifest hashes to {digest}, " f"upstream claims {claimed}"
            )
        return digest, media_type, body


@dataclass
class WarmReport:
    images: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifests: int = 0
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0


def images_from_misses(path: str) -> list[str]:
    """Images named in a miss log: every tag pulled, plus digests pulled from repositories
    no tag of which was pulled. In first-seen order, without repeats."""
    tags: dict[tuple[str, str], list[str]] = {}
    digests: dict[tuple[str, str], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("kind") != "manifest":
                continue
            registry, repo, ref = rec.get("registry"), rec.get("repo"), rec.get("reference")
            if not (isinstance(registry, str) and isinstance(repo, str) and isinstance(ref, str)):
                continue
            bucket = digests if oci.is_digest(ref) else tags
            refs = bucket.setdefault((registry, repo), [])
            if ref not in refs:
                refs.append(ref)
    out = []
    for (registry, repo), refs in tags.items():
        out += [f"{registry}/{repo}:{r}" for r in refs]
    for (registry, repo), refs in digests.items():
        if (registry, repo) not in tags:
            out += [f"{registry}/{repo}@{r}" for r in refs]
    return out


class Warmer:
    """Pulls images into a store (direct) or through a running cache (mirror)."""

    def __init__(
        self,
        upstream: Upstream,
        store: Store | None,
        platforms: list[str],
        mirror: tuple[str, int] | None = None,
        jobs: int = 4,
        stats=None,
        progress=None,
        credentials=None,
    ):
        self.upstream = upstream
        self.store = store
        self.platforms = platforms or ["linux/amd64"]
        self.mirror = mirror
        self.jobs = max(1, jobs)
        self.stats = stats
        self.progress = progress  # callable(done_bytes, total_bytes, label)
        self.credentials = credentials
        self.clients: dict[str, RegistryClient] = {}
        self.report = WarmReport()
        self._done_bytes = 0
        self._total_bytes = 0

    def client(self, registry: str) -> RegistryClient:
        if registry not in self.clients:
            self.clients[registry] = RegistryClient(self.upstream, registry, self.mirror, self.credentials)
        return self.clients[registry]

    def run(self, images: list[str]) -> WarmReport:
        t0 = time.monotonic()
        asyncio.run(self._run(images))
        self.report.seconds = time.monotonic() - t0
        if self.stats is not None:
            self.stats.flush()
        return self.report

    async def _run(self, images: list[str]) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="regcache-warm")
        direct = self.store is not None and self.mirror is None
        fills = Fills(self.store, self.upstream, max_workers=self.jobs) if direct else None
        if fills is not None:
            fills.stats = self.stats
        try:
            for text in images:
                try:
                    ref = parse_image(text)
                except ValueError as e:
                    self.report.failed.append((text, str(e)))
                    continue
                try:
                    await self._image(loop, executor, fills, ref)
                    self.report.images.append(str(ref))
                except (WarmError, UpstreamError, ValueError, OSError) as e:
                    self.report.failed.append((str(ref), str(e)))
                except Exception as e:  # noqa: BLE001 - one image's failure must not stop the others
                    log.exception("warming %s failed", ref)
                    self.report.failed.append((str(ref), f"{e.__class__.__name__}: {e}"))
        finally:
            executor.shutdown(wait=True)
            if fills is not None:
                fills.shutdown()

    async def _image(self, loop, executor, fills, ref: ImageRef) -> None:
        client = self.client(ref.registry)
        digest, media_type, body = await loop.run_in_executor(executor, client.manifest, ref.repo, ref.reference)
        self._keep_manifest(ref, digest, media_type, body, tag=ref.tag)
        manifests = [(digest, media_type, body)]
        doc = json.loads(body)
        lists_manifests = isinstance(doc, dict) and isinstance(doc.get("manifests"), list) and "layers" not in doc
        if media_type in INDEX_TYPES or lists_manifests:
            children = [m for m in doc.get("manifests") or [] if isinstance(m, dict) and "digest" in m]
            chosen = [m for m in children if any(platform_matches(m.get("platform"), p) for p in self.platforms)]
            if not chosen:
                have = ", ".join(format_platform(m.get("platform")) for m in children)
                raise WarmError(f"{ref}: no manifest for {', '.join(self.platforms)} (the index has {have})")
            manifests = []
            for m in chosen:
                d, mt, b = await loop.run_in_executor(executor, client.manifest, ref.repo, m["digest"])
                self._keep_manifest(ref, d, mt, b)
                manifests.append((d, mt, b))
        blobs: dict[str, int | None] = {}
        for _d, _mt, b in manifests:
            doc = json.loads(b)
            config = [doc.get("config")] if isinstance(doc.get("config"), dict) else []
            for desc in config + list(doc.get("layers") or []):
                if isinstance(desc, dict) and isinstance(desc.get("digest"), str):
                    blobs.setdefault(desc["digest"], desc.get("size"))
            for layer in doc.get("fsLayers") or []:
                if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str):
                    blobs.setdefault(layer["blobSum"], None)
        todo = {}
        for d, size in blobs.items():
            if self.store is not None and self.mirror is None and self.store.has_blob(d):
                self.report.blobs_cached += 1
            else:
                todo[d] = size
        self._total_bytes += sum(s or 0 for s in todo.values())
        self._tick(str(ref))
        if fills is not None:
            await self._fill_blobs(fills, client, ref, todo)
        else:
            sem = asyncio.Semaphore(self.jobs)

            async def one(d):
                async with sem:
                    await loop.run_in_executor(executor, self._read_blob, client, ref, d)

            await asyncio.gather(*(one(d) for d in todo))

    def _keep_manifest(self, ref: ImageRef, digest: str, media_type: str, body: bytes, tag: str | None = None) -> None:
        self.report.manifests += 1
        if self.store is None or self.mirror is not None:
            return  # the running cache keeps what passes through it
        self.store.put_manifest(digest, media_type, body)
        # fetched under this repository: it holds the manifest and what it references
        self.store.learn_manifest(ref.registry, ref.repo, digest, body)
        if tag:
            self.store.set_tag(ref.registry, ref.repo, tag, media_type, digest)
        if self.credentials is None:
            # fetched anonymously: the repository is public, as the proxy's own probe would find
            # (an offline cache serves only repositories it knows to be public)
            self.store.set_public(ref.registry, ref.repo, True)
        self.store.log_miss(
            {
                "registry": ref.registry,
                "repo": ref.repo,
                "reference": tag or digest,
                "digest": digest,
                "kind": "manifest",
                "media_type": media_type,
                "size": len(body),
                "outcome": "WARM",
            }
        )

    async def _fill_blobs(
        self, fills: Fills, client: RegistryClient, ref: ImageRef, todo: dict[str, int | None]
    ) -> None:
        sem = asyncio.Semaphore(self.jobs)

        async def one(d: str):
            async with sem:
                for attempt in (1, 2):
                    digest = oci.parse_digest(d)
                    fill = fills.start(
                        digest,
                        ref.registry,
                        ref.repo,
                        client.target,
                        f"/v2/{ref.repo}/blobs/{d}",
                        client.auth_headers(ref.repo),
                    )
                    before = 0
                    while not fill.done:
                        await fill.wait_for_change()
                        self._done_bytes += fill.written - before
                        before = fill.written
                        self._tick(str(ref))
                    self._done_bytes += fill.written - before
                    if fill.status == 401 and attempt == 1:
                        # token expired (or none yet): get one, then retry once
                        resp = await asyncio.get_running_loop().run_in_executor(
                            None, client.request, "HEAD", ref.repo, f"/v2/{ref.repo}/blobs/{d}"
                        )
                        resp.close()
                        continue
                    if not fill.ok:
                        raise WarmError(f"{ref}: blob {d}: {fill.failure or fill.status}")
                    if fill.no_room:
                        raise WarmError(f"{ref}: blob {d}: cache disk full")
                    self.report.blobs_fetched += 1
                    self.report.bytes_fetched += fill.written
                    self.store.log_miss(
                        {
                            "registry": ref.registry,
                            "repo": ref.repo,
                            "reference": d,
                            "digest": d,
                            "kind": "blob",
                            "media_type": fill.content_type,
                            "size": fill.written,
                            "outcome": "WARM",
                        }
                    )
                    return

        results = await asyncio.gather(*(one(d) for d in todo), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0] if isinstance(errors[0], WarmError) else WarmError(str(errors[0]))

    def _read_blob(self, client: RegistryClient, ref: ImageRef, d: str) -> None:
        """Through a running cache: GET the blob, check its digest, throw the bytes away."""
        digest = oci.parse_digest(d)
        resp = client.request("GET", ref.repo, f"/v2/{ref.repo}/blobs/{d}")
        try:
            if resp.status != 200:
                raise WarmError(f"{ref}: blob {d}: upstream answered {resp.status}")
            h = digest.hasher()
            n_total = 0
            while True:
                chunk = resp.read(1024 * 1024)
                if not chunk:
                    break
                h.update(chunk)
                n_total += len(chunk)
                self._done_bytes += len(chunk)
                self._tick(str(ref))
        finally:
            resp.close()
        if h.hexdigest() != digest.hex:
            raise WarmError(f"{ref}: blob {d}: the cache sent bytes that hash to {digest.algorithm}:{h.hexdigest()}")
        self.report.blobs_fetched += 1
        self.report.bytes_fetched += n_total

    def _tick(self, label: str) -> None:
        if self.progress is not None:
            self.progress(self._done_bytes, max(self._total_bytes, self._done_bytes), label)

"""The manifest service: tags, their TTL and revalidation, stale answers, misses, the /v2/ ping.

`ManifestService.get(request)` answers with

    Answer(manifest, outcome)       from the store (HIT, REVALIDATED, STALE) or upstream (MISS)
    Relay(status, headers, body)    what upstream answered (401 with its challenge, 404...)

or raises oci.RegistryError; `ping(request)` answers the /v2/ version check. Concurrent
identical upstream requests are made once (single flight), and a follower is served the
leader's answer only with its own access (access.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import oci
from .access import Access
from .blobs import Relay
from .concurrency import Flights, Workers
from .config import Config
from .credentials import UpstreamCredentials
from .request import RegistryRequest
from .store import Manifest, Store
from .upstream import Target, Upstream, UpstreamError, fetch

log = logging.getLogger(__name__)

_HEAD_KEPT = ("content-type", "docker-content-digest", "www-authenticate", "etag")


@dataclass(frozen=True)
class Answer:
    manifest: Manifest
    outcome: str  # HIT | MISS | REVALIDATED | STALE
    warning: str | None = None  # a Warning header (stale answers)


@dataclass(frozen=True)
class _Upstream:
    """One upstream manifest answer; own: asked with this client's own credentials."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    own: bool

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def _answered_digest(route: oci.Route, method: str, answer: _Upstream) -> str | None:
    """The digest a 200 manifest answer is for, or None when it cannot be told."""
    if answer.status != 200:
        return None
    if route.digest is not None:
        return str(route.digest)
    if method == "GET":
        return oci.sha256_digest(answer.body)
    return oci.valid_digest(answer.header("docker-content-digest"))


def _unanswered(status: int) -> bool:
    """An upstream answer that says nothing about the tag: a server error, or 429 (a pull limit)."""
    return status >= 500 or status == 429


def _why(status: int) -> str:
    return "upstream answered 429 (pull rate limit)" if status == 429 else f"upstream answered {status}"


class ManifestService:
    def __init__(self, config: Config, store: Store, upstream: Upstream, access: Access, workers: Workers,
                 credentials: UpstreamCredentials | None = None, tier=None):
        self.tier = tier  # tier.Tier: a local miss reads the shared object store first
        self.config = config
        self.credentials = credentials  # regcache's own accounts, for clients without credentials
        self.store = store
        self.upstream = upstream
        self.access = access
        self.workers = workers
        self.flights: Flights = Flights()
        # an open registry's anonymous /v2/ answer: target -> (monotonic time, status, headers, body)
        self.ping_cache: dict[Target, tuple[float, int, list, bytes]] = {}

    # --- the /v2/ ping ------------------------------------------------------------------------

    async def ping(self, req: RegistryRequest) -> Relay:
        """The /v2/ version check every client starts with.

        Relayed from upstream (its 401 starts the client's token flow); answered by regcache
        itself when offline or when upstream is unreachable, so cached images stay pullable.
        """
        anonymous = req.anonymous and req.method == "GET"
        cached = self.ping_cache.get(req.target) if anonymous else None
        if not req.offline and cached and time.monotonic() - cached[0] <= self.config.tag_ttl:
            # A warm pull within the tag TTL opens no upstream connection. Only an open
            # registry's 200 is kept: it is also what regcache answers when upstream is down,
            # whereas a kept 401 would send clients to a token service that may be down too.
            return Relay(*cached[1:])
        if not req.offline:
            try:
                status, headers, body = await self.workers.upstream_call(
                    req.endpoint, fetch, self.upstream, req.method, req.target, "/v2/", req.header_list())
            except UpstreamError as e:
                log.warning("%s unreachable (%s); answering /v2/ from the cache", req.target.host, e)
            else:
                if status < 500 and status != 429:
                    if anonymous and status == 200:
                        self.ping_cache[req.target] = (time.monotonic(), status, headers, body)
                    return Relay(status, headers, body)
        return Relay(200, [("Content-Type", "application/json")], b"{}")

    # --- manifests -----------------------------------------------------------------------------

    async def get(self, req: RegistryRequest) -> Answer | Relay:
        route = req.route
        assert route is not None
        if route.digest is not None:
            manifest = await self._stored(route.reference)
            if manifest is not None:
                await self.access.require(req, manifest.digest)
                return Answer(manifest, "HIT")
            self._refuse_offline(req, {"digest": route.reference})
            return await self._miss(req)
        entry = self.store.find_tag(req.registry, route.name, route.reference, req.accepted)
        manifest = await self._stored(entry.digest) if entry else None
        if manifest is not None:
            fresh = time.time() - entry.checked_at <= self.config.tag_ttl
            if req.offline or fresh:
                await self.access.require(req, manifest.digest)
                return Answer(manifest, "HIT" if fresh else "STALE")
            return await self._revalidate(req, manifest)
        self._refuse_offline(req, {"tag": route.reference})
        return await self._miss(req)

    async def _stored(self, digest: str) -> Manifest | None:
        """The manifest from the local store, else from the tier's object store (kept locally)."""
        manifest = self.store.get_manifest(digest)
        if manifest is not None or self.tier is None:
            return manifest
        return await self.workers.store_write(self._from_tier, digest)

    def _from_tier(self, digest: str) -> Manifest | None:
        shared = self.tier.get_manifest(digest)
        if shared is None:
            return None
        media_type, body = shared
        try:
            self.store.put_manifest(digest, media_type, body, share=False)
        except Exception as e:  # noqa: BLE001 - a full disk must not fail the pull
            log.warning("manifest %s from the tier served but not stored: %s", digest, e)
        return Manifest(digest, media_type, body)

    def _refuse_offline(self, req: RegistryRequest, detail: dict) -> None:
        if req.offline:
            raise oci.RegistryError.of("MANIFEST_UNKNOWN", "manifest unknown to the cache (offline)", detail,
                                       outcome="UNKNOWN")

    async def _ask_upstream(self, req: RegistryRequest, method: str) -> _Upstream:
        """One upstream manifest request shared by concurrent identical requests.

        A follower whose leader was refused (401/403) asks again with its own credentials; one
        served the leader's 200 gets it only with its own access. Raises UpstreamError and
        RegistryError (refused to this client).
        """
        route = req.route
        path = req.upstream_path()
        client_headers = [h for h in req.header_list() if h[0].lower() != "range"]
        headers = client_headers
        if self.credentials is not None:
            headers = await self.credentials.headers(req, client_headers, self.access, self.workers)
        key = (method, req.registry, route.name, route.reference, tuple(sorted(req.accepted or ())))

        async def ask():
            nonlocal headers
            answer = await self.workers.upstream_call(req.endpoint, fetch, self.upstream, method, req.target, path,
                                                      headers)
            if answer[0] in (401, 403) and headers is not client_headers:
                # regcache's account was refused (a revoked token): the client hears its own answer
                self.credentials.refused(req.registry, answer[0])
                headers = client_headers
                answer = await self.workers.upstream_call(req.endpoint, fetch, self.upstream, method, req.target,
                                                          path, headers)
            return answer

        (status, up_headers, body), leader = await self.flights.run(key, ask)
        answer = _Upstream(status, up_headers, body, leader)
        if leader:
            return answer
        shared_digest = _answered_digest(route, method, answer)
        if status in (401, 403) or (status == 200 and shared_digest is None):
            # The leader's credentials were refused (this client may hold better ones), or the
            # shared answer names no digest to check this client's access against: ask as itself.
            status, up_headers, body = await ask()
            return _Upstream(status, up_headers, body, True)
        if status == 200:
            # Another client's answer: upstream says the repository holds it, but whether
            # *this* client may have it is decided as for a cache hit.
            await self.workers.store_write(self.store.add_members, req.registry, route.name, [shared_digest])
            await self.access.require(req, shared_digest)
        return answer

    async def _miss(self, req: RegistryRequest, cached: Manifest | None = None) -> Answer | Relay:
        """Fetch the manifest upstream; cached: what the tag named until now, answered stale when
        upstream cannot give the new one (down, 5xx, 429: Docker Hub's pull limit)."""
        if req.method == "HEAD":
            return await self._head_miss(req, cached)
        route = req.route
        try:
            answer = await self._ask_upstream(req, "GET")
        except UpstreamError as e:
            if cached is not None:
                return await self._stale(req, cached, str(e))
            log.warning("manifest %s/%s:%s not served: %s", req.registry, route.name, route.reference, e)
            raise self._unavailable(req, e) from None
        if cached is not None and _unanswered(answer.status):
            return await self._stale(req, cached, _why(answer.status))
        if answer.status != 200:
            return Relay(answer.status, answer.headers, answer.body, f"UPSTREAM_{answer.status}")
        body = answer.body
        media_type = oci.manifest_media_type(body, answer.header("content-type"))
        digest = oci.sha256_digest(body)
        claimed = answer.header("docker-content-digest")
        if route.digest is not None and not route.digest.matches(body):
            log.warning("upstream sent a manifest for %s that hashes differently; not cached",
                        route.reference)
            raise oci.RegistryError(502, "MANIFEST_INVALID", "upstream manifest does not match its digest",
                                    {"digest": route.reference})
        if route.digest is not None:
            digest = route.reference
        elif claimed and claimed.startswith("sha256:") and claimed != digest:
            log.warning("manifest %s/%s:%s hashes to %s but upstream claims %s; not cached",
                        req.registry, route.name, route.reference, digest, claimed)
            raise oci.RegistryError(502, "MANIFEST_INVALID",
                                    "upstream manifest does not match its Docker-Content-Digest")
        if answer.own:
            self.access.probe_later(req)
            await self.workers.store_write(self._keep, req, Manifest(digest, media_type, body))
        return Answer(Manifest(digest, media_type, body), "MISS")

    def _keep(self, req: RegistryRequest, manifest: Manifest) -> None:
        """Blocking: store a manifest upstream served this client, its tag, and the miss."""
        route = req.route
        try:
            self.store.put_manifest(manifest.digest, manifest.media_type, manifest.body)
            self.store.learn_manifest(req.registry, route.name, manifest.digest, manifest.body)
            if route.is_tag:
                self.store.set_tag(req.registry, route.name, route.reference, manifest.media_type, manifest.digest)
        except Exception as e:  # noqa: BLE001 - a full disk must not fail the pull
            log.warning("manifest %s of %s/%s served but not stored: %s",
                        manifest.digest, req.registry, route.name, e)
        self.store.log_miss({"registry": req.registry, "repo": route.name, "reference": route.reference,
                             "digest": manifest.digest, "kind": "manifest", "media_type": manifest.media_type,
                             "size": len(manifest.body), "outcome": "MISS"})

    def _unavailable(self, req: RegistryRequest, e: Exception) -> oci.RegistryError:
        return oci.RegistryError.of("UNAVAILABLE", f"upstream unavailable and manifest not cached: {e}",
                                    {"reference": req.route.reference})

    async def _head_miss(self, req: RegistryRequest, cached: Manifest | None = None) -> Answer | Relay:
        """A HEAD stays a HEAD upstream (free of Docker Hub's pull limit); its answer still
        teaches the tag's digest, so the GET by digest that follows completes the entry."""
        route = req.route
        try:
            answer = await self._ask_upstream(req, "HEAD")
        except UpstreamError as e:
            if cached is not None:
                return await self._stale(req, cached, str(e))
            raise self._unavailable(req, e) from None
        if cached is not None and _unanswered(answer.status):
            return await self._stale(req, cached, _why(answer.status))
        digest, content_type = answer.header("docker-content-digest"), answer.header("content-type")
        if answer.status == 200:
            await self.workers.store_write(self._learn_head, req, digest, content_type)
        keep = [(k, v) for k, v in answer.headers if k.lower() in _HEAD_KEPT]
        ok = answer.status == 200
        return Relay(answer.status, keep, b"", "MISS" if ok else f"UPSTREAM_{answer.status}",
                     "MISS" if ok else None, answer.header("content-length"))

    def _learn_head(self, req: RegistryRequest, digest: str | None, content_type: str | None) -> None:
        route = req.route
        if oci.valid_digest(digest):
            self.store.add_members(req.registry, route.name, [digest])
        if route.is_tag and digest and content_type:
            try:
                media_type = oci.manifest_media_type(b"", content_type)
                if oci.client_accepts(media_type, req.accepted):
                    self.store.set_tag(req.registry, route.name, route.reference, media_type,
                                       str(oci.parse_digest(digest)))
            except Exception as e:  # noqa: BLE001 - a malformed digest or a full disk: not recorded
                log.warning("tag %s/%s:%s not recorded: %s", req.registry, route.name, route.reference, e)

    async def _revalidate(self, req: RegistryRequest, cached: Manifest) -> Answer | Relay:
        """A tag past its TTL: HEAD upstream (free of Docker Hub's pull limit) and compare digests."""
        route = req.route
        try:
            answer = await self._ask_upstream(req, "HEAD")
        except UpstreamError as e:
            return await self._stale(req, cached, str(e))
        if answer.status == 200:
            if answer.header("docker-content-digest") == cached.digest:
                await self.workers.store_write(self.store.set_tag, req.registry, route.name, route.reference,
                                               cached.media_type, cached.digest)
                return Answer(cached, "REVALIDATED")
            # The tag moved: the new manifest, or the one it named until now when upstream
            # will not give it (Docker Hub answers HEADs past the pull limit, not GETs).
            return await self._miss(req, cached)
        if _unanswered(answer.status):
            return await self._stale(req, cached, _why(answer.status))
        # 401/403/404: the client hears what upstream said (its token flow, or a deleted tag).
        headers, body = answer.headers, b""
        if req.method == "GET" and answer.status in (401, 403, 404):
            code = oci.refusal_code(answer.status, oci.MANIFEST)
            body = oci.error_body(code, f"upstream answered {answer.status}")
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", "application/json"))
        return Relay(answer.status, headers, body, f"UPSTREAM_{answer.status}")

    async def _stale(self, req: RegistryRequest, cached: Manifest, why: str) -> Answer:
        await self.access.require(req, cached.digest)
        log.warning("serving stale %s/%s:%s (%s): %s",
                    req.registry, req.route.name, req.route.reference, cached.digest, why)
        return Answer(cached, "STALE", '110 regcache "Response is stale"')

"""The blob service: what a blob request gets, decided without a flow.

`BlobService.get(request)` answers with one of

    Hit(digest, size, fastpath)     stored, and this client may have it
    Follow(fill, fastpath)          a download in progress (one per digest) this client may follow
    Relay(status, headers, body)    what upstream answered (a HEAD miss, a refused download)
    Uncached(reason)                caching is impossible now: the request goes upstream as it is

or raises oci.RegistryError. The bodies themselves come from the blob server (blobserver.py),
in-band through mitmproxy or over the fast path, both reading the store or following the fill.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import oci
from .access import Access
from .concurrency import Workers
from .config import Config
from .credentials import UpstreamCredentials
from .fill import Fill, Fills
from .request import RegistryRequest
from .store import Store
from .upstream import Upstream, UpstreamError, fetch

log = logging.getLogger(__name__)

_HEAD_KEPT = ("content-type", "docker-content-digest", "www-authenticate", "etag", "accept-ranges")


@dataclass(frozen=True)
class Hit:
    digest: str
    size: int | None  # known for a HEAD
    fastpath: bool  # answered with a redirect to the fast path, else streamed in-band


@dataclass(frozen=True)
class Follow:
    fill: Fill
    fastpath: bool


@dataclass(frozen=True)
class Redirect:
    """A blob the cache tier's bucket holds: a 307 to a short-lived presigned URL (tier.py)."""

    digest: str
    location: str


@dataclass(frozen=True)
class Relay:
    """An answer as upstream gave it; outcome None: not counted (a refused download)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    outcome: str | None = None
    cache_status: str | None = None
    length: str | None = None  # Content-Length of a HEAD answer


@dataclass(frozen=True)
class Uncached:
    reason: str


BlobResult = Hit | Follow | Relay | Uncached | Redirect


def learn_from_download(store: Store):
    """What a fill's worker thread records when upstream answers 200 for a blob: the repository
    holds the digest (the membership index), and the miss (the miss log)."""

    def learn(fill: Fill, content_type: str, size: int | None) -> None:
        digest = str(fill.digest)
        store.add_members(fill.registry, fill.repo, [digest])
        store.log_miss({"registry": fill.registry, "repo": fill.repo, "reference": digest, "digest": digest,
                        "kind": "blob", "media_type": content_type, "size": size, "outcome": "MISS"})

    return learn


class BlobService:
    def __init__(self, config: Config, store: Store, upstream: Upstream, fills: Fills, access: Access,
                 workers: Workers, fastpath_port: Callable[[], int], credentials: UpstreamCredentials | None = None,
                 tier=None):
        self.config = config
        self.credentials = credentials  # regcache's own accounts, for clients without credentials
        self.store = store
        self.upstream = upstream
        self.fills = fills
        self.access = access
        self.workers = workers
        self.fastpath_port = fastpath_port  # the blob server's, once it listens (0: none)
        self.tier = tier  # tier.Tier: the fills read the shared object store first (TierSource)

    async def get(self, req: RegistryRequest) -> BlobResult:
        digest = str(req.digest)
        if req.method == "HEAD":
            size = self.store.blob_size(digest)
            if size is not None:
                await self.access.require(req, digest)
                return Hit(digest, size, fastpath=False)
            self._refuse_offline(req, digest)
            if self.tier is not None:
                size = await self.workers.store_write(self.tier.blob_size, digest)
                if size is not None:
                    await self.access.require(req, digest)
                    return Hit(digest, size, fastpath=False)
            return await self._head_miss(req, digest)
        if self.store.has_blob(digest):
            await self.access.require(req, digest)
            return Hit(digest, None, self.use_fastpath(req))
        self._refuse_offline(req, digest)
        if self.tier is not None and self.tier.config.redirect:
            url = await self.workers.store_write(self.tier.presigned_blob_url, digest)
            if url is not None:
                await self.access.require(req, digest)  # before any URL is issued
                return Redirect(digest, url)
        return await self._download(req, digest)

    def _refuse_offline(self, req: RegistryRequest, digest: str) -> None:
        if req.offline:
            raise oci.RegistryError.of("BLOB_UNKNOWN", "blob unknown to the cache (offline)", {"digest": digest},
                                       outcome="UNKNOWN")

    async def _download(self, req: RegistryRequest, digest: str) -> BlobResult:
        """Lead or follow the one download of this digest."""
        client_headers = [h for h in req.header_list() if h[0].lower() != "range"]
        headers = client_headers
        if self.credentials is not None:
            headers = await self.credentials.headers(req, client_headers, self.access, self.workers)
        path = req.upstream_path()
        fill, leader = self.fills.join(req.digest, req.registry, req.repository, req.target, path, headers)
        await fill.headers_ready.wait()
        if fill.status in (401, 403) and leader and headers is not client_headers:
            # regcache's account was refused (a revoked token): the client's own download
            self.credentials.refused(req.registry, fill.status)
            headers = client_headers
            fill, leader = self.fills.join(req.digest, req.registry, req.repository, req.target, path, headers)
            await fill.headers_ready.wait()
        if fill.no_room:
            # Caching is impossible right now; the pull must still work: straight upstream.
            log.warning("passing %s/%s blob %s through uncached: cache disk full",
                        req.registry, req.repository, digest)
            return Uncached("cache disk full")
        if fill.status != 200 and fill.status in (401, 403) and not leader:
            # The leader's credentials were refused; this client may hold better ones.
            fill, _ = self.fills.join(req.digest, req.registry, req.repository, req.target, path, headers)
            await fill.headers_ready.wait()
        if fill.status != 200:
            return self._failed(req, fill)
        if leader and self.tier is not None:
            # the bytes may come from the shared store, not from upstream answering this client:
            # the access rule applies as for a hit (membership is stored already, learn_from_download)
            await self.access.require(req, digest)
        elif leader:
            # what the download taught is stored already (learn_from_download)
            self.access.probe_later(req)
        else:
            # a follower rides on another client's download only with its own access
            await self.access.require(req, digest)
        return Follow(fill, self.use_fastpath(req))

    def _failed(self, req: RegistryRequest, fill: Fill) -> Relay:
        log.warning("blob %s %s/%s not served: %s", req.digest, req.registry, req.repository, fill.failure)
        if fill.upstream_headers:
            return Relay(fill.status, fill.upstream_headers, fill.error_body)
        if fill.status == 502:
            raise oci.RegistryError.of("UNAVAILABLE", f"upstream {req.target.host} unavailable and blob not cached",
                                       {"digest": str(req.digest)})
        raise oci.RegistryError.of("UNKNOWN", f"blob fetch failed: {fill.failure}")

    async def _head_miss(self, req: RegistryRequest, digest: str) -> Relay:
        """A HEAD miss goes upstream as a HEAD (never a GET), through regcache's own client so
        a dead upstream gets a fast OCI error and its back-off applies."""
        try:
            status, up_headers, _ = await self.workers.upstream_call(
                req.endpoint, fetch, self.upstream, "HEAD", req.target, req.upstream_path(),
                req.header_list(("authorization", "user-agent")))
        except UpstreamError as e:
            raise oci.RegistryError.of("UNAVAILABLE", f"upstream unavailable and blob not cached: {e}",
                                       {"digest": digest}, outcome="UNAVAILABLE") from None
        if status == 200:
            await self.workers.store_write(self.store.add_members, req.registry, req.repository, [digest])
        keep = [(k, v) for k, v in up_headers if k.lower() in _HEAD_KEPT]
        length = next((v for k, v in up_headers if k.lower() == "content-length"), None)
        ok = status == 200
        return Relay(status, keep, b"", "MISS" if ok else f"UPSTREAM_{status}", "MISS" if ok else None, length)

    def use_fastpath(self, req: RegistryRequest) -> bool:
        """Whether a blob GET is answered with a redirect to the fast path."""
        if self.config.fastpath == "off" or not self.fastpath_port():
            return False
        # Bytes of a repository not known to be public stay inside TLS; a client that gets them
        # over plain HTTP anyway (a mirror on http://) loses nothing on the fast path.
        if (not self.config.fastpath_private and not req.plain_http
                and not self.access.known_public(req.registry, req.repository)[0]):
            return False
        # auto and always alike, HTTPS_PROXY clients included: skopeo, podman, containerd and dockerd
        # follow the redirect straight to :5080 (NO_PROXY names the cache host, or no HTTP_PROXY),
        # or back through an HTTP_PROXY that is us (served in-band), or through another proxy,
        # whence the blob server sends it back to the https URL (tests/e2e/test_fastpath_clients.py)
        return True

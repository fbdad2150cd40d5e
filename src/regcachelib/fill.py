"""Single-flight blob fills: one upstream download per digest, shared by every reader.

A Fill downloads one blob in a worker thread into a locked staging file, hashing as it goes.
Readers on the event loop follow the growing file. The last bytes are held back until the
digest is verified, so no client ever receives a complete body of a wrong blob: a mismatch
ends every reader's response short, and nothing enters the store.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from . import oci
from .concurrency import Flights
from .store import Store
from .upstream import MAX_ERROR_BODY, Target, Upstream, UpstreamUnavailable

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
PUBLISH_BYTES = 1024 * 1024
# Bytes withheld from readers until the digest checks out.
HOLDBACK = 64 * 1024


class FillFailed(Exception):
    pass


class Fill:
    """One in-flight download of a blob."""

    def __init__(self, loop: asyncio.AbstractEventLoop, digest: oci.Digest, repo: str, registry: str):
        self.loop = loop
        self.digest = digest
        self.registry = registry
        self.repo = repo
        self.started = time.time()
        # Set once upstream's status line and headers are known.
        self.headers_ready = asyncio.Event()
        self.status = 0
        self.upstream_headers: list[tuple[str, str]] = []
        self.error_body = b""
        self.size: int | None = None
        self.content_type = "application/octet-stream"
        self.staging_path: str | None = None
        # Progress, written by the worker thread and published to the loop.
        self.written = 0
        self.verified = False
        self.done = False
        self.failure: str | None = None
        # The cache filesystem has no room for this blob: requesters fetch it uncached.
        self.no_room = False
        self._status_published = False  # worker-thread side: has a status gone out yet
        self._changed = asyncio.Event()
        self.stats = None  # stats.Stats: upstream bytes of a completed download are counted
        # on_found(fill, content type, size): told in the worker thread once upstream answered 200
        self.on_found = None

    # --- what readers see --------------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.failure is None

    def available(self) -> int:
        """Bytes a reader may send now."""
        if self.verified:
            return self.written
        if self.size is None:
            return 0
        return min(self.written, max(0, self.size - HOLDBACK))

    async def wait_for_change(self) -> None:
        event = self._changed
        if self.done:
            return
        await event.wait()

    # --- worker-thread side ------------------------------------------------------------

    def _publish(self, **changes) -> None:
        """Apply progress on the event loop thread and wake readers."""

        if "status" in changes:
            self._status_published = True

        def apply():
            for k, v in changes.items():
                setattr(self, k, v)
            if "status" in changes:
                self.headers_ready.set()
            event, self._changed = self._changed, asyncio.Event()
            event.set()

        self.loop.call_soon_threadsafe(apply)

    def run(self, upstream: Upstream, store: Store, target: Target, path: str, headers: list[tuple[str, str]]) -> None:
        """Download, verify, commit. Runs in a worker thread; never raises."""
        staging = None
        try:
            try:
                resp = upstream.request("GET", target, path, headers)
            except UpstreamUnavailable as e:
                self._publish(status=502, failure=f"upstream unavailable: {e}", done=True)
                return
            try:
                if resp.status != 200:
                    body = resp.read_all(MAX_ERROR_BODY) if resp.status not in (204, 304) else b""
                    self._publish(status=resp.status, upstream_headers=resp.headers, error_body=body,
                                  failure=f"upstream answered {resp.status}", done=True)
                    return
                # A layer's body may take long: per-read timeouts apply to it, not the exchange's deadline.
                resp.end_deadline()
                size = resp.content_length
                if not store.has_room(size):
                    log.warning("cache disk full: %s (%s bytes) passes through uncached", self.digest, size)
                    self._publish(status=200, no_room=True, failure="cache disk full", done=True)
                    return
                try:
                    staging, f = store.new_staging_file(str(self.digest))
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        self._publish(status=200, no_room=True, failure="cache disk full", done=True)
                    else:
                        self._publish(status=500, failure=f"cannot create staging file: {e}", done=True)
                    return
                content_type = resp.header("content-type") or "application/octet-stream"
                if self.on_found is not None:
                    # Before anyone hears of the 200: every reader of this fill then finds what it
                    # taught (the repository holds the digest) already stored.
                    try:
                        self.on_found(self, content_type, size)
                    except Exception as e:  # noqa: BLE001 - a full disk must not fail the pull
                        log.warning("blob %s of %s/%s: not recorded: %s", self.digest, self.registry, self.repo, e)
                self._publish(
                    status=200,
                    upstream_headers=resp.headers,
                    size=size,
                    content_type=content_type,
                    staging_path=staging,
                )
                hasher = self.digest.hasher()
                written = published = 0
                pending: list[bytes] = []
                pending_len = 0
                with f:
                    while True:
                        # read1 returns what has arrived (a TLS record, 4-16 KiB). Records are
                        # gathered while more are ready, then written, hashed and shown to
                        # readers together: per-record work (and a loop wake-up per record)
                        # would cost more than the download itself.
                        chunk = resp.read1(CHUNK)
                        if chunk:
                            pending.append(chunk)
                            pending_len += len(chunk)
                            if size is not None and written + pending_len > size:
                                raise FillFailed(f"upstream sent more than its Content-Length {size}")
                            if pending_len < CHUNK and resp.more_ready():
                                continue
                        if pending:
                            data = b"".join(pending) if len(pending) > 1 else pending[0]
                            pending.clear()
                            pending_len = 0
                            f.write(data)
                            hasher.update(data)
                            written += len(data)
                        # Wake readers once per MiB, and always before waiting on the network,
                        # so they never wait for bytes that are already on disk.
                        due = written - published >= PUBLISH_BYTES or not chunk or not resp.more_ready()
                        if written > published and due:
                            f.flush()
                            published = written
                            self._publish(written=written)
                        if not chunk:
                            break
                    if size is not None and written != size:
                        raise FillFailed(f"short body: {written} of {size} bytes")
                    if hasher.hexdigest() != self.digest.hex:
                        raise FillFailed("digest mismatch: upstream bytes hash to "
                                         f"{self.digest.algorithm}:{hasher.hexdigest()}")
                    try:
                        os.fsync(f.fileno())
                        # Commit while the staging lock is still held, so a sweep cannot race it.
                        store.commit_blob(str(self.digest), staging, written)
                        staging = None
                    except Exception as e:  # noqa: BLE001
                        # The bytes are verified: readers that have the file open finish
                        # their pull; it is only not kept.
                        log.warning("blob %s verified but not stored: %s", self.digest, e)
                self._publish(size=written, written=written, verified=True, done=True)
                if self.stats is not None and not getattr(resp, "from_tier", False):  # tier.py: not upstream
                    self.stats.upstream_bytes(self.registry, written)
                log.debug("fill of %s done (%d bytes)", self.digest, written)
            except BaseException:
                resp.discard()  # a body not read to its end never goes back to the pool
                raise
            finally:
                resp.close()  # back to the pool when the body was read to its end
        except FillFailed as e:
            log.warning("blob %s from %s/%s not cached: %s", self.digest, self.registry, self.repo, e)
            self._publish(failure=str(e), done=True)
        except Exception as e:  # noqa: BLE001 - a fill must never take the proxy down
            disk_full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            reason = "disk full" if disk_full else f"{e.__class__.__name__}: {e}"
            log.warning("blob %s from %s/%s not cached: %s", self.digest, self.registry, self.repo, reason)
            # Waiters block on headers_ready: a failure before any status must still wake them.
            status = {} if self._status_published else {"status": 502}
            self._publish(failure=reason, done=True, **status)
        finally:
            if staging is not None:
                try:
                    os.unlink(staging)
                except FileNotFoundError:
                    pass


class Fills:
    """The in-flight fills of this process, keyed by digest (a Flights registry)."""

    def __init__(self, store: Store, upstream: Upstream, max_workers: int = 32, executor=None, on_found=None):
        self.store = store
        self.on_found = on_found  # handed to every Fill (see Fill.on_found)
        self.upstream = upstream
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="regcache-fill")
        self.flights: Flights[Fill] = Flights()
        self.stats = None  # stats.Stats handed to every Fill

    @property
    def inflight(self) -> dict[str, Fill]:
        return {str(fill.digest): fill for fill in self.flights.values()}

    def get(self, digest: str) -> Fill | None:
        return self.flights.get(digest)

    def start(self, digest: oci.Digest, registry: str, repo: str, target: Target, path: str,
              headers: list[tuple[str, str]]) -> Fill:
        """The fill for a digest: the one in flight, or a new one."""
        return self.join(digest, registry, repo, target, path, headers)[0]

    def join(self, digest: oci.Digest, registry: str, repo: str, target: Target, path: str,
             headers: list[tuple[str, str]]) -> tuple[Fill, bool]:
        """(fill, leader): the fill in flight for the digest, or a new one this caller leads
        (registered synchronously, before any await, so a concurrent request always finds it).
        A failed fill is not joined: the next request tries again."""
        key = str(digest)
        loop = asyncio.get_running_loop()

        def start() -> Fill:
            fill = Fill(loop, digest, repo, registry)
            fill.stats = self.stats
            fill.on_found = self.on_found
            future = loop.run_in_executor(self.executor, fill.run, self.upstream, self.store, target, path, headers)
            future.add_done_callback(lambda _f: loop.call_soon(self.flights.forget, key, fill))
            return fill

        return self.flights.join(key, start, reusable=lambda fill: not (fill.done and not fill.ok))

    def shutdown(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

"""Who runs what, and at most once: the single-flight primitive and the worker pools.

Everything regcache does that blocks (upstream HTTP, disk writes, hashing) runs in one of the
pools of `Workers`, never on mitmproxy's event loop; `Flights` makes concurrent identical work
(a manifest fetch, a publicness probe, a blob download) happen once, shared by every caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")

# Worker threads for upstream calls, and how many of them one upstream endpoint may hold: a
# slow (or hostile) upstream keeps its own requests waiting, never everyone else's.
UPSTREAM_WORKERS = 32
UPSTREAM_PER_ENDPOINT = 8
# Blob downloads run for as long as a layer takes: a pool of their own, so they never hold
# the workers manifests and access checks need.
FILL_WORKERS = 32
# Store writes (manifests, tags, membership, the miss log): short, and kept off the event loop.
STORE_WORKERS = 4


class Flights(Generic[T]):
    """The one in-flight piece of work per key.

    `join` registers synchronously (before any await), so a concurrent caller for the same key
    always finds it; `run` is the awaitable form: the leader runs the work, followers get its
    result (or its exception).
    """

    def __init__(self) -> None:
        self._inflight: dict[Hashable, T] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def get(self, key: Hashable) -> T | None:
        return self._inflight.get(key)

    def values(self) -> list[T]:
        return list(self._inflight.values())

    def join(self, key: Hashable, start: Callable[[], T],
             reusable: Callable[[T], bool] | None = None) -> tuple[T, bool]:
        """(the work in flight for key, False), or (start()'s new work, True) when there is none
        or the one there may not be joined (reusable says no)."""
        current = self._inflight.get(key)
        if current is not None and (reusable is None or reusable(current)):
            return current, False
        work = start()
        self._inflight[key] = work
        return work, True

    def forget(self, key: Hashable, work: T) -> None:
        if self._inflight.get(key) is work:
            del self._inflight[key]

    async def run(self, key: Hashable, work: Callable[[], Awaitable]) -> tuple[object, bool]:
        """(result, leader): work() runs once for concurrent callers with the same key."""
        future = self._inflight.get(key)
        if future is not None:
            return await asyncio.shield(future), False  # type: ignore[arg-type]
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future  # type: ignore[assignment]
        try:
            result = await work()
            future.set_result(result)
            return result, True
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: followers may be none
            raise
        finally:
            self.forget(key, future)  # type: ignore[arg-type]


class Workers:
    """The pools, and which runs what: upstream calls (bounded per endpoint), fills, store writes."""

    def __init__(self, upstream_workers: int = UPSTREAM_WORKERS, per_endpoint: int = UPSTREAM_PER_ENDPOINT,
                 fill_workers: int = FILL_WORKERS, store_workers: int = STORE_WORKERS) -> None:
        self.upstream = ThreadPoolExecutor(max_workers=upstream_workers, thread_name_prefix="regcache-upstream")
        self.fills = ThreadPoolExecutor(max_workers=fill_workers, thread_name_prefix="regcache-fill")
        self.store = ThreadPoolExecutor(max_workers=store_workers, thread_name_prefix="regcache-store")
        self.per_endpoint = per_endpoint
        # (host, port, address) -> how many of its upstream calls may hold a worker at once
        self._endpoint_slots: dict[tuple, asyncio.Semaphore] = {}

    async def upstream_call(self, endpoint: tuple, fn: Callable, *args):
        """Run a blocking upstream call in a worker, at most per_endpoint at once per endpoint."""
        slots = self._endpoint_slots.get(endpoint)
        if slots is None:
            if len(self._endpoint_slots) > 4096:  # endpoints are client-chosen: forget idle ones
                self._endpoint_slots = {k: v for k, v in self._endpoint_slots.items() if v.locked()}
            slots = self._endpoint_slots[endpoint] = asyncio.Semaphore(self.per_endpoint)
        async with slots:
            return await asyncio.get_running_loop().run_in_executor(self.upstream, fn, *args)

    def upstream_background(self, fn: Callable, *args) -> asyncio.Future:
        """A best-effort upstream call nobody waits for (a publicness probe)."""
        return asyncio.get_running_loop().run_in_executor(self.upstream, fn, *args)

    async def store_write(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.store, fn, *args)

    def shutdown(self) -> None:
        for pool in (self.upstream, self.fills, self.store):
            pool.shutdown(wait=False, cancel_futures=True)

"""Persisted counters: what the cache answered, how many bytes it saved.

The counters live in the store (`store.Counters`: rows (name, *labels) in the cache dir's
tags db, so they travel with the cache dir and survive restarts). Increments are buffered in memory (the event loop
only touches a dict) and written with diskcache's atomic `incr` by `flush()`: from a
background thread once a second in the proxy, at the end of a command in the CLI. Several
processes on one cache directory add up correctly.

Registry and repository names come from clients (any repository name; any registry name a
wildcard pattern in `registries` matches), so the rows they make are bounded: at most
MAX_REGISTRIES registries and MAX_REPOS_PER_REGISTRY repositories per registry are counted by
name, summed over every process (index rows in the same cache keep the tally); the rest are
counted under OTHER. What a snapshot holds is everything counted; which of it may be shown to
whom (private repositories) is decided by the reader (metrics.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .store import Counters

log = logging.getLogger(__name__)


# Bounds on client-chosen label values (rows in the store, series in /metrics).
MAX_REGISTRIES = 100
MAX_REPOS_PER_REGISTRY = 1000
OTHER = "(other)"  # registries / repositories past the bounds (never a valid name)
PRIVATE = "(private)"  # repositories a reader may not see by name (never a valid name)
# Rows of the admission tally: not counters a snapshot reports.
_INDEX = "index"

# Outcomes (as logged by the addon) that were answered from the store.
HIT_OUTCOMES = frozenset({"HIT", "REVALIDATED", "STALE"})
MISS_OUTCOMES = frozenset({"MISS"})


def outcome_class(outcome: str) -> str:
    if outcome in HIT_OUTCOMES:
        return "hit"
    if outcome in MISS_OUTCOMES:
        return "miss"
    return "other"


@dataclass
class RegistryStats:
    hits: int = 0
    misses: int = 0
    other: int = 0
    upstream_bytes: int = 0
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count

    @property
    def requests(self) -> int:
        return self.hits + self.misses + self.other

    @property
    def hit_ratio(self) -> float | None:
        answered = self.hits + self.misses
        return self.hits / answered if answered else None


@dataclass
class Snapshot:
    """Everything counted so far, summed over all processes that used the cache dir."""

    since: float | None = None
    registries: dict[str, RegistryStats] = field(default_factory=dict)
    served_bytes: int = 0  # sent to clients: blob bodies and manifests
    cache_bytes: int = 0  # of which read from stored content (blob files, manifest hits)
    upstream_bytes: int = 0  # fetched from upstream registries
    pulls: Counter = field(default_factory=Counter)  # (registry, repo) -> manifest GETs
    evictions: int = 0
    evicted_bytes: int = 0
    verify_failures: int = 0
    # registry -> repositories whose pulls are summed under PRIVATE (set by redacted())
    private_repositories: Counter = field(default_factory=Counter)
    raw: dict = field(default_factory=dict)

    def redacted(self, visible: Callable[[str, str], bool]) -> "Snapshot":
        """This snapshot with the pulls of every repository `visible` refuses summed into one
        (registry, PRIVATE) row per registry, and how many repositories that row holds."""
        pulls: Counter = Counter()
        private: Counter = Counter()
        for (registry, repo), count in self.pulls.items():
            if repo == OTHER or visible(registry, repo):
                pulls[(registry, repo)] += count
            else:
                pulls[(registry, PRIVATE)] += count
                private[registry] += 1
        return replace(self, pulls=pulls, private_repositories=private, raw={})

    @property
    def hits(self) -> int:
        return sum(r.hits for r in self.registries.values())

    @property
    def misses(self) -> int:
        return sum(r.misses for r in self.registries.values())

    @property
    def other(self) -> int:
        return sum(r.other for r in self.registries.values())

    @property
    def hit_ratio(self) -> float | None:
        answered = self.hits + self.misses
        return self.hits / answered if answered else None

    @property
    def saved_bytes(self) -> int:
        """Bytes clients received that did not have to come from upstream."""
        return max(0, self.served_bytes - self.upstream_bytes)

    def top_images(self, n: int = 10) -> list[tuple[str, str, int]]:
        return [(reg, repo, count) for (reg, repo), count in self.pulls.most_common(n)]

    def as_dict(self) -> dict:
        return {
            "since": self.since,
            "requests": self.hits + self.misses + self.other,
            "hits": self.hits,
            "misses": self.misses,
            "other": self.other,
            "hit_ratio": self.hit_ratio,
            "bytes": {
                "served": self.served_bytes,
                "from_cache": self.cache_bytes,
                "from_upstream": self.upstream_bytes,
                "saved": self.saved_bytes,
            },
            "registries": {
                name: {
                    "requests": r.requests,
                    "hits": r.hits,
                    "misses": r.misses,
                    "other": r.other,
                    "hit_ratio": r.hit_ratio,
                    "upstream_bytes": r.upstream_bytes,
                    "outcomes": {f"{k}:{o}": c for (k, o), c in sorted(r.outcomes.items())},
                }
                for name, r in sorted(self.registries.items())
            },
            "top_images": [{"image": f"{reg}/{repo}", "pulls": c} for reg, repo, c in self.top_images()],
            "private_repositories": dict(sorted(self.private_repositories.items())),
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
            "verify_failures": self.verify_failures,
        }


class Stats:
    """Buffered, process-safe counters over the store's Counters."""

    def __init__(self, cache: Counters, flush_interval: float = 1.0, max_registries: int = MAX_REGISTRIES,
                 max_repos: int = MAX_REPOS_PER_REGISTRY):
        self.cache = cache
        self.flush_interval = flush_interval
        self.max_registries = max_registries
        self.max_repos = max_repos
        self._pending: Counter = Counter()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._known: set[tuple] = set()
        # registry -> repositories counted by name: this process's view, so pending counts
        # stay bounded between flushes; flush() checks admissions against the shared tally
        self._named: dict[str, set[str]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- counting (cheap; safe from any thread) --------------------------------------------

    def add(self, *key, n: int = 1) -> None:
        if n:
            with self._lock:
                self._pending[key] += n

    def _labels(self, registry: str, repo: str | None = None) -> tuple[str, str | None]:
        """The names a count goes under: its own while within the bounds, else OTHER.
        Called with self._lock held."""
        if self._named is None:
            self._named = self._load_named()
        if registry != OTHER and registry not in self._named:
            if len(self._named) >= self.max_registries:
                return OTHER, (OTHER if repo is not None else None)
            self._named[registry] = set()
        if repo is None or registry == OTHER or repo == OTHER:
            return registry, (OTHER if registry == OTHER and repo is not None else repo)
        repos = self._named[registry]
        if repo not in repos:
            if len(repos) >= self.max_repos:
                return registry, OTHER
            repos.add(repo)
        return registry, repo

    def _load_named(self) -> dict[str, set[str]]:
        named: dict[str, set[str]] = {}
        for key in self._rows():
            name, labels = key[0], key[1:]
            if name in ("requests", "upstream_bytes", "pulls") and labels and labels[0] != OTHER:
                repos = named.setdefault(labels[0], set())
                if name == "pulls" and len(labels) == 2 and labels[1] != OTHER:
                    repos.add(labels[1])
        return named

    def request(self, registry: str, kind: str, outcome: str, repo: str | None = None, method: str = "GET",
                size: int | None = None) -> None:
        """One answered /v2 request, as logged by the addon."""
        with self._lock:
            pulled = kind == "manifest" and method == "GET" and repo and outcome_class(outcome) != "other"
            # only a pull makes a row of its own per repository, so only a pull takes a place
            registry, repo = self._labels(registry, repo if pulled else None)
            p = self._pending
            p[("requests", registry, kind, outcome)] += 1
            if pulled:
                p[("pulls", registry, repo)] += 1
            if kind == "manifest" and method == "GET" and size:
                cls = outcome_class(outcome)
                if cls == "hit":
                    p[("bytes", "served")] += size
                    p[("bytes", "cache")] += size
                elif cls == "miss":
                    p[("bytes", "served")] += size
                    p[("upstream_bytes", registry)] += size

    def served_bytes(self, n: int, from_store: bool) -> None:
        """Blob body bytes sent to a client (from a stored file, or following a download)."""
        with self._lock:
            self._pending[("bytes", "served")] += n
            if from_store:
                self._pending[("bytes", "cache")] += n

    def upstream_bytes(self, registry: str, n: int) -> None:
        with self._lock:
            registry, _ = self._labels(registry)
            self._pending[("upstream_bytes", registry)] += n

    # --- persisting --------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        with self._flush_lock:
            try:
                self.cache.ensure(("since",), time.time())
                with self.cache.transact():
                    for key, n in pending.items():
                        if key not in self._known:
                            key = self._admit(key)
                            # add() keeps an existing row; the tag lets snapshot() find it
                            self.cache.ensure(key, 0)
                            self._known.add(key)
                        self.cache.incr(key, n)
            except Exception as e:  # noqa: BLE001 - counting must never break serving
                log.warning("could not persist statistics: %s", e)
                with self._lock:
                    self._pending.update(pending)

    def _admit(self, key: tuple) -> tuple:
        """The row a counter new to this process goes to, within the bounds summed over every
        process on this cache (inside flush's transaction, so two processes cannot both take
        the last place). Index rows: (_INDEX, "registry", name) marks a registry
        counted by name, (_INDEX, "registries") and (_INDEX, "repos", registry)
        count them."""
        name, labels = key[0], key[1:]
        if name not in ("requests", "upstream_bytes", "pulls") or not labels or labels[0] == OTHER:
            return key
        registry = labels[0]
        marker = (_INDEX, "registry", registry)
        if marker not in self.cache:
            tally = (_INDEX, "registries")
            if self.cache.get(tally, 0) >= self.max_registries:
                return (name, OTHER, *((OTHER,) if name == "pulls" else labels[1:]))
            self.cache.ensure(tally, 0)
            self.cache.incr(tally)
            self.cache.set(marker, 1)
        if name == "pulls" and labels[1] != OTHER and key not in self.cache:
            tally = (_INDEX, "repos", registry)
            if self.cache.get(tally, 0) >= self.max_repos:
                return (name, registry, OTHER)
            self.cache.ensure(tally, 0)
            self.cache.incr(tally)
        return key

    def start(self) -> None:
        """Flush from a daemon thread every flush_interval seconds."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(self.flush_interval):
                self.flush()

        self._thread = threading.Thread(target=loop, name="regcache-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self._thread = None
        self.flush()

    # --- reading --------------------------------------------------------------------------------

    def _rows(self) -> dict[tuple, float]:
        """Every persisted counter (index rows included)."""
        return self.cache.rows()

    def values(self) -> dict[tuple, float]:
        """Every persisted counter plus what is still buffered here."""
        out = {key: value for key, value in self._rows().items() if key[0] != _INDEX}
        with self._lock:
            for key, n in self._pending.items():
                out[key] = out.get(key, 0) + n
        return out

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        values = self.values()
        snap.raw = values
        for key, value in values.items():
            name, labels = key[0], key[1:]
            value = int(value) if name != "since" else value
            if name == "since":
                snap.since = value
            elif name == "requests" and len(labels) == 3:
                registry, kind, outcome = labels
                r = snap.registries.setdefault(registry, RegistryStats())
                r.outcomes[(kind, outcome)] += value
                cls = outcome_class(outcome)
                if cls == "hit":
                    r.hits += value
                elif cls == "miss":
                    r.misses += value
                else:
                    r.other += value
            elif name == "upstream_bytes" and len(labels) == 1:
                r = snap.registries.setdefault(labels[0], RegistryStats())
                r.upstream_bytes += value
                snap.upstream_bytes += value
            elif name == "bytes" and labels == ("served",):
                snap.served_bytes += value
            elif name == "bytes" and labels == ("cache",):
                snap.cache_bytes += value
            elif name == "pulls" and len(labels) == 2:
                snap.pulls[labels] += value
            elif name == "evictions":
                snap.evictions += value
            elif name == "evicted_bytes":
                snap.evicted_bytes += value
            elif name == "verify_failures":
                snap.verify_failures += value
        return snap

    def reset(self) -> int:
        """Forget every counter (all processes); returns how many were removed."""
        with self._lock:
            self._pending.clear()
            self._named = None
        self._known.clear()
        return self.cache.clear()

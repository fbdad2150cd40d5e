"""A mitmdump script (``-s bench/memwatch.py``) that records what grows in the process's memory.

Not part of regcache: ``python -m bench.soak --memwatch`` loads it beside the addon. From load on it
runs tracemalloc (MEMWATCH_FRAMES frames, default 25) and every MEMWATCH_EVERY seconds (default 30)
appends to MEMWATCH_OUT (a text file):
  - RSS, tracemalloc's traced total, glibc mallinfo2 (in use / free in the heap / mmapped), so Python
    objects, C allocations tracemalloc cannot see (OpenSSL), and free-but-held heap can be told apart;
  - the top 25 ``snapshot.compare_to(first, "traceback")`` entries against the first snapshot;
  - the gc-tracked object counts per type that changed most since the first count.
The first snapshot is taken one interval after load (regcache's imports done), and each report also
lists the top changes since the previous one. MEMWATCH_FRAMES=0 runs without tracemalloc (its own
tables grow and slow mitmdump): then only RSS by kind of mapping, malloc, pymalloc blocks and gc counts.
A daemon thread does the work, so it needs no event loop hook.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc

FRAMES = int(os.environ.get("MEMWATCH_FRAMES", "25"))
EVERY = float(os.environ.get("MEMWATCH_EVERY", "30"))
OUT = os.environ.get("MEMWATCH_OUT", "/tmp/memwatch.txt")
TOP = 25


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> dict:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
        return {"arena_mib": m.arena / 2**20, "in_use_mib": m.uordblks / 2**20, "free_mib": m.fordblks / 2**20,
                "mmap_mib": m.hblkhd / 2**20}
    except (OSError, AttributeError):
        return {}


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _smaps() -> dict:
    """RSS (MiB) by kind of mapping: the brk heap, glibc thread arenas (in 64 MiB reservations),
    1 MiB anonymous maps (pymalloc arenas), other anonymous, files."""
    out = collections.Counter()
    name = kind = ""
    for line in open("/proc/self/smaps"):
        first = line.split(None, 6)
        if "-" in first[0] and len(first) >= 5 and ":" in first[3]:
            lo, hi = (int(x, 16) for x in first[0].split("-"))
            name = first[5].strip() if len(first) > 5 else ""
            size = (hi - lo) // 1024
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("/"):
                kind = "files"
            elif name:
                kind = name
            elif size == 1024:
                kind = "anon_1MiB"
            elif lo % (64 * 2**20) == 0:
                kind = "anon_64MiB_aligned(malloc arena)"
            else:
                kind = "anon_other"
        elif line.startswith("Rss:"):
            out[kind] += int(line.split()[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(out.items())}


def _type_counts() -> collections.Counter:
    return collections.Counter(type(o).__qualname__ + "@" + str(type(o).__module__) for o in gc.get_objects())


def _watch() -> None:
    t0 = time.monotonic()
    with open(OUT, "a") as f:
        f.write(f"# memwatch pid {os.getpid()} frames {FRAMES} every {EVERY}s\n")
    time.sleep(EVERY)
    first = prev = tracemalloc.take_snapshot() if FRAMES else None
    types0 = types_prev = _type_counts()
    while True:
        t = time.monotonic() - t0
        snap = tracemalloc.take_snapshot() if FRAMES else None
        traced, peak = tracemalloc.get_traced_memory() if FRAMES else (0, 0)
        types = _type_counts()
        lines = [f"\n======== t={t:.0f}s rss={_rss_mib():.1f} MiB traced={traced / 2**20:.2f} MiB "
                 f"(peak {peak / 2**20:.2f}) malloc={ {k: round(v, 1) for k, v in _mallinfo().items()} } "
                 f"pymalloc_blocks={sys.getallocatedblocks()} "
                 f"gc_objects={sum(types.values())} ({sum(types.values()) - sum(types0.values()):+d})",
                 f"rss by mapping (MiB): {_smaps()}"]
        for label, base in (("since first", first), ("since previous", prev)):
            if snap is None:
                break
            lines.append(f"--- tracemalloc top {TOP} {label}")
            lines += _stat_lines(snap.compare_to(base, "traceback"))
        prev = snap
        for label, base in (("since first", types0), ("since previous", types_prev)):
            diff = {k: types[k] - base.get(k, 0) for k in set(types) | set(base)}
            grown = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:TOP]
            lines.append(f"--- gc object counts, change {label}, now")
            lines += [f"      {d:+7d} {types.get(k, 0):8d} {k}" for k, d in grown]
        types_prev = types
        with open(OUT, "a") as f:
            f.write("\n".join(lines) + "\n")
        del snap
        time.sleep(EVERY)


def _stat_lines(stats) -> list[str]:
    lines = []
    for st in stats[:TOP]:
        if st.size_diff:
            lines.append(f"--- {st.size_diff / 1024:+.1f} KiB ({st.count_diff:+d} blocks), now {st.size / 1024:.1f} KiB"
                         f" in {st.count} blocks")
            # innermost frames first: the allocating line, then who called it
            for fr in list(st.traceback)[::-1][:FRAMES]:
                lines.append(f"      {fr.filename}:{fr.lineno}")
    return lines


def load(loader) -> None:
    if FRAMES:
        tracemalloc.start(FRAMES)
    threading.Thread(target=_watch, name="memwatch", daemon=True).start()

"""A small HTTP/1.1 load client for the store-size benchmark (bench/scale.py).

Runs in the client namespace: ``python bench/loadgen.py HOST PORT METHOD PATHS.json --conns N
--seconds S``. N keep-alive connections each send requests back to back for S seconds, every
request for a path picked at random from PATHS.json (so lookups spread over the whole store,
not one hot entry); prints one JSON line: requests, statuses, requests/s, latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

ACCEPT = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))


async def one_connection(host: str, port: int, method: str, paths: list[str], deadline: float,
                         latencies: list[float], statuses: dict[int, int], errors: list[str]) -> None:
    reader = writer = None
    rng = random.Random()
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            path = rng.choice(paths)
            t0 = time.perf_counter()
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {ACCEPT}\r\n"
                         f"User-Agent: regcache-bench-loadgen\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            length = int(fields.get("content-length", "0"))
            if method != "HEAD" and length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if fields.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            errors.append(f"{type(e).__name__}: {e}"[:200])
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run(args) -> dict:
    paths = json.loads(open(args.paths).read())
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    await asyncio.gather(*(one_connection(args.host, args.port, args.method, paths, deadline, latencies, statuses, errors)
                           for _ in range(args.conns)))
    wall = time.monotonic() - t0
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else None

    return {
        "requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall,
        "statuses": statuses, "errors": len(errors), "first_errors": errors[:3],
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "mean_ms": statistics.fmean(latencies) * 1000 if latencies else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("method", choices=("GET", "HEAD"))
    ap.add_argument("paths")
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Section 9 of python -m bench (issue 12, item 3): a fleet pulling one image at once.

N simulated nodes (``--fleet-sizes``, default 50 and 200) pull the same 10-layer image from the
world's quay.io at the same moment, each doing what a container runtime does: the ``/v2/`` ping,
the manifest by tag, the config, then every layer with up to 3 downloads at a time, following
redirects (regcache's mirror answers blob GETs with a 307 to its fast path), every digest
verified. Cold (fresh, empty cache) and warm (the same cache again), through regcache as a
mirror, through the CNCF distribution pull-through proxy, and straight from upstream.

Also: a cold pull of a 50-small-layer image through regcache, and how many TLS connections
regcache opened to upstream for it (distinct connections in the world's nginx access log).

The simulated nodes run as ``python -m bench.fleet client …`` processes in the client namespace
(asyncio, a small HTTP/1.1 client of its own: keep-alive connections per node and origin, one per
concurrent download, as Go's or containerd's HTTP clients keep them).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]

SECTION_FLEET = ("9. a fleet pulling one 10-layer image at once (time until the last node is done; "
                 "reference: distribution proxy)")
SIZES = (50, 200)
# The image: 10 layers of 1-50 MiB (199 MiB). --fleet-layer-scale shrinks every layer by the
# same factor so that 200 nodes fit a few minutes on the 2-core machine (the default is below).
LAYER_MIB = (50, 40, 30, 25, 20, 15, 10, 5, 3, 1)
LAYER_SCALE = 0.25
REPO = "bench/fleet"
TAG = "1"
SMALL_REPO = "bench/fleet-small"
SMALL_LAYERS = 50
SMALL_LAYER_BYTES = 16 * 1024
CONCURRENT_LAYERS = 3  # containerd's and dockerd's default max concurrent downloads
TARGET_WARM = 0.5  # warm time <= 0.5x the distribution proxy's
TARGET_COLD = 1.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join((OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"))
READ_CHUNK = 1 << 20
MAX_ATTEMPTS = 5  # a runtime retries a failed layer download; every retry is counted and reported
# A connect this slow waited for a retransmitted SYN (the first comes 1 s later): the listener's accept queue was full.
SLOW_CONNECT = 0.9


# =========================================================================== the simulated node
# (runs in the client namespace: only the standard library)


class HTTPError(Exception):
    pass


class _Receiver(asyncio.BufferedProtocol):
    """Received bytes land in one preallocated buffer per connection (no bytes object per read,
    no copies): a load generator's own costs must stay small next to what it measures."""

    def __init__(self):
        self.buf = bytearray(READ_CHUNK)
        self.view = memoryview(self.buf)
        self.lo = self.hi = 0  # unread bytes: buf[lo:hi]
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.paused = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi > len(self.buf) - 65536:  # compact: move what is unread to the front
            n = self.hi - self.lo
            self.buf[:n] = self.buf[self.lo:self.hi]
            self.lo, self.hi = 0, n
        return self.view[self.hi:]

    def buffer_updated(self, nbytes):
        self.hi += nbytes
        if self.hi - self.lo > len(self.buf) - 65536 and not self.paused:
            self.paused = True  # the reader falls behind: stop reading until it catches up
            self.transport.pause_reading()
        self._wake()

    def eof_received(self):
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc):
        self.closed = True
        self._wake()

    def _wake(self):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self) -> None:
        """Wait for bytes beyond buf[lo:hi]."""
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.closed:
            raise asyncio.IncompleteReadError(b"", None)
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def until(self, sep: bytes) -> bytes:
        """The bytes up to and including ``sep``."""
        while True:
            i = self.buf.find(sep, self.lo, self.hi)
            if i >= 0:
                out = bytes(self.view[self.lo:i + len(sep)])
                self.lo = i + len(sep)
                return out
            if self.hi - self.lo > 65536:
                raise ValueError("line too long")
            await self.more()

    async def exactly(self, n: int, sink) -> None:
        """Hand the next ``n`` bytes to ``sink`` (memoryviews into the buffer, valid during the call)."""
        while n:
            take = min(n, self.hi - self.lo)
            if take:
                sink(self.view[self.lo:self.lo + take])
                self.lo += take
                n -= take
            else:
                await self.more()


class Conn:
    """One keep-alive HTTP/1.1 connection to an origin (scheme, host, port)."""

    def __init__(self, origin: tuple[str, str, int], ssl_ctx, connect_to: str | None, on_connect=None):
        self.origin = origin
        self.ssl_ctx = ssl_ctx if origin[0] == "https" else None
        self.connect_to = connect_to  # an IP address for origin's host
        self.on_connect = on_connect  # called with the seconds each connect (and TLS handshake) took
        self.rx: _Receiver | None = None

    async def open(self):
        _scheme, host, port = self.origin
        kw = {"ssl": self.ssl_ctx, "server_hostname": host} if self.ssl_ctx else {}
        rx = _Receiver()
        t0 = time.monotonic()
        await asyncio.get_running_loop().create_connection(lambda: rx, self.connect_to or host, port, **kw)
        if self.on_connect is not None:
            self.on_connect(time.monotonic() - t0)
        self.rx = rx

    def close(self):
        if self.rx is not None and self.rx.transport is not None:
            self.rx.transport.close()
        self.rx = None

    async def request(self, path: str, headers: dict, sink) -> tuple[int, dict]:
        """GET ``path``; the body goes to ``sink(chunk)``; (status, lower-cased headers)."""
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more, fresh
            fresh = self.rx is None or self.rx.closed
            if fresh:
                self.close()
                await self.open()
            host = self.origin[1] if self.origin[2] in (80, 443) else f"{self.origin[1]}:{self.origin[2]}"
            head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: regcache-bench-fleet\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            try:
                self.rx.transport.write(head.encode())
                raw = await self.rx.until(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.close()
                if fresh or attempt:
                    raise HTTPError(f"{self.origin} {path}: {type(e).__name__}: {e}") from None
                continue
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = {}
            for line in lines[1:]:
                k, sep, v = line.partition(":")
                if sep:
                    fields[k.strip().lower()] = v.strip()
            try:
                await self._body(fields, sink)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.close()
                raise HTTPError(f"{self.origin} {path}: body: {type(e).__name__}: {e}") from None
            if fields.get("connection", "").lower() == "close":
                self.close()
            return status, fields
        raise AssertionError("unreachable")

    async def _body(self, fields: dict, sink) -> None:
        rx = self.rx
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await rx.until(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await rx.until(b"\r\n")
                    return
                await rx.exactly(size, sink)
                await rx.until(b"\r\n")
        await rx.exactly(int(fields.get("content-length", "0")), sink)


class Node:
    """One simulated node: what a container runtime does to pull one image by tag."""

    def __init__(self, base: str, repo: str, tag: str, manifest_digest: str, ssl_ctx, connect_to: dict):
        self.base = base.rstrip("/")
        self.repo, self.tag, self.manifest_digest = repo, tag, manifest_digest
        self.ssl_ctx = ssl_ctx
        self.connect_to = connect_to
        self.pools: list[dict] = [{} for _ in range(CONCURRENT_LAYERS)]  # one connection per origin per download slot
        self.bytes = 0
        self.retries = 0
        self.redirects = 0
        self.fastpath = 0
        self.connects: list[float] = []
        self.retry_errors: list[str] = []

    def conn(self, slot: int, url: str) -> tuple[Conn, str]:
        u = urlsplit(url)
        origin = (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80))
        pool = self.pools[slot]
        if origin not in pool:
            pool[origin] = Conn(origin, self.ssl_ctx, self.connect_to.get(u.hostname), self.connects.append)
        return pool[origin], u.path + (f"?{u.query}" if u.query else "")

    async def get(self, slot: int, path: str, headers=None, digest: str | None = None) -> bytes | None:
        """GET base+path following redirects; with ``digest`` the body is hashed (not kept) and
        checked; else it is returned."""
        url = self.base + path
        for _hop in range(5):
            conn, target = self.conn(slot, url)
            h = hashlib.sha256()
            keep: list[bytes] = []
            count = [0]

            def sink(chunk, h=h, keep=keep, count=count):
                h.update(chunk)
                count[0] += len(chunk)
                if digest is None:
                    keep.append(bytes(chunk))

            status, fields = await conn.request(target, headers or {}, sink)
            if status in (301, 302, 303, 307, 308):
                loc = fields.get("location", "")
                url = loc if "://" in loc else f"{conn.origin[0]}://{conn.origin[1]}:{conn.origin[2]}{loc}"
                self.redirects += 1
                if "/_regcache/blobs/" in url:
                    self.fastpath += 1
                continue
            if status != 200:
                raise HTTPError(f"GET {url}: HTTP {status}")
            self.bytes += count[0]
            if digest is not None:
                got = "sha256:" + h.hexdigest()
                if got != digest:
                    raise HTTPError(f"GET {url}: digest {got}, expected {digest} ({count[0]} bytes)")
                return None
            return b"".join(keep)
        raise HTTPError(f"GET {self.base + path}: too many redirects")

    async def blob(self, slot: int, digest: str) -> None:
        for attempt in range(MAX_ATTEMPTS):
            try:
                await self.get(slot, f"/v2/{self.repo}/blobs/{digest}", digest=digest)
                return
            except HTTPError as e:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                self.retries += 1
                self.retry_errors.append(str(e)[:200])
                for c in self.pools[slot].values():
                    c.close()
                await asyncio.sleep(0.2 * (attempt + 1))

    async def pull(self) -> None:
        await self.get(0, "/v2/")
        body = await self.get(0, f"/v2/{self.repo}/manifests/{self.tag}", {"Accept": ACCEPT})
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        if got != self.manifest_digest:
            raise HTTPError(f"manifest digest {got}, expected {self.manifest_digest}")
        manifest = json.loads(body)
        await self.blob(0, manifest["config"]["digest"])
        todo = [layer["digest"] for layer in manifest["layers"]]

        async def worker(slot: int):
            while todo:
                await self.blob(slot, todo.pop(0))

        await asyncio.gather(*(worker(s) for s in range(CONCURRENT_LAYERS)))

    def close(self):
        for pool in self.pools:
            for c in pool.values():
                c.close()


async def run_nodes(args) -> list[dict]:
    ctx = None
    if args.cafile:
        ctx = ssl.create_default_context(cafile=args.cafile)
    connect_to = dict(x.split("=", 1) for x in args.connect_to)
    results = []

    async def one(i: int):
        node = Node(args.base, args.repo, args.tag, args.manifest_digest, ctx, connect_to)
        r = {"node": i, "ok": False, "error": ""}
        t0 = time.time()
        try:
            await node.pull()
            r["ok"] = True
        except Exception as e:  # noqa: BLE001 - every failure is a figure
            r["error"] = f"{type(e).__name__}: {e}"[:300]
        r.update(start=t0, end=time.time(), bytes=node.bytes, retries=node.retries, redirects=node.redirects,
                 fastpath=node.fastpath, connects=len(node.connects), retry_errors=node.retry_errors[:2],
                 slow_connects=sum(1 for c in node.connects if c >= SLOW_CONNECT),
                 max_connect=max(node.connects, default=0.0))
        node.close()
        results.append(r)

    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    await asyncio.gather(*(one(i) for i in range(args.first, args.first + args.nodes)))
    return results


def client_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet client")
    ap.add_argument("--base", required=True, help="registry base URL, e.g. http://10.77.2.1:5000")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--manifest-digest", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--start-at", type=float, default=0.0, help="wall-clock time (time.time()) all nodes start at")
    ap.add_argument("--cafile")
    ap.add_argument("--connect-to", action="append", default=[], help="HOST=IP")
    args = ap.parse_args(argv)
    results = asyncio.run(run_nodes(args))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"nodes": results, "cpu": ru.ru_utime + ru.ru_stime}))
    return 0


# =========================================================================== the image


def layer_sizes(scale: float) -> list[int]:
    from .infra import MiB

    return [max(4096, int(m * MiB * scale)) for m in LAYER_MIB]


class Image:
    """An image pushed to the world's quay.io: its manifest digest and its blobs."""

    def __init__(self, repo: str, tag: str, manifest: bytes, config_digest: str, layers: list):
        self.repo, self.tag = repo, tag
        self.manifest = manifest
        self.digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.config_digest = config_digest
        self.layers = layers  # infra.Blob

    @property
    def size(self) -> int:
        return sum(b.size for b in self.layers)

    def blob_digests(self) -> list[str]:
        return [self.config_digest] + [b.digest for b in self.layers]


def build_image(world, repo: str, tag: str, names_sizes: list[tuple[str, int]], log=print) -> Image:
    """Random layers generated once under bench/out/, pushed to quay.io/<repo> with the OCI
    monolithic upload (as bench pushes its blobs), then a config and an OCI manifest."""
    from . import infra

    blobs = [infra.make_blob(name, size, log=log) for name, size in names_sizes]
    for b in blobs:
        infra.push_blob(world, b, repo=repo)
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [b.digest for b in blobs]},
                      "config": {}}, sort_keys=True).encode()
    cfg_path = infra.OUT / f"{repo.replace('/', '-')}-config.json"
    cfg_path.write_bytes(cfg)
    cfg_blob = infra.Blob(cfg_path.stem, cfg_path, len(cfg), hashlib.sha256(cfg).hexdigest())
    infra.push_blob(world, cfg_blob, repo=repo)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_blob.digest, "size": cfg_blob.size},
        "layers": [{"mediaType": OCI_LAYER, "digest": b.digest, "size": b.size} for b in blobs],
    }, indent=1).encode()
    man_path = infra.OUT / f"{repo.replace('/', '-')}-manifest.json"
    man_path.write_bytes(manifest)
    base = f"http://127.0.0.1:{infra.REGISTRY_PORTS[infra.UPSTREAM]}"
    r = world.run(world.ns_upstream, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
                                      "-H", f"Content-Type: {OCI_MANIFEST}", "--data-binary", f"@{man_path}",
                                      f"{base}/v2/{repo}/manifests/{tag}"])
    if r.stdout.strip() != "201":
        raise RuntimeError(f"manifest PUT of {repo}:{tag} answered {r.stdout!r}: {r.stderr}")
    return Image(repo, tag, manifest, cfg_blob.digest, blobs)


# =========================================================================== the section


def fleet_pull(bench, image: Image, nodes: int, base: str, cafile: str | None = None,
               connect_to: dict | None = None) -> dict:
    """``nodes`` simulated nodes start pulling at the same moment, spread over --fleet-procs
    client processes in the client ns; returns their results and the figures."""
    world = bench.world
    procs = max(1, min(bench.args.fleet_procs, nodes))
    start_at = time.time() + 1.5 + 0.05 * procs  # every client process is up and waiting by then
    overflows0 = listen_overflows(world)
    running = []
    for p in range(procs):
        share = nodes // procs + (1 if p < nodes % procs else 0)
        first = sum(nodes // procs + (1 if q < nodes % procs else 0) for q in range(p))
        argv = [sys.executable, "-m", "bench.fleet", "client", "--base", base, "--repo", image.repo, "--tag", image.tag,
                "--manifest-digest", image.digest, "--nodes", str(share), "--first", str(first),
                "--start-at", f"{start_at:.3f}"]
        if cafile:
            argv += ["--cafile", cafile]
        for host, ip in (connect_to or {}).items():
            argv += ["--connect-to", f"{host}={ip}"]
        out = bench.work / f"fleet-client-{p}.json"
        err = bench.work / f"fleet-client-{p}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = world.popen(world.ns_client, argv, env={"PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
                               stdout=fo, stderr=fe)
            running.append((proc, out, err))
    results = []
    errors = []
    client_cpu = 0.0
    for proc, out, err in running:
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            got = json.loads(out.read_text())
            results += got["nodes"]
            client_cpu += got["cpu"]
        except ValueError:
            errors.append(f"client exit {proc.returncode}: {err.read_text(errors='replace')[-500:]}")
    overflows = listen_overflows(world) - overflows0
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    if failed:
        errors.append(f"{len(failed)} nodes failed, e.g. {failed[0]['error']}")
    missing = nodes - len(results)
    if missing > 0:
        errors.append(f"{missing} nodes did not report")
    durations = sorted(r["end"] - r["start"] for r in ok)
    return {
        "nodes": nodes,
        "complete": len(ok) == nodes,
        "last": max(r["end"] for r in ok) - start_at if len(ok) == nodes else None,
        "p50": statistics.median(durations) if durations else None,
        "max": durations[-1] if durations else None,
        "bytes": sum(r["bytes"] for r in ok),
        "retries": sum(r["retries"] for r in results),
        "retry_errors": [e for r in results for e in r.get("retry_errors", [])][:3],
        "connects": sum(r.get("connects", 0) for r in results),
        "slow_connects": sum(r.get("slow_connects", 0) for r in results),
        "max_connect": max((r.get("max_connect", 0.0) for r in results), default=0.0),
        "listen_overflows": overflows,
        "fastpath": sum(r["fastpath"] for r in results),
        "errors": errors,
        "client_cpu": client_cpu,
    }


def listen_overflows(world) -> int:
    """TcpExt ListenOverflows of the router namespace (where the caches listen): SYNs dropped because a
    listener's accept queue was full; the client retransmits them 1, 3, 7, 15 ... s later."""
    r = world.run(world.ns_router, ["cat", "/proc/net/netstat"], check=False)
    lines = [l.split() for l in r.stdout.splitlines() if l.startswith("TcpExt:")]
    if len(lines) < 2:
        return 0
    fields = dict(zip(lines[0][1:], lines[1][1:]))
    return int(fields.get("ListenOverflows", 0))


def blob_get_counts(entries: list[dict], image: Image) -> dict[str, int]:
    counts = {d: 0 for d in image.blob_digests()}
    for e in entries:
        if e.get("method") != "GET":
            continue
        path = e.get("path", "").split("?")[0]
        for d in counts:
            if path.endswith(f"/blobs/{d}"):
                counts[d] += 1
    return counts


def request_summary(entries: list[dict], image: Image) -> str:
    counts = blob_get_counts(entries, image)
    per_blob = sorted(set(counts.values()))
    manifests = sum(1 for e in entries if "/manifests/" in e.get("path", "") and e.get("method") == "GET")
    heads = sum(1 for e in entries if e.get("method") == "HEAD")
    conns = len({e.get("conn") for e in entries})
    spread = f"{per_blob[0]}" if len(per_blob) == 1 else f"{per_blob[0]}–{per_blob[-1]}"
    return (f"upstream: {spread} GETs per blob, {manifests} manifest GETs, {heads} HEADs, "
            f"{len(entries)} requests on {conns} connections")


def scenario_fleet(bench) -> None:
    from . import infra
    from .infra import DistProxy, RegcacheProc

    world = bench.world
    args = bench.args
    scale_f = args.fleet_layer_scale
    sizes = layer_sizes(scale_f)
    bench.say(f"9. fleet image: {len(sizes)} layers, {sum(sizes) / infra.MiB:.1f} MiB "
              f"(x{scale_f:g} of the issue's 1-50 MiB layers)")
    image = build_image(world, REPO, TAG, [(f"fleet-layer{i}-{s}", s) for i, s in enumerate(sizes)], log=bench.say)
    small_layers = [(f"fleet-small{i}-{SMALL_LAYER_BYTES}", SMALL_LAYER_BYTES) for i in range(SMALL_LAYERS)]
    small = build_image(world, SMALL_REPO, TAG, small_layers, log=lambda _msg: None)
    bench.say(f"  pushed {REPO}:{TAG} ({image.digest[:19]}…) and {SMALL_REPO}:{TAG} ({SMALL_LAYERS} layers) "
              f"to {infra.UPSTREAM}")
    ulog = infra.UpstreamLog(world, hosts=(infra.UPSTREAM,))
    rip = world.router_client_ip
    quay_ip = world.upstream_ips[infra.UPSTREAM]
    raw = bench.raw.setdefault("fleet", {})

    def row(name, value, unit="s", ratio=None, target="", ok=None, note=""):
        bench.row(SECTION_FLEET, name, value, unit, ratio, target, ok, note)

    def note_of(fig: dict, entries: list[dict] | None, extra: str = "") -> str:
        parts = [f"{fig['nodes']} nodes" + ("" if fig["complete"] else " INCOMPLETE"),
                 f"p50 node {fig['p50']:.2f} s" if fig["p50"] is not None else "",
                 f"{fig['bytes'] / 1e6:,.0f} MB verified", f"the simulated nodes' CPU {fig['client_cpu']:.1f} s"]
        if fig["retries"]:
            parts.append(f"{fig['retries']} layer retries (e.g. {fig['retry_errors'][0][:120]})")
        if fig["slow_connects"] or fig["listen_overflows"]:
            parts.append(f"{fig['slow_connects']} of {fig['connects']} connects took >= {SLOW_CONNECT:g} s (slowest "
                         f"{fig['max_connect']:.1f} s), {fig['listen_overflows']} accept-queue overflows "
                         "in the router ns")
        if entries is not None:
            parts.append(request_summary(entries, image))
        if extra:
            parts.append(extra)
        if fig["errors"]:
            parts.append("ERRORS: " + "; ".join(fig["errors"])[:400])
        return "; ".join(p for p in parts if p)

    for n in args.fleet_sizes:
        tag = f"N={n}"
        # ---- the distribution proxy (reference) and regcache as a mirror (fast path as by default), both up
        # at once and pulled from in the order dist cold, regcache cold, regcache warm, dist warm: the machine
        # is shared, and this order spreads a drift of its load over both evenly.
        bench.say(f"9. fleet {tag}: distribution proxy cold, regcache mirror (fast path) cold, regcache warm, "
                  "distribution proxy warm")
        dp = DistProxy(world, bench.work / f"distproxy-fleet-{n}").start()
        rc = RegcacheProc(world, bench.work / f"rc-fleet-{n}").start()
        dist_base, rc_base = dp.base(), f"http://{rip}:{infra.MIRROR_PORT}"
        ca = str(world.ca_cert_path)
        cpu0 = infra.cpu_seconds(dp.pid)[0]

        def pull(base, cafile=None, expect=1):
            ulog.mark()
            fig = fleet_pull(bench, image, n, base, cafile=cafile)
            return fig, ulog.since(expect=expect)

        dcold, dcold_up = pull(dist_base, ca)
        dcpu_cold = infra.cpu_seconds(dp.pid)[0] - cpu0
        dhwm_cold = dp.hwm_mib()
        bench.settle()
        rcold, rcold_up = pull(rc_base)
        cpu_cold = rc.cpu()[0]
        hwm_cold = rc.hwm_mib()
        bench.settle()
        rwarm, rwarm_up = pull(rc_base, expect=0)
        cpu_warm = rc.cpu()[0] - cpu_cold
        hwm = rc.hwm_mib()
        bench.settle()
        dwarm, dwarm_up = pull(dist_base, ca, expect=0)
        dcpu_warm = infra.cpu_seconds(dp.pid)[0] - cpu0 - dcpu_cold
        dhwm = dp.hwm_mib()
        dp.stop()
        warm_ratio = ratio_of(rwarm["last"], dwarm["last"])
        # a missed warm target: one more warm pull under py-spy (not in the table)
        bench.maybe_profile(warm_ratio is None or warm_ratio > TARGET_WARM,
                            f"fleet of {n}, warm pull, regcache mirror -> fast path", rc.pid,
                            lambda: fleet_pull(bench, image, n, rc_base), rc)
        rc.stop()
        shutil.rmtree(rc.cache_dir, ignore_errors=True)
        bench.settle()
        raw[f"dist {n}"] = {"cold": dcold, "warm": dwarm}
        raw[f"regcache {n}"] = {"cold": rcold, "warm": rwarm}

        # ---- straight from upstream
        bench.say(f"9. fleet {tag}: every node straight from upstream (no cache)")
        ulog.mark()
        direct = fleet_pull(bench, image, n, f"https://{infra.UPSTREAM}", cafile=str(world.ca_cert_path),
                            connect_to={infra.UPSTREAM: quay_ip})
        direct_up = ulog.since(expect=1)
        bench.settle()
        raw[f"direct {n}"] = direct

        for phase, d, r, d_up, r_up, target in (("cold", dcold, rcold, dcold_up, rcold_up, TARGET_COLD),
                                                ("warm", dwarm, rwarm, dwarm_up, rwarm_up, TARGET_WARM)):
            ref = d["last"]
            row(f"{tag}, {phase}: distribution proxy — reference", ref, ratio=1.0 if ref else None,
                note=note_of(d, d_up, f"its CPU {dcpu_cold if phase == 'cold' else dcpu_warm:.1f} s, "
                                      f"RSS peak {dhwm_cold if phase == 'cold' else dhwm:.0f} MiB"))
            rr = ratio_of(r["last"], ref)
            cpu = cpu_cold if phase == "cold" else cpu_warm
            row(f"{tag}, {phase}: regcache mirror -> fast path", r["last"], ratio=rr, target=f"<= {target:.1f}x",
                ok=rr is not None and rr <= target and r["complete"],
                note=note_of(r, r_up, f"{r['fastpath']} fast-path redirects; regcache CPU {cpu:.1f} s, "
                                      f"RSS peak {hwm_cold if phase == 'cold' else hwm:.0f} MiB"))
            # On a real fleet every node has CPUs of its own; here the simulated nodes share the 2 cores with
            # the cache, so the wall times above include their work. The caches' own CPU does not.
            dc = dcpu_cold if phase == "cold" else dcpu_warm
            row(f"{tag}, {phase}: CPU of the cache itself, regcache / distribution proxy", cpu, "CPU-s",
                ratio=ratio_of(cpu, dc),
                note=f"regcache {cpu:.1f} s, distribution proxy {dc:.1f} s; the simulated nodes took "
                     f"{r['client_cpu']:.1f} s and {d['client_cpu']:.1f} s of the same 2 cores")
        gets = blob_get_counts(rcold_up, image)
        worst = max(gets.values())
        row(f"{tag}, cold: regcache upstream GETs per blob", worst, "GETs", target="== 1",
            ok=worst == 1 and min(gets.values()) == 1 and rcold["complete"],
            note="GETs per blob (config, layers largest first): "
                 + ", ".join(str(gets[x]) for x in image.blob_digests()))
        row(f"{tag}: no cache, every node straight from upstream", direct["last"],
            ratio=ratio_of(direct["last"], dcold["last"]),
            note=note_of(direct, None, f"{len(direct_up)} upstream requests")
                 + "; ratio to the cold distribution proxy")
        bench.rss(f"fleet of {n}, cold + warm pull of a {image.size / infra.MiB:.0f} MiB image, mirror -> fast path",
                  hwm)

    # ---- keep-alive upstream: 50 small layers, one node, cold
    bench.say(f"9. {SMALL_LAYERS} small layers, cold, one node through regcache: upstream TLS connections")
    rc = RegcacheProc(world, bench.work / "rc-fleet-small").start()
    ulog.mark()
    fig = fleet_pull(bench, small, 1, f"http://{rip}:{infra.MIRROR_PORT}")
    entries = ulog.since(expect=1)
    rc.stop()
    shutil.rmtree(rc.cache_dir, ignore_errors=True)
    conns = len({e.get("conn") for e in entries})
    raw["small"] = {"fig": fig, "upstream": [(e["method"], e["path"], e["status"], e.get("conn")) for e in entries]}
    row(f"cold pull of {SMALL_LAYERS} small layers ({SMALL_LAYER_BYTES // 1024} KiB), one node: "
        "upstream TLS connections",
        conns if fig["complete"] else None, "connections", target="a handful (<= 8)", ok=fig["complete"] and conns <= 8,
        note=f"{len(entries)} upstream requests on {conns} connections (distinct nginx `$pid-$connection`); "
             f"pull {fig['last'] or 0:.2f} s"
             + ("; ERRORS: " + "; ".join(fig["errors"]) if fig["errors"] else ""))


def ratio_of(value, reference):
    if value is None or not reference:
        return None
    return value / reference


DETAILS = [
    "- Section 9 (fleet, `bench/fleet.py`): N simulated nodes in the client ns (`python -m bench.fleet client`,",
    "  asyncio, split over `--fleet-procs` processes that all start at one wall-clock moment). Each node:",
    f"  `GET /v2/`, the manifest by tag (digest checked), the config, then the layers, {CONCURRENT_LAYERS} downloads",
    "  at a time, each on its own keep-alive connection per origin, redirects followed (the mirror's 307 to the",
    f"  fast path), every sha256 verified; a failed layer download is retried (up to {MAX_ATTEMPTS} attempts) and",
    "  counted. Time = from the common start until the last node is done; p50 = the median node's own pull time.",
    "  Cold = a fresh, empty cache (regcache: a fresh mitmdump; distribution proxy: fresh storage), warm = the same",
    "  cache again, within the tag TTL. The image (10 layers, the issue's 1-50 MiB times `--fleet-layer-scale`;",
    "  random bytes under bench/out/) is pushed to the world's quay.io with the OCI monolithic upload, then an OCI",
    "  manifest. Per N both caches run at once and are pulled from in the order distribution proxy cold, regcache",
    "  cold, regcache warm, distribution proxy warm (a drift of the shared machine's load falls on both alike);",
    "  then no cache. Upstream requests: quay.io's nginx access log during each pull. Upstream TLS connections of",
    "  the 50-small-layer pull: distinct `$pid-$connection` values in that log.",
]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    print("usage: python -m bench.fleet client ... (the section runs as python -m bench --only fleet)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Section 7 of python -m bench (issue 12, item 4): costs as the store grows.

Builds synthetic cache dirs of 1k, 10k and 100k blobs (+ 20 % as many manifests and as many
tags) with the store's own API, then for each size measures through a real regcache (mitmdump,
mirror listener) in the test World: hit latency (1 connection) and request rate (32 connections)
of a blob HEAD, a blob GET and a manifest GET by tag; mitmdump's start until its listeners
answer; and the wall time of `regcache stats`, `ls`, `gc --dry-run`, `gc` of 10 % of the
store and `verify --help` on that dir. Ratios are to the smallest store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import infra
from .report import Row

SECTION_SCALE = "7. store size: 1k -> 10k -> 100k blobs (+20 % manifests and tags); ratio to the smallest store"
SIZES = (1_000, 10_000, 100_000)
MANIFEST_SHARE = 5  # one manifest (and one tag) per five blobs: its config + four layers
REGISTRY = infra.UPSTREAM
REPOS = 50
BLOB_BYTES = 256
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
LAT_SECONDS = 3.0
RATE_SECONDS = 5.0
RATE_CONNS = 32
TARGET_HIT = 0.9  # rate within 10 % of the small store; latency within 10 % (ratio <= 1.1)
TARGET_CLI_S = 2.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "fastpath: off\ntag_ttl: 24h\npublic_ttl: 24h\n"  # in-band GETs; stored tags and verdicts stay fresh for the run


def blob_bytes(i: int) -> bytes:
    seed = hashlib.sha256(f"regcache-scale-blob-{i}".encode()).digest()
    return (seed * (BLOB_BYTES // len(seed) + 1))[:BLOB_BYTES]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def repo_of(m: int) -> str:
    return f"scale/app{m % REPOS}"


def build_store(directory: Path, n_blobs: int, log=print) -> dict:
    """A cache dir with n_blobs tiny blobs, n_blobs/5 manifests each naming five of them, a tag
    per manifest, over REPOS public repositories. Returns what the load client asks for."""
    from regcachelib.store import Store

    if directory.exists():
        shutil.rmtree(directory)
    t0 = time.monotonic()
    store = Store(str(directory))
    digests = []
    batch = 2000
    for start in range(0, n_blobs, batch):
        # one SQLite transaction per batch: the build is not what is measured
        with store.content.transact():
            for i in range(start, min(n_blobs, start + batch)):
                data = blob_bytes(i)
                digest = sha(data)
                path, f = store.new_staging_file(digest)
                with f:
                    f.write(data)
                store.commit_blob(digest, path, len(data))
                digests.append(digest)
    t_blobs = time.monotonic() - t0
    n_manifests = n_blobs // MANIFEST_SHARE
    tags = []
    for start in range(0, n_manifests, batch):
        with store.content.transact(), store.tags.transact():
            for m in range(start, min(n_manifests, start + batch)):
                b = digests[m * MANIFEST_SHARE:(m + 1) * MANIFEST_SHARE]
                body = json.dumps({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": b[0], "size": BLOB_BYTES},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": BLOB_BYTES} for d in b[1:]],
                }, separators=(",", ":")).encode()
                digest = sha(body)
                store.put_manifest(digest, OCI_MANIFEST, body)
                store.set_tag(REGISTRY, repo_of(m), f"t{m}", OCI_MANIFEST, digest)  # also records membership
                tags.append((repo_of(m), f"t{m}"))
    for r in range(REPOS):
        store.set_public(REGISTRY, f"scale/app{r}", True)
    counts = store.entry_counts()
    volume = store.volume()
    store.close()
    blob_paths = [f"/v2/{repo_of(i // MANIFEST_SHARE)}/blobs/{d}" for i, d in enumerate(digests[:n_manifests * MANIFEST_SHARE])]
    tag_paths = [f"/v2/{repo}/manifests/{tag}" for repo, tag in tags]
    return {"seconds": time.monotonic() - t0, "blob_seconds": t_blobs, "counts": counts,
            "blob_paths": blob_paths, "tag_paths": tag_paths, "volume": volume,
            "bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())}


# --------------------------------------------------------------------------- the section


def build(bench, directory: Path, n: int) -> dict:
    """Build in a child process with the PYTHONPATH regcache runs with (--src is honoured)."""
    out = directory.parent / f"{directory.name}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(infra.BENCH.parent)) if p)
    subprocess.run([sys.executable, "-m", "bench.scale", str(n), str(directory), str(out)], check=True, env=env,
                   cwd=str(infra.BENCH.parent), timeout=1800)
    return json.loads(out.read_text())


def loadgen(bench, method: str, paths_file: Path, conns: int, seconds: float) -> dict:
    r = bench.world.run(bench.world.ns_client, [sys.executable, str(LOADGEN), bench.world.router_client_ip, str(infra.MIRROR_PORT),
                                                method, str(paths_file), "--conns", str(conns), "--seconds", str(seconds)],
                        timeout=seconds + 60)
    return json.loads(r.stdout.strip().splitlines()[-1])


def cli(bench, directory: Path, *argv: str) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of one `regcache --dir DIR ...` (the console script of the Python regcache runs with)."""
    exe = str(Path(sys.executable).parent / "regcache")
    t0 = time.monotonic()
    r = subprocess.run([exe, "--dir", str(directory), *argv], capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    secs = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"regcache {' '.join(argv)} on {directory} failed ({r.returncode}): {r.stderr[-800:]}")
    return secs, r


HITS = (("blob HEAD", "HEAD", "blob"), ("blob GET (256 B, in-band)", "GET", "blob"), ("manifest GET by tag", "GET", "tag"))
CLI = (("regcache stats", ("stats",)), ("regcache ls", ("ls",)), ("regcache ls -a", ("ls", "-a")),
       ("regcache verify --help", ("verify", "--help")),
       ("regcache gc --dry-run (10 % of the store)", ("gc", "--dry-run")),
       ("regcache gc (removes 10 % of the store)", ("gc",)))


def build_size(bench, n: int) -> dict:
    work = bench.work / "scale"
    work.mkdir(parents=True, exist_ok=True)
    directory = work / f"cache-{n}"
    bench.say(f"7. building a store of {n:,} blobs, {n // MANIFEST_SHARE:,} manifests and tags")
    info = build(bench, directory, n)
    bench.say(f"  built in {info['seconds']:.1f} s ({info['counts']}; {info['bytes'] / 2**20:.1f} MiB on disk)")
    fig: dict = {"dir": directory, "build": info["seconds"], "counts": info["counts"], "disk": info["bytes"],
                 "volume": info["volume"], "paths": {}, "rounds": []}
    for kind in ("blob", "tag"):
        fig["paths"][kind] = work / f"{kind}-paths-{n}.json"
        fig["paths"][kind].write_text(json.dumps(info[f"{kind}_paths"]))
    return fig


def hit_round(bench, n: int, fig: dict, r: int) -> None:
    """One fresh mitmdump on the store: its start time, then latency and rate of each hit."""
    bench.settle()
    t0 = time.monotonic()
    rc = infra.RegcacheProc(bench.world, bench.work / "scale" / f"rc-{n}-{r}", fig["dir"], CONFIG).start((infra.PROXY_PORT, infra.MIRROR_PORT))
    got: dict = {"start": time.monotonic() - t0}
    bench.say(f"7. round {r + 1}, {n:,} blobs: mitmdump listening after {got['start']:.2f} s")
    try:
        bench.upstream_log.mark()
        for label, method, kind in HITS:
            lat = loadgen(bench, method, fig["paths"][kind], 1, LAT_SECONDS)
            rate = loadgen(bench, method, fig["paths"][kind], RATE_CONNS, RATE_SECONDS)
            for res in (lat, rate):
                if set(res["statuses"]) != {"200"} or res["errors"]:
                    raise RuntimeError(f"{label} on the {n:,}-blob store: statuses {res['statuses']}, errors {res['first_errors']}")
            got[label] = {"p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "rps": rate["rps"], "rate_p99_ms": rate["p99_ms"]}
            bench.say(f"  {label}: p50 {lat['p50_ms']:.2f} ms (1 conn), {rate['rps']:,.0f} req/s ({RATE_CONNS} conns)")
        got["upstream"] = len(bench.upstream_log.since(expect=0, settle=0.5))
        got["rss"] = rc.hwm_mib()
        # anonymous (heap) vs file-backed (e.g. SQLite's memory-mapped index) pages of the RSS now, in MiB
        status = dict(l.split(":", 1) for l in Path(f"/proc/{rc.pid}/status").read_text().splitlines() if ":" in l)
        got["rss_anon"], got["rss_file"] = (int(status.get(k, "0 kB").split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
    finally:
        rc.stop()
    fig["rounds"].append(got)


def cli_times(bench, n: int, fig: dict) -> None:
    bench.settle()
    keep = int(fig["volume"] * 0.9)
    for label, argv in CLI:
        if argv[0] == "gc":
            argv = (*argv, "--max-size", f"{keep}B")
        secs, _ = cli(bench, fig["dir"], *argv)
        fig[label] = secs
        bench.say(f"7. {n:,} blobs: {label}: {secs:.2f} s")
    after = json.loads(cli(bench, fig["dir"], "stats", "--json")[1].stdout)
    fig["after_gc"] = after.get("store", after)


def median_round(fig: dict) -> None:
    """Each figure of a store: the median over its rounds (rounds interleave the sizes)."""
    rounds = fig["rounds"]
    fig["start"] = statistics.median(g["start"] for g in rounds)
    fig["upstream"] = sum(g["upstream"] for g in rounds)
    fig["rss"] = max(g["rss"] for g in rounds)
    fig["rss_anon"] = max(g["rss_anon"] for g in rounds)
    fig["rss_file"] = max(g["rss_file"] for g in rounds)
    for label, _, _ in HITS:
        fig[label] = {k: statistics.median(g[label][k] for g in rounds) for k in rounds[0][label]}
        fig[label]["runs"] = [g[label]["rps"] for g in rounds]


def scenario_scale(bench) -> None:
    figs = {n: build_size(bench, n) for n in bench.args.scale_sizes}
    try:
        for r in range(bench.args.scale_rounds):
            # interleaved (1k, 10k, 100k, 1k, ...): the shared machine's load spreads over every size
            for n, fig in figs.items():
                hit_round(bench, n, fig, r)
        for n, fig in figs.items():
            median_round(fig)
            cli_times(bench, n, fig)
    finally:
        for fig in figs.values():
            shutil.rmtree(fig["dir"], ignore_errors=True)
            for p in fig["paths"].values():
                p.unlink(missing_ok=True)
    bench.raw["scale"] = {n: {k: v for k, v in fig.items() if k not in ("dir", "paths")} for n, fig in figs.items()}
    sizes = list(figs)
    base = sizes[0]

    def rows(name, unit, get, target="", ok=None, note=None):
        ref = get(figs[base])
        for n in sizes:
            value = get(figs[n])
            r = (value / ref) if ref else None
            judged = ok(value, r, n) if ok else None
            bench.row(SECTION_SCALE, f"{name} — {n:,} blobs", value, unit, r, target, judged, note(n) if note else "")

    def size_note(n):
        c = figs[n]["counts"]
        return f"{c['blobs']:,} blobs, {c['manifests']:,} manifests, {c['tags']:,} tags; {figs[n]['disk'] / 2**20:.0f} MiB on disk"

    rows("building the store (store API, not a target)", "s", lambda f: f["build"], note=size_note)
    start_ok = lambda v, r, n: v < TARGET_CLI_S  # noqa: E731
    rows("mitmdump start until its listeners answer", "s", lambda f: f["start"], f"< {TARGET_CLI_S:.0f} s", start_ok)
    for label in ("blob HEAD", "blob GET (256 B, in-band)", "manifest GET by tag"):
        rows(f"{label}: p50 latency, 1 connection", "ms", lambda f: f[label]["p50_ms"], "<= 1.1x",
             lambda v, r, n: None if n == base else r <= 1.0 + (1 - TARGET_HIT),
             note=lambda n: f"p99 {figs[n][label]['p99_ms']:.2f} ms")
        rows(f"{label}: request rate, {RATE_CONNS} connections", "req/s", lambda f: f[label]["rps"], f">= {TARGET_HIT:.1f}x",
             lambda v, r, n: None if n == base else r >= TARGET_HIT,
             note=lambda n: f"p99 {figs[n][label]['rate_p99_ms']:.1f} ms; rounds: {', '.join(f'{v:,.0f}' for v in figs[n][label]['runs'])} req/s")
    rows("upstream requests during all the hits", "requests", lambda f: f["upstream"], "== 0", lambda v, r, n: v == 0)
    rows("peak RSS of mitmdump (VmHWM)", "MiB", lambda f: f["rss"],
         note=lambda n: f"after the hits: RssAnon {figs[n]['rss_anon']:.0f} MiB, RssFile {figs[n]['rss_file']:.0f} MiB (max over rounds)")
    for label, _ in CLI:
        target = "" if label == "regcache ls -a" else f"< {TARGET_CLI_S:.0f} s"
        note = None
        if label.startswith("regcache gc ("):
            note = lambda n: "after: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in figs[n]["after_gc"].items()
                                                    if k in ("blobs", "manifests", "tags"))  # noqa: E731
        rows(label, "s", lambda f: f[label], target, (lambda v, r, n: v < TARGET_CLI_S) if target else None, note=note)


DETAILS = [
    "- Section 7 (`python -m bench --only scale`): synthetic cache dirs built with regcache's own store API",
    f"  (`Store.new_staging_file`/`commit_blob`, `put_manifest`, `set_tag`, `set_public`): N blobs of {BLOB_BYTES} B,",
    f"  N/{MANIFEST_SHARE} OCI manifests each naming five of them (config + 4 layers), one tag per manifest, spread over",
    f"  {REPOS} repositories of quay.io recorded as public (membership from `set_tag`), so every hit needs no upstream.",
    "- regcache: a fresh mitmdump per size on the prepared dir (`fastpath: off` so blob GETs are served in-band,",
    "  `tag_ttl`/`public_ttl` 24h so stored tags and verdicts stay fresh), mirror listener :5000 in the router ns;",
    "  start = from spawning mitmdump until both listeners (HTTPS_PROXY :8080, mirror) accept a connection (polled every 0.1 s).",
    f"- Load: `bench/loadgen.py` (asyncio, HTTP/1.1 keep-alive) in the client ns, each request for a path picked at",
    f"  random from every blob / tag of the store. Latency: 1 connection for {LAT_SECONDS:g} s, median (p99 in the notes).",
    f"  Rate: {RATE_CONNS} connections for {RATE_SECONDS:g} s. Upstream requests: the upstream nginx access logs during all hits.",
    "- Every store is built first; then `--scale-rounds` rounds (default 3) each start a fresh mitmdump on every store in",
    "  turn (1k, 10k, 100k, 1k, …) and take all hit figures and the start time: the shared machine's load spreads",
    "  over every size. Each figure is the median over the rounds (the rates of each round are in the notes).",
    "- CLI: wall time of `regcache --dir DIR …` (a new Python process each, imports included) after mitmdump stopped;",
    "  gc removes 10 % of the store's volume (`--max-size` 90 % of it), the dry run first.",
]


if __name__ == "__main__":  # the builder, run as a child process: python -m bench.scale N DIR [OUT.json]
    n, d = int(sys.argv[1]), Path(sys.argv[2])
    info = build_store(d, n)
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(json.dumps(info))
    else:
        print(json.dumps({k: v for k, v in info.items() if not k.endswith("_paths")}))

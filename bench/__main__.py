"""python -m bench — regcache's benchmark suite (issue 4), in one run, side by side.

Builds a test World (tests/world), pushes a 1 GiB and a 100 MiB random blob straight to its
quay.io registry, then measures regcache against an nginx serving the same file and against
the CNCF distribution pull-through proxy in front of the same upstream:

  1. blob hit throughput (1 GiB): regcache fast path, regcache in-band, nginx TLS, nginx plain
  2. blob miss throughput (cold 1 GiB): regcache vs distribution proxy
  3. 20 concurrent curl clients on one uncached 100 MiB blob: upstream GETs and wall time
  4. peak RSS (VmHWM) of regcache, a fresh process per scenario
  5. warm skopeo copy of multi-layer images, and the upstream requests of a warm pull
  7. (--only scale) costs as the store grows: 1k/10k/100k-blob stores, hit latency and rate,
     mitmdump start, regcache stats/ls/gc/verify --help (bench/scale.py; written to bench/SCALE.md)
    ap.add_argument("--only", default="hits,misses,concurrency,skopeo,scale,rates,fleet", type=lambda v: set(v.split(",")),
                    help="sections to run (comma list of hits, misses, concurrency, skopeo, scale, rates, fleet; default all)")

prints a table with PASS/MISS per target and writes bench/RESULTS.md (section 7: bench/SCALE.md). Needs root (network
namespaces). See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.world import DEFAULT_SPECS, ImageSpec, LayerSpec, World  # noqa: E402
from tests.world.images import KiB, MiB  # noqa: E402

from . import fleet, infra, rates, scale  # noqa: E402
from .infra import GiB, UPSTREAM, Blob, DistProxy, Profile, RefNginx, RegcacheProc  # noqa: E402
from .report import Row, machine_info, profile_markdown, rows_json, text_table, targets_summary, write_results  # noqa: E402

# A multi-layer image on quay.io for the skopeo figures (besides the world's quay.io/org/s2:1).
BENCH_IMAGE = ImageSpec(
    "quay.io",
    "bench/app",
    "1",
    "docker",
    (
        LayerSpec("bench-app-base", 8 * MiB, 1),
        LayerSpec("bench-app-runtime", 4 * MiB, 1),
        LayerSpec("bench-app-lib", 2 * MiB, 1),
        LayerSpec("bench-app-bin", 1 * MiB, 1),
        LayerSpec("bench-app-conf", 64 * KiB, 6),
        LayerSpec("bench-app-small", 4 * KiB, 6),
    ),
)
SKOPEO_IMAGES = ("quay.io/org/s2:1", "quay.io/bench/app:1")

TARGET_FAST = 2.0
TARGET_INBAND = 0.25
TARGET_FAST_VS_PLAIN = 0.9  # the fast path is one sendfile loop, as nginx's plain HTTP is (issue 12)
TARGET_H1_VS_H2 = 1.0  # the default HTTP version to TLS clients must be the faster one
TARGET_MISS = 1.0
TARGET_RSS_MIB = 150.0
CONCURRENCY = 20
PROFILE_RATE = 100

SECTION_HIT = "1. blob hit, 1 GiB (curl in the client ns; reference: nginx TLS)"
SECTION_MISS = "2. blob miss, cold 1 GiB (wall time incl. redirect; reference: distribution proxy)"
SECTION_CONC = f"3. {CONCURRENCY} concurrent clients, one uncached 100 MiB blob (reference: distribution proxy)"
SECTION_RSS = "4. peak RSS of regcache (VmHWM of mitmdump, fresh process per scenario)"
SECTION_SKOPEO = "5. warm skopeo copy (median wall time; reference: distribution proxy) and warm-pull upstream requests"
SECTION_NOISE = "6. the machine is shared: CPU other processes took during each section (share of all cores)"
SECTION_SCALE = scale.SECTION_SCALE
SECTION_RATES = rates.SECTION_RATES
SECTION_FLEET = fleet.SECTION_FLEET
SECTION_SHORT = {"1": "hits", "2": "misses", "3": "concurrency", "5": "skopeo", "7": "scale", "8": "rates", "9": "fleet"}
UPSTREAM_HOSTS = ("quay.io", "registry-1.docker.io", "auth.docker.io", "production.cloudflare.docker.com", "gcr.io", "registry.k8s.io", "ghcr.io")


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[Row] = []
        self.profiles: list[str] = []
        self.details: list[str] = []
        self.raw: dict = {}
        self.py_spy = infra.find_py_spy() if args.profile != "none" else None
        self.t0 = time.monotonic()
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.meter = infra.CpuMeter()
        self.noise: list[tuple[str, float, float, float]] = []
        self.hit_cache: Path | None = None

    # ------------------------------------------------------------------ output

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def row(self, *a, **kw) -> Row:
        r = Row(*a, **kw)
        self.rows.append(r)
        extra = f"  {r.ratio:.2f}x" if r.ratio is not None else ""
        self.say(f"  -> {r.name}: {infra_fmt(r)}{extra} {r.status}")
        return r

    # ------------------------------------------------------------------ helpers

    def fresh_regcache(self, name: str, cache_dir: Path | None = None, in_band: bool = False) -> RegcacheProc:
        """in_band: `fastpath: off`, for the in-band scenarios: curl through HTTPS_PROXY does not
        follow the 307 that every client gets by default (and no fast-path port to wait for)."""
        if in_band:
            rc = RegcacheProc(self.world, self.work / name, cache_dir, "fastpath: off\n")
            return rc.start((infra.PROXY_PORT, infra.MIRROR_PORT))
        return RegcacheProc(self.world, self.work / name, cache_dir).start()

    def settle(self) -> None:
        """Between scenarios: dirty pages of the last one written out, so its writeback does
        not eat the next one's CPU."""
        os.sync()
        time.sleep(0.3)

    def repeat_curl(self, label: str, url: str, blob: Blob, n: int, args=(), env=None) -> tuple[float | None, str, list]:
        fetches = [infra.curl(self.world, url, args, env) for _ in range(n)]
        bad = [f for f in fetches if not f.ok(blob.size)]
        self.raw.setdefault("fetches", {})[label] = [f.__dict__ for f in fetches]
        if bad:
            return None, f"FAILED: {bad[0].code} {bad[0].size} bytes {bad[0].error[:200]}", fetches
        speeds = [f.speed / 1e6 for f in fetches]
        note = f"median of {n}: {', '.join(f'{s:,.0f}' for s in speeds)}; HTTP/{fetches[0].http_version}"
        return statistics.median(speeds), note, fetches

    def interleave(self, runs, n: int) -> list[tuple[float | None, str, float | None]]:
        """``n`` rounds of each (label, url, args, env, cpu) in turn, A B A B...: one shared-machine
        moment hits all alike. Per run: (median MB/s, note, median server CPU seconds per GiB),
        the CPU read from ``cpu()`` (cumulative seconds of the server) around each fetch."""
        fetches: dict[str, list] = {label: [] for label, *_ in runs}
        cpus: dict[str, list[float]] = {label: [] for label, *_ in runs}
        for _ in range(n):
            for label, url, args, env, cpu in runs:
                c0 = cpu()
                f = infra.curl(self.world, url, args, env)
                fetches[label].append(f)
                if f.ok(self.big.size):
                    cpus[label].append((cpu() - c0) * GiB / f.size)
        out = []
        for label, *_ in runs:
            self.raw.setdefault("fetches", {})[label] = [f.__dict__ for f in fetches[label]]
            bad = [f for f in fetches[label] if not f.ok(self.big.size)]
            if bad:
                out.append((None, f"FAILED: {bad[0].code} {bad[0].size} bytes {bad[0].error[:200]}", None))
                continue
            speeds = [f.speed / 1e6 for f in fetches[label]]
            note = f"median of {n}, interleaved: {', '.join(f'{v:,.0f}' for v in speeds)}; HTTP/{fetches[label][0].http_version}"
            out.append((statistics.median(speeds), note, statistics.median(cpus[label])))
        return out

    def maybe_profile(self, missed: bool, title: str, pid: int, action, rc: RegcacheProc | None = None) -> None:
        """Run ``action`` once more under py-spy if the target was missed (or --profile all)."""
        if self.args.profile == "none" or (self.args.profile == "auto" and not missed):
            return
        if not self.py_spy:
            self.profiles.append(f"### {title}\n\npy-spy not found (pip install py-spy); not profiled.\n")
            return
        slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")[:60]
        out = infra.OUT / "profiles" / self.run_id / f"{slug}.txt"
        self.say(f"  profiling: {title} (py-spy {PROFILE_RATE} Hz)")
        cpu0 = rc.cpu() if rc else None
        w0 = time.monotonic()
        prof = Profile(self.py_spy, pid, out, PROFILE_RATE)
        try:
            action()
        finally:
            path = prof.stop()
        wall = time.monotonic() - w0
        if path is None:
            self.profiles.append(f"### {title}\n\npy-spy wrote nothing; see {prof.log}.\n")
            return
        cpu_note = ""
        if rc and cpu0:
            cpu1 = rc.cpu()
            cpu_note = f"mitmdump CPU during the profiled run: {cpu1[0] - cpu0[0]:.1f} s in {wall:.1f} s wall (event-loop thread {cpu1[1] - cpu0[1]:.1f} s)."
        self.profiles.append(profile_markdown(title, infra.summarize_profile(path), path.relative_to(ROOT), PROFILE_RATE, cpu_note))

    # ------------------------------------------------------------------ scenarios

    def run(self) -> int:
        big_blobs = bool(self.args.only - {"scale", "rates", "fleet"})  # sections 7-9 bring their own content
        if big_blobs:
            self.say("blobs (generated once under bench/out/)")
            self.big = infra.make_blob("blob-1g", GiB, log=self.say)
            self.mid = infra.make_blob("blob-100m", 100 * MiB, log=self.say)
        self.say("world up")
        with World(specs=DEFAULT_SPECS + (BENCH_IMAGE,)) as world:
            self.world = world
            self.work = world.workdir / "bench"
            self.work.mkdir(parents=True, exist_ok=True)
            self.say(f"  world {world.prefix} up in {world.timings['total']:.1f}s")
            for blob in (self.big, self.mid) if big_blobs else ():
                secs = infra.push_blob(world, blob)
                self.say(f"  pushed {blob.name} {blob.digest[:19]}… to {UPSTREAM}/{infra.BLOB_REPO} (OCI monolithic upload) in {secs:.1f}s")
            self.upstream_log = infra.UpstreamLog(world, hosts=UPSTREAM_HOSTS)
            self.ref = RefNginx(world, self.work).start() if big_blobs else None
            try:
                for section, fn in (
                    (SECTION_MISS, self.scenario_miss),
                    (SECTION_HIT, self.scenario_hits),
                    (SECTION_CONC, self.scenario_concurrency),
                    (SECTION_SKOPEO, self.scenario_skopeo),
                    (SECTION_SCALE, lambda: scale.scenario_scale(self)),
                    (SECTION_RATES, lambda: rates.scenario_rates(self)),
                    (SECTION_FLEET, lambda: fleet.scenario_fleet(self)),
                ):
                    if SECTION_SHORT[section.split(".", 1)[0]] not in self.args.only:
                        continue
                    since = self.meter.snapshot()
                    try:
                        fn()
                    finally:
                        other, share = self.meter.foreign(since)
                        self.noise.append((section, other, share, time.monotonic() - since[0]))
            finally:
                if self.ref:
                    self.ref.stop()
                if self.hit_cache:
                    shutil.rmtree(self.hit_cache, ignore_errors=True)
        return 0

    # 2 + 4 ------------------------------------------------------------------

    def scenario_miss(self) -> None:
        """Cold 1 GiB: distribution proxy, regcache fast path, regcache in-band, interleaved
        over --miss-rounds rounds (the machine is shared: interleaving spreads its noise)."""
        big, world = self.big, self.world
        rounds = self.args.miss_rounds
        dist, fast, inband = [], [], []
        hwm = {"fast": 0.0, "inband": 0.0}
        mirror_url = f"http://{world.router_client_ip}:{infra.MIRROR_PORT}{big.api_path()}"
        for r in range(rounds):
            self.say(f"2. cold 1 GiB, round {r + 1}/{rounds}: distribution proxy")
            dp = DistProxy(world, self.work / f"distproxy-miss-{r}").start()
            f = infra.curl(world, f"{dp.base()}{big.api_path()}", ["--cacert", str(world.ca_cert_path)])
            dist.append((f, dp.hwm_mib()))
            dp.stop()
            self.settle()

            self.say(f"2. cold 1 GiB, round {r + 1}/{rounds}: regcache mirror -> fast path")
            # round 1's cache stays: section 1's hits are served from it
            cache = self.work / "cache-hit" if r == 0 else None
            rc = self.fresh_regcache(f"rc-miss-fast-{r}", cache)
            f = infra.curl(world, mirror_url, ["-L"])
            fast.append((f, rc.cpu()))
            hwm["fast"] = max(hwm["fast"], rc.hwm_mib())
            rc.stop()
            if r == 0:
                self.hit_cache = rc.cache_dir
            else:
                shutil.rmtree(rc.cache_dir, ignore_errors=True)
            self.settle()

            self.say(f"2. cold 1 GiB, round {r + 1}/{rounds}: regcache in-band (HTTPS_PROXY)")
            rc = self.fresh_regcache(f"rc-miss-inband-{r}", in_band=True)
            f = infra.curl(world, f"https://{UPSTREAM}{big.api_path()}", rc.curl_tls(), env=rc.proxy_env())
            inband.append((f, rc.cpu()))
            hwm["inband"] = max(hwm["inband"], rc.hwm_mib())
            rc.stop()
            shutil.rmtree(rc.cache_dir, ignore_errors=True)
            self.settle()
        self.raw["miss"] = {"dist": [f.__dict__ for f, _ in dist], "fast": [f.__dict__ for f, _ in fast], "inband": [f.__dict__ for f, _ in inband]}

        ref, note = self.median_mbps([f for f, _ in dist])
        self.row(SECTION_MISS, "distribution proxy (TLS, HTTP/2) — reference", ref, "MB/s", 1.0 if ref else None, note=note + f"; its RSS peak {max(h for _, h in dist):.0f} MiB")
        for label, samples, title in (("fast", fast, "regcache, mirror 307 -> fast path"), ("inband", inband, "regcache in-band (HTTPS_PROXY)")):
            value, note = self.median_mbps([f for f, _ in samples])
            if label == "fast" and any(f.redirects != 1 for f, _ in samples):
                note += "; NOT redirected to the fast path (served in-band)"
            cpu = statistics.median(c[0] for _, c in samples), statistics.median(c[1] for _, c in samples)
            r = self.row(SECTION_MISS, title, value, "MB/s", ratio(value, ref), f">= {TARGET_MISS:.1f}x", judge(ratio(value, ref), TARGET_MISS),
                         note + f"; regcache CPU {cpu[0]:.1f} s per GiB (event loop {cpu[1]:.1f} s)")
            self.rss(f"1 GiB miss, {'mirror -> fast path' if label == 'fast' else 'in-band'} (max of {rounds})", hwm[label])
            if not r.ok:
                self.profile_cold_miss(f"cold 1 GiB miss, {title}", label)

        self.say("2. the same blob straight from upstream, no cache (what upstream can deliver)")
        f = infra.curl(world, f"https://{UPSTREAM}{big.api_path()}", ["--cacert", str(world.ca_cert_path)])
        direct = f.mbps if f.ok(big.size) else None
        self.row(SECTION_MISS, "no cache: client -> upstream directly (TLS)", direct, "MB/s", ratio(direct, ref), note=fetch_note(f, big))
        self.settle()

    def median_mbps(self, fetches) -> tuple[float | None, str]:
        size = self.big.size
        bad = [f for f in fetches if not f.ok(size)]
        if bad:
            return None, fetch_note(bad[0], self.big)
        values = [f.mbps for f in fetches]
        return statistics.median(values), f"median of {len(values)}: {', '.join(f'{v:,.0f}' for v in values)} MB/s ({', '.join(f'{f.seconds:.1f}' for f in fetches)} s); HTTP/{fetches[0].http_version}"

    def profile_cold_miss(self, title: str, label: str) -> None:
        if self.args.profile == "none":
            return
        rc = self.fresh_regcache(f"rc-profile-miss-{label}")
        if label == "fast":
            url, args, env = f"http://{self.world.router_client_ip}:{infra.MIRROR_PORT}{self.big.api_path()}", ["-L"], None
        else:
            url, args, env = f"https://{UPSTREAM}{self.big.api_path()}", rc.curl_tls(), rc.proxy_env()
        self.maybe_profile(True, title, rc.pid, lambda: infra.curl(self.world, url, args, env), rc)
        rc.stop()
        shutil.rmtree(rc.cache_dir, ignore_errors=True)
        self.settle()

    # 1 + 4 ------------------------------------------------------------------

    def scenario_hits(self) -> None:
        n = self.args.repeat
        big, world = self.big, self.world
        if self.hit_cache is None:  # section 2 did not run: fill a cache for the hits
            rc = self.fresh_regcache("rc-fill", self.work / "cache-hit")
            f = infra.curl(world, f"http://{world.router_client_ip}:{infra.MIRROR_PORT}{big.api_path()}", ["-L"])
            rc.stop()
            if not f.ok(big.size):
                raise RuntimeError(f"could not fill the cache for the hits: {fetch_note(f, big)}")
            self.hit_cache = rc.cache_dir
            self.settle()
        ca = ["--cacert", str(world.ca_cert_path)]
        tls_url = self.ref.url(True, big.path.name)
        self.say(f"1. hits of the 1 GiB blob, {n} runs each: nginx")
        before = [infra.curl(world, tls_url, ca) for _ in range(n)]
        ref_tls11, note11, _ = self.repeat_curl("nginx-tls-h1", tls_url, big, n, ["--http1.1", *ca])

        mirror_url = f"http://{world.router_client_ip}:{infra.MIRROR_PORT}{big.api_path()}"
        self.say("1. fast-path hits, interleaved with nginx plain HTTP: signed URL from the mirror's 307")
        rc = self.fresh_regcache("rc-hit-fast", self.hit_cache)
        status, location, xcache = infra.redirect_url(world, mirror_url)
        plain_url = self.ref.url(False, big.path.name)
        if status == 307 and "/_regcache/blobs/" in location:
            # nginx plain and the fast path take turns (A, B, A, B...): both are one sendfile loop
            # over the same bytes, so what the shared machine does meanwhile hits both alike
            ab = self.interleave([("nginx-plain", plain_url, (), None, self.ref.cpu),
                                  ("rc-fast", location, (), None, lambda: rc.cpu()[0])], n)
            (plain, note_plain, plain_cpu), (fast, fast_note, fast_cpu) = ab
            fast_note += f"; 307 X-Cache: {xcache}"
        else:
            plain, note_plain, _ = self.repeat_curl("nginx-plain", plain_url, big, n)
            plain_cpu = fast_cpu = fast = None
            fast_note = f"no fast-path 307 (got {status} {location[:80]})"
        fast_hwm = rc.hwm_mib()
        fast_action = (lambda: infra.curl(world, location)) if fast is not None else None
        fast_rc = rc

        # the reference again, after regcache's fast path and before its in-band runs
        after = [infra.curl(world, tls_url, ca) for _ in range(n)]
        samples = before + after
        self.raw.setdefault("fetches", {})["nginx-tls"] = [f.__dict__ for f in samples]
        bad = [f for f in samples if not f.ok(big.size)]
        ref_tls = None if bad else statistics.median(f.speed / 1e6 for f in samples)
        ref_note = fetch_note(bad[0], big) if bad else (
            f"median of {len(samples)} ({n} before, {n} after regcache's fast path): {', '.join(f'{f.speed / 1e6:,.0f}' for f in samples)}; HTTP/{samples[0].http_version}")
        self.ref_tls = ref_tls
        self.row(SECTION_HIT, "nginx TLS (HTTP/2 offered, as by mitmproxy) — reference", ref_tls, "MB/s", 1.0 if ref_tls else None, note=ref_note)
        self.row(SECTION_HIT, "nginx TLS, HTTP/1.1", ref_tls11, "MB/s", ratio(ref_tls11, ref_tls), note=note11)
        self.row(SECTION_HIT, "nginx plain HTTP, sendfile", plain, "MB/s", ratio(plain, ref_tls), note=note_plain)
        r = self.row(SECTION_HIT, "regcache fast path (plain HTTP signed URL, sendfile)", fast, "MB/s", ratio(fast, ref_tls), f">= {TARGET_FAST:.1f}x", judge(ratio(fast, ref_tls), TARGET_FAST), fast_note)
        fast_vs_plain = ratio(fast, plain)
        r_plain = self.row(SECTION_HIT, "regcache fast path ÷ nginx plain HTTP sendfile (same bytes, interleaved)", fast_vs_plain, "x", fast_vs_plain,
                 f">= {TARGET_FAST_VS_PLAIN:.1f}x", judge(fast_vs_plain, TARGET_FAST_VS_PLAIN), "throughput ratio of the two rows above")
        if fast_cpu is not None and plain_cpu is not None:
            self.row(SECTION_HIT, "server CPU per GiB: regcache fast path (nginx plain HTTP = 1.00x)", fast_cpu, "CPU s", ratio(fast_cpu, plain_cpu),
                     note=f"nginx plain: {plain_cpu:.2f} CPU s per GiB (master + workers); both median per fetch, the same runs")
        if fast_action:
            self.maybe_profile(not (r.ok and r_plain.ok), "fast-path hit, 1 GiB", fast_rc.pid, fast_action, fast_rc)
        fast_rc.stop()
        self.rss("1 GiB hits, fast path", fast_hwm)

        self.say("1. in-band hits: HTTPS_PROXY, TLS through mitmproxy (`fastpath: off`; HTTP/1.1 to TLS clients by default)")
        rc = self.fresh_regcache("rc-hit-inband", self.hit_cache, in_band=True)
        env, tls = rc.proxy_env(), rc.curl_tls()
        blob_url = f"https://{UPSTREAM}{big.api_path()}"
        inband, note, fetches = self.repeat_curl("rc-inband", blob_url, big, n, tls, env=env)
        cpu = rc.cpu()
        note += f"; regcache CPU {cpu[0] / n:.1f} s per GiB (event loop {cpu[1] / n:.1f} s)"
        inband_hwm = rc.hwm_mib()
        r = self.row(SECTION_HIT, "regcache in-band (HTTPS_PROXY, TLS through mitmproxy, `fastpath: off`)", inband, "MB/s", ratio(inband, ref_tls), f">= {TARGET_INBAND:.2f}x", judge(ratio(inband, ref_tls), TARGET_INBAND), note)
        self.maybe_profile(not r.ok, f"in-band hit, 1 GiB, HTTPS_PROXY (HTTP/{fetches[0].http_version if fetches else '?'} to the client)", rc.pid, lambda: infra.curl(world, blob_url, tls, env=env), rc)
        rc.stop()
        self.rss("1 GiB hits, in-band (TLS, plain)", inband_hwm)

        self.say("1. in-band hits, HTTP/1.1 vs HTTP/2 to the client, interleaved (one regcache with `--set http2=true`)")
        rc = RegcacheProc(world, self.work / "rc-hit-h2", self.hit_cache, config="fastpath: off\n", options={"http2": "true"}).start((infra.PROXY_PORT, infra.MIRROR_PORT))
        env, tls = rc.proxy_env(), rc.curl_tls()
        cpu = lambda: rc.cpu()[0]  # noqa: E731
        (h2, note_h2, cpu_h2), (h1, note_h1, cpu_h1) = self.interleave(
            [("rc-inband-h2", blob_url, tls, env, cpu), ("rc-inband-h1", blob_url, ["--http1.1", *tls], env, cpu)], n)
        self.row(SECTION_HIT, "regcache in-band, HTTP/2 to the client (`http2=true`, mitmproxy's default)", h2, "MB/s", ratio(h2, ref_tls), note=note_h2 + (f"; {cpu_h2:.2f} CPU s per GiB" if cpu_h2 else ""))
        self.row(SECTION_HIT, "regcache in-band, HTTP/1.1 to the client (same process, interleaved)", h1, "MB/s", ratio(h1, ref_tls), note=note_h1 + (f"; {cpu_h1:.2f} CPU s per GiB" if cpu_h1 else "") + (f"; {ratio(h1, ref_tls11):.2f}x nginx TLS HTTP/1.1" if h1 and ref_tls11 else ""))
        h1_vs_h2 = ratio(h1, h2)
        self.row(SECTION_HIT, "regcache in-band HTTP/1.1 ÷ HTTP/2, throughput (why TLS clients get HTTP/1.1 by default)", h1_vs_h2, "x", h1_vs_h2,
                 f">= {TARGET_H1_VS_H2:.1f}x", judge(h1_vs_h2, TARGET_H1_VS_H2), "ratio of the two rows above")
        cpu_ratio = ratio(cpu_h1, cpu_h2)
        self.row(SECTION_HIT, "regcache in-band HTTP/1.1 ÷ HTTP/2, mitmdump CPU per GiB (less is better)", cpu_ratio, "x", cpu_ratio,
                 f"<= {TARGET_H1_VS_H2:.1f}x", cpu_ratio is not None and cpu_ratio <= TARGET_H1_VS_H2,
                 "the in-band path is bound by mitmproxy's one event-loop thread: its CPU per GiB is what a quiet machine's throughput follows")
        self.maybe_profile(self.args.profile == "all", "in-band hit, 1 GiB, HTTPS_PROXY, HTTP/2 (http2=true)", rc.pid, lambda: infra.curl(world, blob_url, tls, env=env), rc)
        self.rss("1 GiB hits, in-band HTTP/2 and HTTP/1.1 (`http2=true`)", rc.hwm_mib())
        rc.stop()

        self.say("1. HTTPS_PROXY clients, default config (307 to the fast path: direct, or back through the proxy)")
        rc = self.fresh_regcache("rc-hit-default", self.hit_cache)
        default, note, fetches = self.repeat_curl("rc-default", blob_url, big, n, ["-L", *rc.curl_tls()],
                                                  env=rc.proxy_env())
        if fetches and any(f.redirects != 1 for f in fetches):
            note += "; NOT redirected to the fast path"
        self.row(SECTION_HIT, "regcache HTTPS_PROXY, default config (307, then direct: cache host in NO_PROXY)",
                 default, "MB/s", ratio(default, ref_tls), note=note)
        status, location, _ = infra.redirect_url(world, mirror_url)
        if status == 307:
            # a client whose HTTP_PROXY is regcache too: the fast-path URL comes back through the proxy
            proxy = f"http://{world.router_client_ip}:{infra.PROXY_PORT}"
            viaproxy, note_vp, _ = self.repeat_curl("rc-default-back", location, big, n, ["--proxy", proxy])
            self.row(SECTION_HIT, "regcache HTTPS_PROXY, default config, HTTP_PROXY regcache too "
                     "(307 back through the proxy, plain HTTP)", viaproxy, "MB/s", ratio(viaproxy, ref_tls), note=note_vp)
        self.rss("1 GiB hits, HTTPS_PROXY default config (direct, back through the proxy)", rc.hwm_mib())
        rc.stop()
        shutil.rmtree(self.hit_cache, ignore_errors=True)
        self.hit_cache = None
        self.settle()

    # 3 + 4 ------------------------------------------------------------------

    def concurrent(self, label: str, url: str, args=(), env=None) -> tuple[float, int, list]:
        self.upstream_log.mark()
        wall, fetches = infra.curl_parallel(self.world, CONCURRENCY, url, args, env)
        entries = self.upstream_log.since(expect=1)
        gets = infra.blob_gets(entries, self.mid)
        self.raw.setdefault("concurrency", {})[label] = {"wall": wall, "upstream_gets": gets, "fetches": [f.__dict__ for f in fetches]}
        return wall, gets, fetches

    def conc_note(self, fetches, gets) -> str:
        ok = sum(1 for f in fetches if f.ok(self.mid.size))
        times = sorted(f.seconds for f in fetches if f.ok(self.mid.size))
        spread = f"; client times {times[0]:.2f}–{times[-1]:.2f} s" if times else ""
        return f"{ok}/{len(fetches)} complete 200s{spread}; {gets} upstream GET{'s' if gets != 1 else ''}"

    def scenario_concurrency(self) -> None:
        mid, world = self.mid, self.world
        self.say(f"3. {CONCURRENCY} concurrent clients, uncached 100 MiB: distribution proxy")
        dp = DistProxy(world, self.work / "distproxy-conc").start()
        dwall, dgets, fetches = self.concurrent("dist", f"{dp.base()}{mid.api_path()}", ["--cacert", str(world.ca_cert_path)])
        complete = all(f.ok(mid.size) for f in fetches)
        dist_hwm = dp.hwm_mib()
        dp.stop()
        self.settle()
        self.row(SECTION_CONC, "distribution proxy: wall time — reference", dwall if complete else None, "s", 1.0, note=self.conc_note(fetches, dgets) + f"; its RSS peak {dist_hwm:.0f} MiB")
        self.row(SECTION_CONC, "distribution proxy: upstream GETs of the blob", dgets, "GETs")

        for label, title in (("fast", "regcache mirror -> fast path"), ("inband", "regcache in-band (HTTPS_PROXY)")):
            self.say(f"3. {CONCURRENCY} concurrent clients, uncached 100 MiB: {title}")
            rc = self.fresh_regcache(f"rc-conc-{label}", in_band=label == "inband")
            if label == "fast":
                url, args, env = f"http://{world.router_client_ip}:{infra.MIRROR_PORT}{mid.api_path()}", ["-L"], None
            else:
                url, args, env = f"https://{UPSTREAM}{mid.api_path()}", rc.curl_tls(), rc.proxy_env()
            wall, gets, fetches = self.concurrent(label, url, args, env)
            cpu = rc.cpu()
            complete = all(f.ok(mid.size) for f in fetches)
            self.rss_row(f"{CONCURRENCY} concurrent cold 100 MiB, {'fast path' if label == 'fast' else 'in-band'}", rc)
            rwall = wall if complete else None
            self.row(SECTION_CONC, f"{title}: upstream GETs of the blob", gets, "GETs", target="== 1", ok=gets == 1 and complete)
            r = self.row(
                SECTION_CONC, f"{title}: wall time", rwall, "s", ratio(rwall, dwall), "<= distribution proxy", (rwall is not None and rwall <= dwall) if complete else False,
                self.conc_note(fetches, gets) + f"; regcache CPU {cpu[0]:.1f} s (event loop {cpu[1]:.1f} s)",
            )
            rc.stop()
            shutil.rmtree(rc.cache_dir, ignore_errors=True)
            self.settle()
            if not r.ok and self.args.profile != "none":
                rc = self.fresh_regcache(f"rc-conc-{label}-profile", in_band=label == "inband")
                env = rc.proxy_env() if label == "inband" else None
                args = rc.curl_tls() if label == "inband" else ["-L"]
                self.maybe_profile(True, f"{CONCURRENCY} concurrent cold 100 MiB, {title}", rc.pid, lambda: infra.curl_parallel(world, CONCURRENCY, url, args, env), rc)
                rc.stop()
                shutil.rmtree(rc.cache_dir, ignore_errors=True)
                self.settle()

    # 5 + 4 ------------------------------------------------------------------

    def skopeo_runs(self, label: str, src_of, env: dict, extra=()) -> tuple[dict, dict]:
        """Per image: cold copy (warms the cache), then --skopeo-repeat warm copies; returns
        ({image: median warm seconds}, {image: upstream requests during the warm copies})."""
        world = self.world
        walls, upstream = {}, {}
        for image in SKOPEO_IMAGES:
            dest = self.work / "skopeo-out"
            secs, r = infra.skopeo_copy(world, src_of(image), dest, env, extra)
            if r.returncode != 0:
                raise RuntimeError(f"skopeo copy {src_of(image)} ({label}) failed: {r.stderr[-1500:]}")
            self.upstream_log.mark()
            times = []
            for _ in range(self.args.skopeo_repeat):
                secs, r = infra.skopeo_copy(world, src_of(image), dest, env, extra)
                if r.returncode != 0:
                    raise RuntimeError(f"warm skopeo copy {src_of(image)} ({label}) failed: {r.stderr[-1500:]}")
                times.append(secs)
            entries = self.upstream_log.since(expect=0, settle=1.0)
            walls[image] = (statistics.median(times), times)
            upstream[image] = entries
            self.raw.setdefault("skopeo", {})[f"{label} {image}"] = {"times": times, "upstream": [(e["host"], e["method"], e["path"], e["status"]) for e in entries]}
        return walls, upstream

    def scenario_skopeo(self) -> None:
        world = self.world
        k = self.args.skopeo_repeat
        self.say(f"5. skopeo copy, warm, {k} runs per image: distribution proxy")
        dp = DistProxy(world, self.work / "distproxy-skopeo").start()
        certs = dp.cert_dir()
        host = f"{world.router_client_ip}:{infra.DISTPROXY_PORT}"
        dwalls, dups = self.skopeo_runs("dist", lambda img: f"docker://{host}/{img.split('/', 1)[1]}", {}, ["--src-cert-dir", str(certs)])
        dp.stop()
        for image, (med, times) in dwalls.items():
            n_up = len(dups[image]) / k
            self.row(SECTION_SKOPEO, f"distribution proxy: {image} — reference", med, "s", 1.0, note=f"runs {', '.join(f'{t:.3f}' for t in times)}; {n_up:g} upstream requests per warm pull ({summarize_requests(dups[image], k)})")

        for mode in ("proxy", "mirror"):
            title = "regcache HTTPS_PROXY" if mode == "proxy" else "regcache mirror (registries.conf)"
            self.say(f"5. skopeo copy, warm, {k} runs per image: {title}")
            rc = self.fresh_regcache(f"rc-skopeo-{mode}")
            if mode == "proxy":
                walls, ups = self.skopeo_runs(mode, lambda img: f"docker://{img}", rc.proxy_env())
            else:
                # Only the mirror is trusted: a silent fallback to quay.io itself would fail.
                conf = infra.mirror_conf(world, self.work / "registries.conf")
                walls, ups = self.skopeo_runs(mode, lambda img: f"docker://{img}", {}, ["--registries-conf", str(conf)])
                for image in SKOPEO_IMAGES:
                    repo = image.split("/", 1)[1].split(":")[0]
                    if f"registry=quay.io repo={repo} " not in rc.log_text():
                        raise RuntimeError(f"skopeo did not pull {image} through regcache's mirror")
            for image, (med, times) in walls.items():
                self.row(SECTION_SKOPEO, f"{title}: {image}, warm copy", med, "s", ratio(med, dwalls[image][0]), note=f"runs {', '.join(f'{t:.3f}' for t in times)}")
                n_up = len(ups[image]) / k
                self.row(
                    SECTION_SKOPEO, f"{title}: {image}, upstream requests per warm pull (tag within TTL)", n_up, "requests", target="== 0", ok=n_up == 0,
                    note=summarize_requests(ups[image], k) or "none",
                )
            self.rss_row(f"skopeo, {mode} mode (cold + {k} warm copies of {len(SKOPEO_IMAGES)} images)", rc)
            rc.stop()
            shutil.rmtree(rc.cache_dir, ignore_errors=True)

    # ------------------------------------------------------------------ RSS rows

    def rss_row(self, scenario: str, rc: RegcacheProc) -> None:
        self.rss(scenario, rc.hwm_mib())

    def rss(self, scenario: str, hwm: float) -> None:
        self.row(SECTION_RSS, scenario, hwm, "MiB", target=f"<= {TARGET_RSS_MIB:.0f} MiB", ok=hwm <= TARGET_RSS_MIB)

    def noise_rows(self) -> None:
        for section, other, share, wall in self.noise:
            num = section.split(".", 1)[0]
            self.rows.append(Row(SECTION_NOISE, f"during section {num} ({SECTION_SHORT[num]})", share * 100, "%", note=f"{other:.0f} CPU-s by other processes in {wall:.0f} s"))


# --------------------------------------------------------------------------- small helpers


def ratio(value, reference):
    if value is None or not reference:
        return None
    return value / reference


def judge(r, target) -> bool:
    return r is not None and r >= target


def infra_fmt(r: Row) -> str:
    from .report import fmt

    return fmt(r.value, r.unit)


def fetch_note(f, blob: Blob) -> str:
    if not f.ok(blob.size):
        return f"FAILED: HTTP {f.code}, {f.size} of {blob.size} bytes {f.error[:200]}"
    return f"{f.seconds:.2f} s; HTTP/{f.http_version}" + (f", {f.redirects} redirect" if f.redirects else "")


def summarize_requests(entries: list[dict], runs: int) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        path = e["path"].split("?")[0]
        if "/blobs/" in path:
            path = path.split("/blobs/")[0] + "/blobs/…"
        key = f"{e['method']} {e['host']}{path} {e['status']}"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{v / runs:g}× {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


DETAILS = [
    "- Everything runs in one `tests.world.World` (network namespaces: client → router → upstream;",
    "  2 cores shared by every process: upstream nginx + docker-registry, the cache under test, and curl).",
    "  The blobs are pushed to the world's quay.io registry (open, no credentials) with the OCI monolithic",
    "  upload (`POST /v2/bench/blobs/blobs/uploads/`, then one `PUT …&digest=` with the whole body).",
    "- regcache runs as `mitmdump -s addons/regcache.py --mode regular@8080 --mode reverse:https://quay.io@5000`",
    "  (the e2e `Regcache` helper), fast path on :5080, in the router ns; a fresh process per scenario.",
    "- Hits: `curl -o /dev/null -w %{speed_download}` in the client ns, median of `--repeat` runs (nginx TLS:",
    "  `--repeat` runs before and as many after regcache's fast-path runs, median of all). Fast path:",
    "  the signed `http://10.77.2.1:5080/_regcache/blobs/…` URL from the mirror's 307, fetched in turn with",
    "  nginx's plain-HTTP URL of the same bytes (nginx, regcache, nginx, regcache…), each fetch's server CPU",
    "  (nginx master + workers; mitmdump) read from /proc around it. In-band: `HTTPS_PROXY=http://10.77.2.1:8080",
    "  curl https://quay.io/v2/…` (mitmproxy terminates TLS; curl offers HTTP/2, regcache's default gives",
    "  HTTP/1.1); HTTP/1.1 vs HTTP/2: one regcache with `--set http2=true`, `curl` and `curl --http1.1` in turn.",
    "  nginx (1 GiB file from bench/out/, 2 workers, `sendfile on`) runs in the router ns too, on",
    "  10.77.2.1:8443 (TLS, `http2`) and :8088 (plain).",
    "- Misses: cold 1 GiB fetches (fresh cache / fresh storage each), `--miss-rounds` rounds of distribution",
    "  proxy, regcache fast path, regcache in-band, interleaved; median MB/s = size / curl's `time_total` (the",
    "  mirror's 307 hop included). The distribution proxy is `docker-registry serve` with",
    "  `proxy: remoteurl: https://quay.io`, TLS from the world's test CA, on 10.77.2.1:5443 in the router ns.",
    "  The first round's regcache fast-path cache is the one section 1's hits are served from.",
    f"- Concurrency: {CONCURRENCY} curl processes started together in the client ns; wall time of the whole batch;",
    "  upstream GETs counted in the quay.io nginx access log (`world.request_log`).",
    "- Peak RSS: `VmHWM` of the mitmdump process at the end of each scenario (one process per scenario).",
    "- skopeo: `skopeo copy docker://… dir:…` in the client ns; one cold copy, then `--skopeo-repeat` warm",
    "  copies (median); upstream requests are every access-log line of every upstream host during the warm",
    "  copies, per copy. Mirror mode uses registries.conf with `10.77.2.1:5000/quay.io` as an insecure mirror.",
    "- Section 6: machine-wide busy CPU (/proc/stat) minus the CPU of the benchmark's own process tree: what",
    "  other work on this shared machine took while each section ran. Figures taken under such load are lower",
    "  and noisier than on an idle machine; the side-by-side references suffer the same load.",
    "- Profiles: when a throughput target is missed, the scenario runs once more (fresh process) under",
    f"  `py-spy record --nonblocking --threads -r {PROFILE_RATE}`; the profiled run is not in the table.",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per hit measurement (median is reported; default 3)")
    ap.add_argument("--miss-rounds", type=int, default=2, help="cold 1 GiB fetches per cache, interleaved (median is reported; default 2)")
    ap.add_argument("--skopeo-repeat", type=int, default=5, help="warm skopeo copies per image (default 5)")
    ap.add_argument("--profile", choices=("auto", "all", "none"), default="auto", help="py-spy profiles: for missed targets (auto), also for some met ones (all), never")
    ap.add_argument("--only", default="hits,misses,concurrency,skopeo,scale,rates,fleet", type=lambda v: set(v.split(",")),
                    help="sections to run (comma list of hits, misses, concurrency, skopeo, scale, rates, fleet; default all)")
    ap.add_argument("--scale-sizes", default=list(scale.SIZES), type=lambda v: [int(x) for x in v.split(",")],
                    help="store sizes (blobs) of section 7, the first is the baseline (default 1000,10000,100000)")
    ap.add_argument("--scale-rounds", type=int, default=3, help="section 7: rounds over every store size, interleaved (median is reported; default 3)")
    ap.add_argument("--scale-results", default=str(Path(__file__).resolve().parent / "SCALE.md"), help="where section 7 is written (default bench/SCALE.md)")
    ap.add_argument("--rates-seconds", type=float, default=rates.SECONDS,
                    help=f"section 8: seconds each request-rate row runs (default {rates.SECONDS:g})")
    ap.add_argument("--rates-conns", default=list(rates.CONNS), type=lambda v: [int(x) for x in v.split(",")],
                    help="section 8: connection counts (default 64,512; RSS is read at the largest)")
    ap.add_argument("--rates-native", action="store_true",
                    help="section 8: profile with py-spy --native (C frames; blocking, slows regcache several times)")
    ap.add_argument("--fleet-sizes", default=list(fleet.SIZES), type=lambda v: [int(x) for x in v.split(",")],
                    help="section 9: simulated nodes per fleet pull (default 50,200)")
    ap.add_argument("--fleet-layer-scale", type=float, default=fleet.LAYER_SCALE,
                    help=f"section 9: the 10 layers are the issue's 1-50 MiB times this "
                         f"(default {fleet.LAYER_SCALE:g})")
    ap.add_argument("--fleet-procs", type=int, default=2,
                    help="section 9: client processes the simulated nodes are spread over (default 2)")
    ap.add_argument("--src", help="run regcache from this source tree's src/ instead (to try a patch)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"), help="where to write the report (default bench/RESULTS.md)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.src:
        src = Path(args.src).resolve() / "src"
        if not (src / "regcachelib").is_dir():
            ap.error(f"{src}/regcachelib does not exist")
        os.environ["PYTHONPATH"] = f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    command = os.environ.get("BENCH_COMMAND") or shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    # SIGTERM (and SIGINT in a background job) must unwind through World.__exit__
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    started = _dt.datetime.now().astimezone()
    src_root = Path(args.src).resolve() if args.src else ROOT
    source_at_start = infra.source_version(src_root)
    bench = Bench(args)
    mitmdump = str(Path(sys.executable).parent / "mitmdump")
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - report what was measured so far
        traceback.print_exc()
        bench.say("FAILED; writing what was measured so far")
        status = 1
    bench.noise_rows()
    elapsed = time.monotonic() - bench.t0
    machine = machine_info(mitmdump)
    source_at_end = infra.source_version(src_root)
    machine["regcache source"] = source_at_start
    if source_at_end != source_at_start:
        machine["regcache source"] += f" at the start, {source_at_end} at the end: src/ CHANGED DURING THE RUN, the figures mix both"
        print(f"WARNING: regcache source changed during the run ({source_at_start} -> {source_at_end}); the figures mix both", file=sys.stderr)
    machine["load average (1/5/15 min) at the end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    details = list(DETAILS)
    if "rates" in args.only:
        details += rates.DETAILS
    if "fleet" in args.only:
        details += fleet.DETAILS
    if args.src:
        details.insert(0, f"- regcache source: `{args.src}` (PYTHONPATH), not the installed tree.")
    # Section 7 has its own file: `--only scale` must not wipe the other sections' figures in RESULTS.md.
    scale_rows = [r for r in bench.rows if r.section == SECTION_SCALE or r.name.startswith("during section 7 ")]
    main_rows = [r for r in bench.rows if r not in scale_rows]
    written = []
    if args.only - {"scale"}:
        written.append(write_results(main_rows, machine, command, started, elapsed, details, bench.profiles, Path(args.results)))
    if "scale" in args.only:
        scale_details = ([details[0]] if args.src else []) + scale.DETAILS + [d for d in DETAILS if d.startswith("- Section 6")]
        written.append(write_results(scale_rows, machine, command, started, elapsed, scale_details, [], Path(args.scale_results),
                                     title="regcache benchmark results: costs as the store grows (issue 12, item 4)"))
    out = " and ".join(str(p) for p in written)
    infra.OUT.mkdir(parents=True, exist_ok=True)
    raw = infra.OUT / f"results-{bench.run_id}.json"
    raw.write_text(json.dumps({"command": command, "machine": machine, "rows": rows_json(bench.rows), "raw": bench.raw}, indent=1, default=str))
    print(text_table(bench.rows))
    print()
    print(targets_summary(bench.rows))
    print(f"\nwrote {out} and {raw} in {elapsed:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Section 8 of python -m bench (issue 12, item 2): request rates at cluster start-up.

Side by side in one run, at 64 and 512 concurrent keep-alive connections (bench/rateclient.py,
asyncio, HTTP/1.1 over TLS, closed loop, in the client ns):

- regcache through its mirror listener (TLS straight to :5000) and through HTTPS_PROXY (CONNECT to
  :8080, then TLS), default config;
- the CNCF distribution pull-through proxy (TLS, :5443; a client reaches it directly);
- a bare mitmproxy addon (bench/bare_addon.py) on the same listeners as regcache, answering every
  request from its ``request`` hook: the most any addon gets out of mitmproxy on this machine;

for: manifest GET by tag within the TTL, by tag at revalidation (a second regcache with
``tag_ttl: 0s``; the distribution proxy revalidates every tag GET anyway), by digest, blob HEAD,
blob GET of 1 MiB and of 16 KiB (hits; the 1 MiB one by the 307 to the fast path, which every
client follows directly, HTTPS_PROXY ones as with NO_PROXY; the 16 KiB one inline, both as the
default config answers), and the ``/v2/`` ping. Per row: requests/s, bytes/s for
blobs, p50/p99 latency, the server's CPU per request, the load client's own CPU, upstream requests;
regcache's VmRSS with 512 connections open and its VmHWM. py-spy profiles of regcache during
manifest-by-digest and 1 MiB GET runs (a separate run, not in the table) go to the report and to
bench/out/profiles/<run>/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.conftest import MITMDUMP

from . import infra
from .infra import UPSTREAM, DistProxy, RegcacheProc
from .report import profile_markdown

SECTION_RATES = "8. request rates, keep-alive TLS (references: distribution proxy, a bare mitmproxy addon)"
CLIENT = Path(__file__).resolve().parent / "rateclient.py"
BARE_ADDON = Path(__file__).resolve().parent / "bare_addon.py"
CONNS = (64, 512)
SECONDS = 3.0
MANIFEST_IMAGE = "quay.io/org/s2:1"
TARGET_BARE = 0.8  # manifest, HEAD and ping rows: regcache's own work at most a quarter of mitmproxy's
TARGET_DIST = 1.0  # tag rows (req/s) and blob rows (bytes/s) against the distribution proxy
TARGET_RSS_MIB = 150.0
PROFILE_RATE = 100
KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    method: str
    blob: bool = False  # judged in bytes/s against the distribution proxy
    tag: bool = False  # judged against the distribution proxy too


KINDS = (
    Kind("tag", "manifest GET by tag, within TTL", "GET", tag=True),
    Kind("reval", "manifest GET by tag, revalidated (tag_ttl 0)", "GET", tag=True),
    Kind("digest", "manifest GET by digest", "GET"),
    Kind("head", "blob HEAD", "HEAD"),
    Kind("blob1m", "blob GET 1 MiB, hit", "GET", blob=True),
    Kind("blob16k", "blob GET 16 KiB, hit", "GET", blob=True),
    Kind("ping", "/v2/ ping", "GET"),
)
KIND = {k.key: k for k in KINDS}
VIAS = {"mirror": "mirror (TLS to :5000)", "proxy": "HTTPS_PROXY (CONNECT + TLS)"}


# --------------------------------------------------------------------------- driving the client


def server_sample(pid: int) -> tuple[float, float, float]:
    """(monotonic time, process CPU seconds, event-loop thread CPU seconds)."""
    cpu, main = infra.cpu_seconds(pid)
    return time.monotonic(), cpu, main


def log_lines(world, host: str = UPSTREAM) -> int:
    try:
        with open(world.access_log_path(host), "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


class Session:
    """One rateclient run: N connections to one target, phases driven one by one."""

    def __init__(self, bench, name: str, target: dict, conns: int, phases: list[dict], server_pid: int,
                 profile: set[str] = frozenset(), profile_title: str = ""):
        self.bench, self.name, self.server_pid = bench, name, server_pid
        self.plan = {"target": target, "conns": conns, "phases": phases, "connect_path": "/v2/"}
        self.profile = profile
        self.profile_title = profile_title
        self.results: dict[str, dict] = {}
        self.connected: dict = {}
        self.rss_open: dict[str, int] = {}

    def run(self) -> "Session":
        """All phases back to back."""
        self.start()
        for phase in self.plan["phases"]:
            self.step(phase["name"])
        return self.finish()

    def start(self) -> "Session":
        """Start the client; returns once its connections are open and it waits for the first phase."""
        d = self.bench.work / "rates"
        d.mkdir(parents=True, exist_ok=True)
        plan_file = d / f"plan-{self.name}.json"
        plan_file.write_text(json.dumps(self.plan))
        self.stderr_path = d / f"client-{self.name}.stderr"
        world = self.bench.world
        with open(self.stderr_path, "w") as err:
            self.proc = world.popen(world.ns_client, [sys.executable, str(CLIENT), str(plan_file)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        # a hung client must not hang the benchmark (sessions stay open while the others take their turns)
        self.timer = threading.Timer(1800, lambda: _kill(self.proc))
        self.timer.start()
        try:
            self.connected = self.read("connected")
            if self.connected["conns"] < self.plan["conns"]:
                raise RuntimeError(f"{self.name}: only {self.connected['conns']} of {self.plan['conns']} connections: "
                                   f"{self.connected['first_errors']}")
            self.ready = self.read("ready")
        except BaseException:
            self.abort()
            raise
        return self

    def read(self, event: str) -> dict:
        line = self.proc.stdout.readline()
        ev = json.loads(line) if line.strip() else {}
        if ev.get("event") != event:
            self.abort()
            tail = self.stderr_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"rate client {self.name}: expected {event}, got {line.strip()[:200]!r} "
                               f"(exit {self.proc.poll()}): {tail}")
        return ev

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def step(self, phase: str) -> dict:
        """Run ``phase`` (the next one of the plan): the client's figures plus the server's CPU and the
        upstream requests during it."""
        if self.ready.get("phase") != phase:
            raise RuntimeError(f"rate client {self.name}: next phase is {self.ready.get('phase')}, not {phase}")
        world = self.bench.world
        prof = self.start_profile(phase) if phase in self.profile else None
        try:
            before = (server_sample(self.server_pid), log_lines(world))
            self.go()
            ev = self.read("result")
            after = (server_sample(self.server_pid), log_lines(world))
        finally:
            if prof is not None:
                prof[0].stop()
        wall = after[0][0] - before[0][0]
        ev["server_cpu_s"] = after[0][1] - before[0][1]
        ev["server_loop_cpu_s"] = after[0][2] - before[0][2]
        ev["server_cores"] = ev["server_cpu_s"] / wall if wall > 0 else 0.0
        ev["upstream"] = after[1] - before[1]
        if prof is not None:
            self.profile_report(prof, ev)
        self.results[phase] = ev
        self.ready = self.read("ready")
        return ev

    def finish(self) -> "Session":
        """Read the server's memory while every connection is still open, then close them."""
        try:
            if self.ready.get("phase") != "close":
                raise RuntimeError(f"rate client {self.name}: phase {self.ready.get('phase')} was never run")
            self.rss_open = infra.read_status(self.server_pid)
            self.go()
            self.read("done")
            self.proc.wait(30)
        finally:
            self.abort()
        self.bench.raw.setdefault("rates", {})[self.name] = {"connected": self.connected, "results": self.results,
                                                            "rss_open_kB": self.rss_open}
        return self

    def abort(self) -> None:
        self.timer.cancel()
        _kill(self.proc)

    # -- py-spy
    def start_profile(self, phase: str):
        slug = "".join(c if c.isalnum() else "-" for c in f"rates-{self.name}-{phase}".lower())
        out = infra.OUT / "profiles" / self.bench.run_id / f"{slug}.txt"
        native = getattr(self.bench.args, "rates_native", False)
        return start_profile(self.bench.py_spy, self.server_pid, out, native), out, phase

    def profile_report(self, prof, ev: dict) -> None:
        p, out, phase = prof
        path = p.out if p.out.exists() else None
        title = (f"{self.profile_title}: {KIND[phase].label}, {self.plan['conns']} connections "
                 f"({ev['rps']:,.0f} req/s while profiled)")
        if path is None:
            self.bench.profiles.append(f"### {title}\n\npy-spy wrote nothing; see {p.log}.\n")
            return
        note = (f"mitmdump CPU during the profiled phase: {ev['server_cpu_s']:.1f} s in {ev['wall']:.1f} s wall "
                f"(event-loop thread {ev['server_loop_cpu_s']:.1f} s); py-spy {'--native, ' if p.native else ''}"
                f"{'blocking' if p.native else '--nonblocking'} sampling slows the process: "
                "the rate above is not a figure.")
        raw = path.relative_to(infra.BENCH.parent)
        md = profile_markdown(title, infra.summarize_profile(path), raw, PROFILE_RATE, note)
        path.with_suffix(".md").write_text(md + "\n")
        self.bench.profiles.append(md)


class RatesProfile(infra.Profile):
    """py-spy record --nonblocking (Python frames; idle threads are recognised as idle), or with
    ``native`` --native (C frames too: OpenSSL, syscalls, the interpreter's GC), which py-spy only
    does blocking: it stops the process for every sample and slows it down several times, and
    samples parked in a syscall count as busy."""

    def __init__(self, py_spy: str, pid: int, out: Path, native: bool):
        self.out, self.native = out, native
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = out.with_suffix(".log")
        mode = ["--native"] if native else ["--nonblocking"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [py_spy, "record", "-p", str(pid), "-r", str(PROFILE_RATE), *mode, "--threads", "--format", "raw",
                 "-d", "600", "-o", str(out)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        time.sleep(0.7)  # attached


def start_profile(py_spy: str, pid: int, out: Path, native: bool) -> RatesProfile:
    p = RatesProfile(py_spy, pid, out, native)
    if native and p.proc.poll() is not None:  # this py-spy cannot unwind native frames here
        p = RatesProfile(py_spy, pid, out, False)
    return p


def _kill(proc) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


# --------------------------------------------------------------------------- servers and targets


# Every server runs for the whole section, each on its own ports, so rows of the same kind are taken
# back to back (server after server) and share whatever load the machine has at that moment.
PORTS = {  # system -> (HTTPS_PROXY port, mirror port, fast-path port)
    "regcache": (infra.PROXY_PORT, infra.MIRROR_PORT, infra.FASTPATH_PORT),
    "regcache-ttl0": (8082, 5002, 5082),
    "bare": (8081, 5001, None),
}


def regcache_proc(world, workdir: Path, system: str, config: str = "") -> RegcacheProc:
    """regcache with the ports of ``system``."""
    proxy, mirror, fast = PORTS[system]
    proc = RegcacheProc(world, workdir, None, f"fastpath_port: {fast}\n{config}")
    argv = proc.rc.argv
    for i, arg in enumerate(argv):  # RegcacheProc names the default ports
        if arg == f"regular@{infra.PROXY_PORT}":
            argv[i] = f"regular@{proxy}"
        elif arg.startswith("reverse:") and arg.endswith(f"@{infra.MIRROR_PORT}"):
            argv[i] = f"{arg.rsplit('@', 1)[0]}@{mirror}"
    return proc.start((proxy, mirror, fast))


def bare_proc(world, workdir: Path) -> RegcacheProc:
    """mitmdump with bench/bare_addon.py instead of regcache, with regcache's kind of listeners and its
    mitmdump options (same logging: mitmdump prints a line per flow for both)."""
    proxy, mirror, _ = PORTS["bare"]
    proc = RegcacheProc(world, workdir)
    confdir = workdir / "mitmproxy-conf"
    proc.rc.argv = [MITMDUMP, "-s", str(BARE_ADDON), "--set", f"confdir={confdir}", "--set", "termlog_verbosity=info",
                    "--set", "connection_strategy=lazy", "--set", "keep_host_header=true",
                    "--mode", f"regular@{proxy}", "--mode", f"reverse:https://{UPSTREAM}@{mirror}"]
    return proc.start((proxy, mirror))


def target(world, system: str, via: str) -> dict:
    ip = world.router_client_ip
    if system == "dist":
        return {"host": ip, "port": infra.DISTPROXY_PORT, "tls": True, "host_header": f"{ip}:{infra.DISTPROXY_PORT}"}
    proxy, mirror, _ = PORTS[system]
    if via == "mirror":
        return {"host": ip, "port": mirror, "tls": True, "host_header": f"{ip}:{mirror}"}
    return {"proxy": f"{ip}:{proxy}", "connect": f"{UPSTREAM}:443", "sni": UPSTREAM, "host_header": UPSTREAM}


class Rates:
    def __init__(self, bench):
        self.bench = bench
        self.world = bench.world
        self.seconds = bench.args.rates_seconds
        self.conns = bench.args.rates_conns
        image = self.world.image(MANIFEST_IMAGE)
        repo = image.repository
        self.blob1m = infra.make_blob("blob-1m", MiB, log=bench.say)
        self.blob16k = infra.make_blob("blob-16k", 16 * KiB, log=bench.say)
        for blob in (self.blob1m, self.blob16k):
            infra.push_blob(self.world, blob)
        self.paths = {
            "tag": f"/v2/{repo}/manifests/{image.tag}",
            "reval": f"/v2/{repo}/manifests/{image.tag}",
            "digest": f"/v2/{repo}/manifests/{image.digest}",
            "head": self.blob1m.api_path(),
            "blob1m": self.blob1m.api_path(),
            "blob16k": self.blob16k.api_path(),
            "ping": "/v2/",
        }
        self.sizes = {"blob1m": self.blob1m.size, "blob16k": self.blob16k.size}
        self.res: dict[tuple[str, str, int, str], dict] = {}  # (system, via, conns, kind) -> client result
        self.rss: dict[str, dict] = {}
        self.servers: dict = {}
        self.n = 0

    def phase(self, kind: str, via: str, seconds: float | None = None) -> dict:
        k = KIND[kind]
        return {"name": kind, "method": k.method, "path": self.paths[kind], "follow": True,
                "seconds": self.seconds if seconds is None else seconds, "expect_bytes": self.sizes.get(kind)}

    def say_result(self, system: str, via: str, conns: int, kind: str, r: dict) -> None:
        self.bench.say(f"  {kind}, {system}, {VIAS.get(via, 'direct TLS')}, {conns} conns: {r['rps']:,.0f} req/s, "
                       f"p50 {fmt_ms(r['p50_ms'])}, p99 {fmt_ms(r['p99_ms'])}, server {r['server_cores']:.2f} cores, "
                       f"client {r['client_cpu_share']:.2f} cores, statuses {r['statuses']}"
                       + (f", {r['errors']} errors {r['first_errors'][:1]}" if r["errors"] else ""))

    def warm(self, system: str, via: str, kinds, pid: int) -> None:
        """One connection, each path for a moment: the first request fills the cache."""
        s = Session(self.bench, f"warm-{system}-{via}", target(self.world, system, via), 1,
                    [self.phase(k, via, 0.3) for k in kinds], pid).run()
        for kind, r in s.results.items():
            if set(r["statuses"]) != {"200"}:
                raise RuntimeError(f"warming {system} {via} {kind} ({self.paths[kind]}): "
                                   f"statuses {r['statuses']} {r['first_errors']}")

    def start_servers(self) -> None:
        work = self.bench.work
        self.bench.say("8. starting the distribution proxy, the bare addon, regcache and regcache with tag_ttl 0s")
        self.servers["dist"] = DistProxy(self.world, work / "rates-distproxy").start()
        self.servers["bare"] = bare_proc(self.world, work / "rates-bare")
        self.servers["regcache"] = regcache_proc(self.world, work / "rates-regcache", "regcache")
        self.servers["regcache-ttl0"] = regcache_proc(self.world, work / "rates-regcache-ttl0", "regcache-ttl0",
                                                      "tag_ttl: 0s\n")
        self.warm("dist", "dist", self.layout()[0][2], self.servers["dist"].pid)
        for via in VIAS:
            self.warm("regcache", via, self.layout()[2][2], self.servers["regcache"].pid)
            self.warm("regcache-ttl0", via, ["reval"], self.servers["regcache-ttl0"].pid)

    def stop_servers(self) -> None:
        for name, server in self.servers.items():
            try:
                self.rss[name] = {"hwm": server.hwm_mib()}
            except (OSError, KeyError):
                pass
            try:
                server.stop()
            except AssertionError as e:  # its log shows an Addon error or a traceback: a finding, not a crash
                self.bench.say(f"8. {name}: {str(e)[:300]}")
                self.bench.row(SECTION_RATES, f"{name}: its log shows an error", None, "req/s", ok=False,
                               note=str(e)[:600])
            if isinstance(server, RegcacheProc):
                shutil.rmtree(server.cache_dir, ignore_errors=True)
        self.servers.clear()
        self.bench.settle()

    def layout(self) -> list[tuple[str, str, list[str]]]:
        """(system, via, kinds) of every client session, in the order each row's servers take turns."""
        plain = [k.key for k in KINDS if k.key != "reval"]
        # the distribution proxy revalidates every tag GET: its "tag" row is the reference of both tag rows
        out = [("dist", "dist", plain)]
        for via in VIAS:
            # the bare addon answers all small requests alike, but takes its turn in each of their rows: its
            # rate is then taken at the same moment as the regcache figure it is the reference of
            small = [k.key for k in KINDS if not k.blob]
            out += [("bare", via, small), ("regcache", via, plain), ("regcache-ttl0", via, ["reval"])]
        return out

    def measure(self, conns: int) -> None:
        # One listener at a time: regcache's memory is then read with ``conns`` connections open, not twice as many.
        # The distribution proxy has no second way in: it takes its turns with the mirror's rows.
        for via in VIAS:
            self.measure_group(conns, [(system, v, kinds) for system, v, kinds in self.layout()
                                       if v == via or (v == "dist" and via == next(iter(VIAS)))])

    def measure_group(self, conns: int, layout) -> None:
        """Every session of ``layout`` open at once (``conns`` connections each); each row's servers take turns."""
        sessions: dict[tuple[str, str], Session] = {}
        try:
            for system, via, kinds in layout:
                self.n += 1
                self.bench.say(f"8. {conns} connections to {system}, {VIAS.get(via, 'direct TLS')}")
                sessions[(system, via)] = Session(self.bench, f"{self.n:02d}-{system}-{via}-{conns}",
                                                  target(self.world, system, via), conns,
                                                  [self.phase(k, via) for k in kinds],
                                                  self.servers[system].pid).start()
            for kind in KIND:
                for (system, via), s in sessions.items():
                    if any(p["name"] == kind for p in s.plan["phases"]):
                        r = s.step(kind)
                        key = ("regcache" if system == "regcache-ttl0" else system, via, conns, kind)
                        self.res[key] = r
                        self.say_result(system, via, conns, kind, r)
            for (system, via), s in sessions.items():
                s.finish()
                if system == "regcache" and conns == max(self.conns):
                    # the other regcache (tag_ttl 0) is another process: only this listener's connections are here
                    self.rss.setdefault("regcache-open", {})[via] = s.rss_open.get("VmRSS", 0) / 1024
        finally:
            for s in sessions.values():
                s.abort()

    def profile(self) -> None:
        if self.bench.args.profile == "none" or not self.bench.py_spy:
            return
        for via in VIAS:
            self.bench.say(f"8. profiling regcache (py-spy), {VIAS[via]}, 64 connections: digest, blob1m")
            self.n += 1
            Session(self.bench, f"{self.n:02d}-profile-{via}", target(self.world, "regcache", via), 64,
                    [self.phase(k, via) for k in ("digest", "blob1m")], self.servers["regcache"].pid,
                    profile={"digest", "blob1m"}, profile_title=f"regcache, {VIAS[via]}").run()

    # -- the table
    def rows(self) -> None:
        b = self.bench
        for conns in self.conns:
            for k in KINDS:
                dk = "tag" if k.key == "reval" else k.key
                dist = self.res.get(("dist", "dist", conns, dk))
                if k.key != "reval" and dist:
                    b.row(SECTION_RATES, f"{k.label} · {conns} conns · distribution proxy (TLS) — reference",
                          rate(dist), "req/s", note=self.note(dist, k))
                for via, via_label in VIAS.items():
                    bare = self.res.get(("bare", via, conns, k.key))
                    if bare:
                        b.row(SECTION_RATES, f"{k.label} · {conns} conns · bare addon {via_label} — reference",
                              rate(bare), "req/s", note=self.note(bare, k))
                    r = self.res.get(("regcache", via, conns, k.key))
                    if r is None:
                        continue
                    self.judged_row(k, via_label, conns, r, dist, bare)
        for conns in self.conns:
            for via, via_label in VIAS.items():
                q = []
                for k in KINDS:
                    r, bare = self.res.get(("regcache", via, conns, k.key)), self.res.get(("bare", via, conns, k.key))
                    if r and bare and not k.blob and cpu_per_req(bare):
                        q.append((cpu_per_req(r) / cpu_per_req(bare), k.key))
                if q:
                    q.sort()
                    b.row(SECTION_RATES, f"CPU per request, regcache ÷ bare addon · {conns} conns · {via_label}",
                          q[len(q) // 2][0], "x", target="(<= 1.25x: the 0.8x rate target in CPU)",
                          note="median of the manifest, HEAD and ping rows; "
                               + ", ".join(f"{k} {v:.2f}x" for v, k in q))
        rc = self.rss.get("regcache-open", {})
        hwm = max((v["hwm"] for key, v in self.rss.items() if key.startswith("regcache") and "hwm" in v), default=None)
        big = max(self.conns)
        for via, via_label in VIAS.items():
            if via in rc:
                b.row(SECTION_RATES, f"regcache VmRSS with {big} connections open, {via_label}", rc[via], "MiB",
                      target=f"<= {TARGET_RSS_MIB:.0f} MiB", ok=rc[via] <= TARGET_RSS_MIB)
        if hwm is not None:
            others = ", ".join(f"{name} {v['hwm']:.0f} MiB" for name, v in self.rss.items()
                               if not name.startswith("regcache"))
            b.row(SECTION_RATES, "regcache peak RSS (VmHWM) over the section", hwm, "MiB",
                  target=f"<= {TARGET_RSS_MIB:.0f} MiB",
                  ok=hwm <= TARGET_RSS_MIB, note=f"peaks of the references: {others}")
        shares = [r["client_cpu_share"] for r in self.res.values()]
        if shares:
            b.row(SECTION_RATES, "load client's own CPU (rateclient.py), busiest phase", max(shares) * 100, "%",
                  note=f"median phase {sorted(shares)[len(shares) // 2] * 100:.0f} % of one core; "
                       "it shares the 2 cores with the server under test")

    def judged_row(self, k: Kind, via_label: str, conns: int, r: dict, dist: dict | None, bare: dict | None) -> None:
        value = rate(r)
        checks = []  # (text, ok)
        primary = None
        if k.blob:
            if dist:
                q = ratio(r["bytes_per_s"], dist["bytes_per_s"]) if ok_statuses(r) and ok_statuses(dist) else None
                primary = q
                checks.append((f">= {TARGET_DIST:.1f}x dist (bytes/s)", q is not None and q >= TARGET_DIST, q))
        else:
            if bare:
                q = ratio(value, rate(bare))
                primary = q
                checks.append((f">= {TARGET_BARE:.1f}x bare", q is not None and q >= TARGET_BARE, q))
            if k.tag and dist:
                q = ratio(value, rate(dist))
                checks.append((f">= {TARGET_DIST:.1f}x dist", q is not None and q >= TARGET_DIST, q))
        if dist and r["p99_ms"] is not None and dist["p99_ms"] is not None:
            checks.append(("p99 <= dist", value is not None and r["p99_ms"] <= dist["p99_ms"], None))
        verdicts = "; ".join(f"{t}: {'' if q is None else f'{q:.2f}x '}{'PASS' if ok else 'MISS'}"
                             for t, ok, q in checks)
        note = self.note(r, k) + (f"; {verdicts}" if verdicts else "")
        # CPU per request hardly depends on what else the shared machine runs: the steadier comparison
        ref, ref_name = (dist, "dist") if k.blob else (bare, "bare")
        if ref and cpu_per_req(ref):
            note += f"; CPU/req {cpu_per_req(r) / cpu_per_req(ref):.2f}x {ref_name}'s"
        if dist:
            note += f"; dist {rate(dist) or 0:,.0f} req/s, p99 {fmt_ms(dist['p99_ms'])}"
        self.bench.row(SECTION_RATES, f"{k.label} · {conns} conns · regcache {via_label}", value, "req/s", primary,
                       ", ".join(t for t, _, _ in checks), all(ok for _, ok, _ in checks) if checks else None, note)

    def note(self, r: dict, k: Kind) -> str:
        parts = []
        if not ok_statuses(r):
            parts.append(f"NOT ALL 200: statuses {r['statuses']}, {r['errors']} errors {r['first_errors'][:1]}")
        if k.blob:
            parts.append(f"{r['bytes_per_s'] / 1e6:,.0f} MB/s")
        parts.append(f"p50 {fmt_ms(r['p50_ms'])}, p99 {fmt_ms(r['p99_ms'])}")
        parts.append(f"server {r['server_cores']:.2f} cores, {cpu_per_req(r):.2f} ms CPU/req")
        parts.append(f"client {r['client_cpu_share']:.2f} cores")
        if r["upstream"]:
            parts.append(f"{r['upstream']} upstream requests")
        if r["reconnects"]:
            parts.append(f"{r['reconnects']} reconnects")
        return "; ".join(parts)


def cpu_per_req(r: dict) -> float:
    """The server's CPU milliseconds per completed request."""
    return r["server_cpu_s"] / r["completed"] * 1e3 if r["completed"] else 0.0


def ok_statuses(r: dict) -> bool:
    return set(r["statuses"]) == {"200"} and not r["errors"]


def rate(r: dict) -> float | None:
    return r["rps"] if ok_statuses(r) else None


def ratio(value, reference):
    if value is None or not reference:
        return None
    return value / reference


def fmt_ms(v) -> str:
    return "n/a" if v is None else (f"{v:.1f} ms" if v < 100 else f"{v:,.0f} ms")


def scenario_rates(bench) -> None:
    rates = Rates(bench)
    try:
        rates.start_servers()
        for conns in rates.conns:
            rates.measure(conns)
        rates.profile()
    finally:
        rates.stop_servers()
        rates.rows()


DETAILS = [
    "- Section 8 (`python -m bench --only rates`): `bench/rateclient.py` (asyncio, HTTP/1.1 keep-alive, bodies counted",
    "  not kept) in the client ns opens N connections (64, 512), each with one `/v2/` request, then runs each row for",
    f"  `--rates-seconds` ({SECONDS:g} s) on those same connections, closed loop (each connection sends its next",
    "  request when the last answer is complete); requests in flight at the end are awaited, and the rate is all",
    "  completed requests over the row's whole wall time. Mirror: TLS straight to",
    "  regcache's reverse listener :5000 (Host 10.77.2.1:5000); HTTPS_PROXY: `CONNECT quay.io:443` to :8080, then TLS,",
    "  Host quay.io; distribution proxy: TLS to :5443. ALPN offers http/1.1 only. A blob GET (mirror or",
    "  HTTPS_PROXY, default config) follows regcache's 307 to the fast path directly (the cache host in NO_PROXY) on a",
    "  second keep-alive connection of the same client slot: redirect + fetch count as one.",
    f"- What is asked for: `{MANIFEST_IMAGE}` by tag and by digest, a 1 MiB and a 16 KiB random blob pushed to",
    "  quay.io/bench/blobs (HEAD is of the 1 MiB one), `/v2/`. Revalidation rows: a second regcache with",
    "  `tag_ttl: 0s` (every tag GET is a HEAD upstream); the distribution proxy revalidates every tag GET anyway,",
    "  so its tag row is the reference for both.",
    "- Order: all four servers run for the whole section on their own ports (regcache 8080/5000/5080, regcache",
    "  `tag_ttl: 0s` 8082/5002/5082, bare addon 8081/5001, distribution proxy 5443) and are warmed first (one",
    "  connection, every path). For each connection count and listener (mirror with the distribution proxy, then",
    "  HTTPS_PROXY) every client session is opened first (all 64 or 512 connections of each, idle until their turn);",
    "  then each row's servers take turns, back to back, so regcache and the bare addon are measured seconds apart",
    "  and share the machine's load of that moment (the distribution proxy's rows are up to a minute from the",
    "  HTTPS_PROXY ones).",
    "- Bare addon: `mitmdump -s bench/bare_addon.py` with regcache's listeners and options (lazy connections,",
    "  `termlog_verbosity=info`, the flow line mitmdump prints), answering every request in its `request` hook with",
    "  512 bytes: mitmproxy's own per-request cost, the ceiling of any addon. It is the reference of the manifest,",
    "  HEAD and ping rows, per listener and connection count, and takes its turn in each of them (same request).",
    "- Server CPU: /proc/<pid>/stat around each row (cores = CPU-s per wall-s; per request = CPU / requests); the",
    "  load client reports its own CPU (getrusage) the same way: it runs on the same 2 cores and takes from the",
    "  server whatever it uses. Upstream requests: lines the quay.io access log grew by during the row.",
    "- On a busy machine the rates of rows taken one after another move with the other load (section 6 says how",
    "  much there was); the server's CPU milliseconds per request hardly do: each regcache row's notes give it as a",
    "  ratio to its reference's (bare addon; distribution proxy for blobs).",
    "- RSS: regcache's VmRSS read while the 512 connections of one listener are still open (after its last row;",
    "  the HTTPS_PROXY figure after the mirror's 512 were closed), VmHWM at the end.",
    "- Profiles: after the measured rows, the manifest-by-digest and 1 MiB rows run once more at 64 connections",
    f"  under `py-spy record --nonblocking --threads -r {PROFILE_RATE}` (`--rates-native`: `--native`, blocking), one",
    "  profile per row; their rates are not in the table.",
]

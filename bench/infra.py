"""What the benchmark builds and runs besides the World: blobs, reference servers, regcache
processes with their memory and CPU figures, the profiler, and curl/skopeo in the client ns.

Everything here is started through ``World.popen`` (so ``World.down()`` kills what a crash
leaves behind) and stopped explicitly by the caller as soon as its scenario is over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.conftest import Regcache, mirror_registries_conf, stop_process_group
from tests.world import PKI, World
from tests.world.world import REGISTRY_BIN, REGISTRY_PORTS, NGINX_BIN

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"

MiB = 1024 * 1024
GiB = 1024 * MiB

# Where the benchmark puts its servers (router namespace, client-facing address).
PROXY_PORT = 8080  # regcache regular mode (HTTPS_PROXY)
MIRROR_PORT = 5000  # regcache reverse mode (registry mirror) for quay.io
FASTPATH_PORT = 5080  # regcache fast path
NGINX_TLS_PORT = 8443  # reference nginx, TLS
NGINX_PLAIN_PORT = 8088  # reference nginx, plain HTTP with sendfile
DISTPROXY_PORT = 5443  # distribution pull-through proxy, TLS

UPSTREAM = "quay.io"  # the open registry every cache sits in front of
BLOB_REPO = "bench/blobs"


# --------------------------------------------------------------------------- blobs


@dataclass
class Blob:
    name: str
    path: Path
    size: int
    hex: str

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"

    def api_path(self, repo: str = BLOB_REPO) -> str:
        return f"/v2/{repo}/blobs/{self.digest}"


def make_blob(name: str, size: int, log=print) -> Blob:
    """A random blob of ``size`` bytes in bench/out/, generated once and reused.

    The digest is kept beside it (``.sha256``) with the file's size and mtime, so a later run
    neither regenerates nor rehashes it.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.bin"
    meta = OUT / f"{name}.sha256"
    if path.exists() and meta.exists():
        st = path.stat()
        try:
            m = json.loads(meta.read_text())
            if m["size"] == size == st.st_size and m["mtime_ns"] == st.st_mtime_ns:
                return Blob(name, path, size, m["hex"])
        except (ValueError, KeyError):
            pass
    log(f"  generating {path} ({size // MiB} MiB of random bytes, once)")
    h = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    os.replace(tmp, path)
    st = path.stat()
    meta.write_text(json.dumps({"hex": h.hexdigest(), "size": size, "mtime_ns": st.st_mtime_ns}) + "\n")
    return Blob(name, path, size, h.hexdigest())


def push_blob(world: World, blob: Blob, host: str = UPSTREAM, repo: str = BLOB_REPO) -> float:
    """Push a blob straight to the registry behind ``host`` with the OCI monolithic upload
    (``POST /v2/<repo>/blobs/uploads/`` then one ``PUT <location>&digest=`` with the whole
    body); returns the seconds it took. Checks the registry then answers the digest."""
    base = f"http://127.0.0.1:{REGISTRY_PORTS[host]}"
    t0 = time.monotonic()
    r = world.run(world.ns_upstream, ["curl", "-sS", "-X", "POST", "-o", "/dev/null", "-D", "-", f"{base}/v2/{repo}/blobs/uploads/"])
    location = next((l.split(":", 1)[1].strip() for l in r.stdout.splitlines() if l.lower().startswith("location:")), None)
    if not location or not r.stdout.startswith("HTTP/1.1 202"):
        raise RuntimeError(f"upload POST failed: {r.stdout[:500]}")
    location = re.sub(r"^https?://[^/]+", "", location)  # the registry names its public host
    sep = "&" if "?" in location else "?"
    url = f"{base}{location}{sep}digest={blob.digest}"
    r = world.run(
        world.ns_upstream,
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(blob.path), "-H", "Content-Type: application/octet-stream", url],
        timeout=300,
    )
    if r.stdout.strip() != "201":
        raise RuntimeError(f"upload PUT of {blob.name} answered {r.stdout!r}: {r.stderr}")
    r = world.run(world.ns_upstream, ["curl", "-sS", "-I", f"{base}/v2/{repo}/blobs/{blob.digest}"])
    if " 200" not in r.stdout.splitlines()[0] or blob.digest not in r.stdout:
        raise RuntimeError(f"registry does not serve the pushed blob: {r.stdout}")
    return time.monotonic() - t0


# --------------------------------------------------------------------------- process figures


def read_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(whole process, main thread) user+system CPU seconds."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path):
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return stat(f"/proc/{pid}/stat"), stat(f"/proc/{pid}/task/{pid}/stat")


def tree_cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process and its live children (nginx: master + workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: ppid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# --------------------------------------------------------------------------- regcache


class RegcacheProc:
    """A fresh mitmdump + regcache in the router ns (the e2e ``Regcache`` helper), with its
    regular (HTTPS_PROXY) listener, a mirror listener (quay.io unless ``mirror_of`` says
    otherwise) and the fast path; ``options`` are extra mitmdump ``--set`` options."""

    def __init__(self, world: World, workdir: Path, cache_dir: Path | None = None, config: str | None = None,
                 mirror_of: str = UPSTREAM, options: dict | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.rc = Regcache(
            world,
            workdir,
            cache_dir or workdir / "cache",
            [f"regular@{PROXY_PORT}", f"reverse:https://{mirror_of}@{MIRROR_PORT}"],
            dict(options or {}),
            config if config is not None else f"fastpath_port: {FASTPATH_PORT}\n",
        )
        self.world = world
        self.workdir = workdir
        self.pid = 0
        self._cpu0 = (0.0, 0.0)

    def start(self, ports=(PROXY_PORT, MIRROR_PORT, FASTPATH_PORT)) -> "RegcacheProc":
        """Start mitmdump and wait until each of ``ports`` accepts a connection."""
        self.rc.start(list(ports))
        # `ip netns exec` execs the command: the Popen pid is mitmdump itself
        self.pid = self.rc.proc.pid
        cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        if b"mitmdump" not in cmdline:
            raise RuntimeError(f"pid {self.pid} is not mitmdump: {cmdline[:200]!r}")
        self._cpu0 = cpu_seconds(self.pid)
        return self

    @property
    def cache_dir(self) -> Path:
        return self.rc.cache_dir

    def hwm_mib(self) -> float:
        return read_status(self.pid)["VmHWM"] / 1024

    def cpu(self) -> tuple[float, float]:
        """CPU seconds since start() returned: (whole process, event-loop thread)."""
        now = cpu_seconds(self.pid)
        return now[0] - self._cpu0[0], now[1] - self._cpu0[1]

    def client_bundle(self) -> Path:
        return self.rc.client_bundle()

    def proxy_env(self, **extra) -> dict:
        return {"HTTPS_PROXY": f"http://{self.world.router_client_ip}:{PROXY_PORT}", "SSL_CERT_FILE": str(self.client_bundle()), **extra}

    def curl_tls(self) -> list[str]:
        """curl ignores SSL_CERT_FILE: trust the world's CA and this regcache's CA explicitly."""
        return ["--cacert", str(self.client_bundle())]

    def log_text(self) -> str:
        return self.rc.log_text()

    def stop(self) -> None:
        self.rc.stop()


# --------------------------------------------------------------------------- reference servers


def issue_cert(world: World, name: str) -> tuple[Path, Path]:
    """A TLS server cert from the world's test CA for the router's client-facing address."""
    leaf = PKI(world.pki_dir).issue([name], ips=[world.router_client_ip], basename=name)
    return leaf.cert_path, leaf.key_path


class RefNginx:
    """nginx in the router ns serving bench/out/ over TLS (HTTP/2 offered, like mitmproxy)
    and over plain HTTP with sendfile: what a static file server does on this machine."""

    def __init__(self, world: World, workdir: Path, root: Path = OUT):
        self.world = world
        self.dir = workdir / "ref-nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        cert, key = issue_cert(world, "bench-ref")
        ip = world.router_client_ip
        d = self.dir
        self.conf = d / "nginx.conf"
        self.conf.write_text(
            "daemon off;\nmaster_process on;\nuser root root;\nworker_processes 2;\n"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  types { }\n  default_type application/octet-stream;\n  access_log off;\n"
            "  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 65;\n  ssl_protocols TLSv1.2 TLSv1.3;\n"
            f"  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n"
            f"  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n"
            f"  server {{ listen {ip}:{NGINX_TLS_PORT} ssl http2; ssl_certificate {cert}; ssl_certificate_key {key}; root {root}; }}\n"
            f"  server {{ listen {ip}:{NGINX_PLAIN_PORT}; root {root}; }}\n"
            "}\n"
        )
        self.proc = None

    def start(self) -> "RefNginx":
        log = open(self.dir / "stderr", "ab")
        self.proc = self.world.popen(self.world.ns_router, [NGINX_BIN, "-p", str(self.dir), "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_listening(self.world, [NGINX_TLS_PORT, NGINX_PLAIN_PORT], self.proc, self.dir / "error.log")
        return self

    def cpu(self) -> float:
        """CPU seconds nginx (master and workers) has used so far."""
        return tree_cpu_seconds(self.proc.pid)

    def url(self, tls: bool, name: str) -> str:
        if tls:
            return f"https://{self.world.router_client_ip}:{NGINX_TLS_PORT}/{name}"
        return f"http://{self.world.router_client_ip}:{NGINX_PLAIN_PORT}/{name}"

    def stop(self) -> None:
        stop_proc(self.proc)


class DistProxy:
    """CNCF distribution (docker-registry 2.8) as a pull-through cache (``proxy.remoteurl``)
    in front of the same upstream, in the router ns, TLS from the world's test CA."""

    def __init__(self, world: World, workdir: Path, remote: str = UPSTREAM):
        self.world = world
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        cert, key = issue_cert(world, "bench-distproxy")
        cfg = {
            "version": "0.1",
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{world.router_client_ip}:{DISTPROXY_PORT}", "tls": {"certificate": str(cert), "key": str(key)}},
            "proxy": {"remoteurl": f"https://{remote}"},
        }
        self.config = self.dir / "config.yml"
        self.config.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        self.proc = None
        self.pid = 0

    def start(self) -> "DistProxy":
        log = open(self.dir / "registry.log", "ab")
        # Go reads its trust store from SSL_CERT_FILE: the test CA makes https://quay.io valid
        self.proc = self.world.popen(
            self.world.ns_router, [REGISTRY_BIN, "serve", str(self.config)], env={"SSL_CERT_FILE": str(self.world.ca_bundle_path)}, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.pid = self.proc.pid
        wait_listening(self.world, [DISTPROXY_PORT], self.proc, self.dir / "registry.log")
        return self

    def base(self) -> str:
        return f"https://{self.world.router_client_ip}:{DISTPROXY_PORT}"

    def cert_dir(self) -> Path:
        d = self.dir / "certs.d"
        d.mkdir(exist_ok=True)
        shutil.copy(self.world.ca_cert_path, d / "ca.crt")
        return d

    def hwm_mib(self) -> float:
        return read_status(self.pid)["VmHWM"] / 1024

    def stop(self) -> None:
        stop_proc(self.proc)
        shutil.rmtree(self.storage, ignore_errors=True)


def wait_listening(world: World, ports, proc, log_path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            r = world.run(world.ns_router, ["ss", "-Htln", f"sport = :{port}"], check=False)
            if r.stdout.strip():
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"{proc.args} is not listening on {port}:\n{tail}")
            time.sleep(0.05)


def stop_proc(proc, timeout: float = 10) -> None:
    if proc is not None:
        stop_process_group(proc, timeout)


# --------------------------------------------------------------------------- clients


@dataclass
class Fetch:
    """One curl download in the client ns."""

    code: int
    size: int
    seconds: float
    speed: float  # curl's %{speed_download}, bytes/s
    http_version: str
    redirects: int = 0
    error: str = ""

    def ok(self, size: int) -> bool:
        return self.code == 200 and self.size == size and not self.error

    @property
    def mbps(self) -> float:
        """Wall-clock throughput (size / total time), MB/s (10^6 bytes/s)."""
        return self.size / self.seconds / 1e6 if self.seconds > 0 else 0.0


CURL_FORMAT = "%{http_code} %{size_download} %{time_total} %{speed_download} %{http_version} %{num_redirects}"


def curl(world: World, url: str, args=(), env=None, timeout=300) -> Fetch:
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(timeout), "-w", CURL_FORMAT, *args, url]
    r = world.run(world.ns_client, argv, env=env, check=False, timeout=timeout + 30)
    try:
        code, size, total, speed, version, redirects = r.stdout.split()
        return Fetch(int(code), int(size), float(total), float(speed), version, int(redirects), r.stderr.strip() if r.returncode else "")
    except ValueError:
        return Fetch(0, 0, 0.0, 0.0, "", 0, f"curl exit {r.returncode}: {r.stderr.strip()} {r.stdout.strip()}")


def redirect_url(world: World, url: str, env=None) -> tuple[int, str, str]:
    """(status, Location, X-Cache) of one request, without following it."""
    r = world.run(world.ns_client, ["curl", "-sS", "-o", "/dev/null", "-D", "-", url], env=env, check=False, timeout=120)
    lines = r.stdout.splitlines()
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    return status, headers.get("location", ""), headers.get("x-cache", "")


def curl_parallel(world: World, n: int, url: str, args=(), env=None, timeout=300) -> tuple[float, list[Fetch]]:
    """``n`` curl processes at once in the client ns; (wall seconds, their results)."""
    fmt = CURL_FORMAT + "\\n"
    quoted = " ".join(_shq(a) for a in ("curl", "-sS", "-o", "/dev/null", "--max-time", str(timeout), "-w", fmt, *args, url))
    script = f"for i in $(seq {n}); do {quoted} & done; wait"
    t0 = time.monotonic()
    r = world.run(world.ns_client, ["bash", "-c", script], env=env, check=False, timeout=timeout + 30)
    wall = time.monotonic() - t0
    fetches = []
    for line in r.stdout.splitlines():
        try:
            code, size, total, speed, version, redirects = line.split()
            fetches.append(Fetch(int(code), int(size), float(total), float(speed), version, int(redirects)))
        except ValueError:
            fetches.append(Fetch(0, 0, 0.0, 0.0, "", 0, line))
    while len(fetches) < n:
        fetches.append(Fetch(0, 0, 0.0, 0.0, "", 0, r.stderr.strip()[:300] or "no output"))
    return wall, fetches


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def skopeo_copy(world: World, src: str, dest: Path, env: dict, extra=(), timeout=180) -> tuple[float, subprocess.CompletedProcess]:
    if dest.exists():
        shutil.rmtree(dest)
    argv = ["skopeo", "copy", "-q", *extra, src, f"dir:{dest}"]
    t0 = time.monotonic()
    r = world.run(world.ns_client, argv, env={"REGISTRY_AUTH_FILE": str(world.auth_file), **env}, check=False, timeout=timeout)
    return time.monotonic() - t0, r


def mirror_conf(world: World, path: Path) -> Path:
    """registries.conf: quay.io through regcache's mirror listener (path-prefix mirror)."""
    return mirror_registries_conf(path, f"{world.router_client_ip}:{MIRROR_PORT}", registries=(UPSTREAM,))


# --------------------------------------------------------------------------- upstream request log


class UpstreamLog:
    """Requests that reached the upstream hosts since ``mark()`` (nginx JSON access logs)."""

    def __init__(self, world: World, hosts=(UPSTREAM,)):
        self.world = world
        self.hosts = hosts
        self.offsets = {h: 0 for h in hosts}

    def mark(self) -> None:
        # nginx writes a line when it finalizes a request: let stragglers of before land first
        time.sleep(0.3)
        self.offsets = {h: len(self.world.request_log(h)) for h in self.hosts}

    def since(self, expect: int = 1, settle: float = 0.5) -> list[dict]:
        """Entries since mark(): waits (up to 5 s) for at least ``expect`` new lines on the
        first host, then ``settle`` seconds more for stragglers."""
        first = self.hosts[0]
        if expect:
            self.world.wait_request_log(first, count=self.offsets[first] + expect, timeout=5)
        time.sleep(settle)
        out = []
        for h in self.hosts:
            out += self.world.request_log(h)[self.offsets[h]:]
        return out


def blob_gets(entries: list[dict], blob: Blob) -> int:
    return sum(1 for e in entries if e.get("method") == "GET" and e.get("path", "").split("?")[0].endswith(f"/blobs/{blob.digest}"))


# --------------------------------------------------------------------------- profiler


def find_py_spy() -> str | None:
    for cand in (Path(sys.executable).parent / "py-spy", shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


class Profile:
    """py-spy record on a pid while a scenario runs (raw collapsed stacks, one line per
    stack, the thread as the first frame: loadable by speedscope or flamegraph.pl)."""

    def __init__(self, py_spy: str, pid: int, out: Path, rate: int = 100):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = out.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [py_spy, "record", "-p", str(pid), "-r", str(rate), "--nonblocking", "--threads", "--format", "raw", "-d", "600", "-o", str(out)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        time.sleep(0.7)  # attached

    def stop(self) -> Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.out if self.out.exists() else None


_IDLE = ("_worker (concurrent/futures/thread.py:", "Thread.wait (threading.py", "Condition.wait (threading.py", "EpollSelector.select (selectors.py")


_SCAFFOLD = (
    "<module> (mitmdump", "mitmdump (mitmproxy/tools/main.py", "run (mitmproxy/tools/main.py", "run (asyncio/runners.py",
    "Runner.run (asyncio/runners.py", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever", "BaseEventLoop._run_once",
    "Handle._run (asyncio/events.py", "Thread._bootstrap", "Thread.run (threading.py", "_worker (concurrent/futures/thread.py",
    "_WorkItem.run (concurrent/futures/thread.py",
)


def _package(frame: str) -> str:
    """The package a frame's code belongs to: `Fill.run (regcachelib/fill.py:140)` -> regcachelib."""
    m = re.search(r"\(([^():]+?)(?:\.py)?:\d+\)$", frame)
    if not m:
        return "?"
    path = m.group(1)
    top = path.split("/", 1)[0]
    if top in ("OpenSSL", "cryptography"):
        return "pyOpenSSL / cryptography (TLS to the client)"
    if top in ("h2", "hyperframe", "hpack"):
        return "h2 / hyperframe (HTTP/2 framing)"
    if top == "h11":
        return "h11 (HTTP/1 parsing)"
    if top == "mitmproxy":
        return "mitmproxy (proxy layers, events)"
    if top == "regcachelib":
        return "regcachelib"
    if top in ("asyncio", "selectors"):
        return "asyncio / selectors (event loop, socket I/O)"
    if top in ("ssl", "socket", "http"):
        return "ssl / socket / http.client (upstream I/O)"
    return "other: " + top


def summarize_profile(path: Path, top: int = 12) -> dict:
    """Where the samples of a raw py-spy profile went: per thread, and the hottest functions
    (self and inclusive) of the busiest thread. Samples parked in a thread pool's queue wait
    or in epoll are counted as idle, not as work."""
    threads: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        thread = frames[0]
        fr = [re.sub(r" \((?:/[^)]*/)?(?:site-packages|lib/python3\.\d+)/", " (", f) for f in frames[1:]]
        t = threads.setdefault(thread, {"samples": 0, "idle": 0, "self": {}, "incl": {}, "pkg": {}})
        t["samples"] += n
        if fr and fr[-1].startswith(_IDLE):
            t["idle"] += n
            continue
        if fr:
            t["self"][fr[-1]] = t["self"].get(fr[-1], 0) + n
            pkg = _package(fr[-1])
            t["pkg"][pkg] = t["pkg"].get(pkg, 0) + n
        for f in set(fr):
            t["incl"][f] = t["incl"].get(f, 0) + n
    out = []
    for name, t in sorted(threads.items(), key=lambda kv: -(kv[1]["samples"] - kv[1]["idle"])):
        busy = t["samples"] - t["idle"]
        # inclusive: leave out the scaffolding every sample has (thread bootstrap, asyncio.run)
        incl = [(f, n) for f, n in t["incl"].items() if not f.startswith(_SCAFFOLD)]
        out.append(
            {
                "thread": name,
                "samples": t["samples"],
                "busy": busy,
                "self": sorted(t["self"].items(), key=lambda kv: -kv[1])[:top],
                "incl": sorted(incl, key=lambda kv: -kv[1])[:top],
                "pkg": sorted(t["pkg"].items(), key=lambda kv: -kv[1]),
            }
        )
    return {"threads": out}


# --------------------------------------------------------------------------- machine noise


def _proc_stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()


class CpuMeter:
    """How much CPU other processes on the machine took while the benchmark ran.

    The machine is shared (2 cores): other work on it slows what is measured here. Busy CPU
    of the whole machine (/proc/stat) minus the CPU of this process tree (itself, every live
    descendant, and every reaped one through cutime/cstime) is what the rest took.
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1

    def machine_busy(self) -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is inside user)
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.tick

    def own_tree(self) -> float:
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        children: dict[int, list[int]] = {}
        stats: dict[int, list[str]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            fields = _proc_stat_fields(name)
            if fields is None:
                continue
            pid = int(name)
            stats[pid] = fields
            children.setdefault(int(fields[1]), []).append(pid)
        todo = list(children.get(os.getpid(), []))
        while todo:
            pid = todo.pop()
            f = stats[pid]
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / self.tick
            todo.extend(children.get(pid, []))
        return total

    def snapshot(self) -> tuple[float, float, float]:
        return time.monotonic(), self.machine_busy(), self.own_tree()

    def foreign(self, since: tuple[float, float, float]) -> tuple[float, float]:
        """(CPU seconds other processes used since ``since``, as a share of all CPUs)."""
        now = self.snapshot()
        wall = now[0] - since[0]
        other = max(0.0, (now[1] - since[1]) - (now[2] - since[2]))
        return other, other / (wall * self.ncpu) if wall > 0 else 0.0


def source_version(root: Path) -> str:
    """The regcache source under test: git commit, and which src/ files differ from it."""
    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "?"
    dirty = [l[3:] for l in git("status", "--porcelain", "--", "src", "addons").splitlines()]
    return rev + (f" + uncommitted: {', '.join(dirty)}" if dirty else " (clean src/)")

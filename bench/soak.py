"""python -m bench.soak — issue 10's soak run: mixed hostile and normal clients against one cache.

Builds a test World (tests/world), starts ONE regcache (mitmdump) in the router namespace with an
HTTPS_PROXY listener (:8080), a docker.io mirror listener (:5000, other registries by path prefix
or ?ns=), the fast path (:5080) and its metrics/status server on the router's loopback
(127.0.0.1:9090), then for --minutes runs at once:

  normal clients (the measured ones), from the client namespace:
    - `skopeo copy` through HTTPS_PROXY, and through the mirror (registries.conf), of
      docker.io/library/small:1 (anonymous), docker.io/private/secret:1 (--src-creds),
      quay.io/org/s2:1 and gcr.io/proj/small:1, each into a fresh dir, manifest digest checked;
    - curl GETs of a cached layer (mirror -> fast path, and through the proxy), sha256 checked;
  hostile clients (issue 10 items 1-3), bounded in count and rate, from the client namespace:
    a slowloris   half-sent request heads held open on the fast-path and proxy ports
    b junk        ever-new ?ns=junkN.example, ever-new repository names, ever-new Bearer tokens
    c leak        the private image's layer/manifest digests asked for under public repositories
    d unknown     unknown digests under a public repository
    e badport     http://quay.io/... and https://quay.io:9999/... (and ?ns=gcr.io:1)
    f trickle     16 requests in flight for nvcr.io, mapped to a server that sends 1 byte per 5 s
    g loopback    the cache host's own loopback services asked for through the proxy

and samples regcache's RSS, open fds, CPU and log size every 10 s. Writes bench/SOAK.md and the
raw figures to bench/out/soak-<time>.json; exits non-zero if a normal pull failed or got a wrong
digest, or any hostile request was answered with what it must not get (a LEAK).

The hostile clients and the trickling server run as worker processes of this same module
(`--worker hostile|trickle --spec FILE`) inside the world's namespaces. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime as _dt
import hashlib
import http.client
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH = ROOT / "bench"
OUT = BENCH / "out"

PROXY_PORT = 8080
MIRROR_PORT = 5000
FASTPATH_PORT = 5080
METRICS = "127.0.0.1:9090"  # the cache host's own loopback service that (g) asks for
TRICKLE_IP_OCTET = 50  # 10.77.1.50 in the upstream namespace
TRICKLE_HOST = "nvcr.io"  # a registry of the default list, mapped to the trickling server
SAMPLE_EVERY = 10.0
# Short TTLs: within a few minutes the normal pulls revalidate tags and repository publicness with
# upstream, so back-off, a starved worker pool or a repository made private by a hostile shows.
# the world's blob CDN sits on a private address: redirects there must be allowed (see redirect_allow)
DEFAULT_CONFIG = "tag_ttl: 30s\npublic_ttl: 60s\nredirect_allow: [10.77.1.0/24]"

NORMAL_IMAGES = (
    ("docker.io/library/small:1", None),
    ("docker.io/private/secret:1", "testuser:testpass"),
    ("quay.io/org/s2:1", None),
    ("gcr.io/proj/small:1", None),
)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT_ALL = ", ".join((OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                        "application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json"))

# Hostile request rates (requests per second, per kind) at --hostile-rate 1.0.
RATES = {"junk_ns": 2.0, "junk_repo": 2.0, "junk_bearer": 2.0, "leak": 1.5, "unknown": 1.5, "badport": 1.0,
         "loopback": 0.5}
SLOW_FASTPATH = 500
SLOW_PROXY = 200
TRICKLE_IN_FLIGHT = 16


# =========================================================================== small helpers


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def error_label(e: BaseException) -> str:
    """A short, countable name for why a request got no HTTP answer."""
    if isinstance(e, (socket.timeout, TimeoutError, asyncio.TimeoutError)):
        return "ERR:timeout"
    if isinstance(e, ConnectionRefusedError):
        return "ERR:refused"
    if isinstance(e, ConnectionResetError):
        return "ERR:reset"
    if isinstance(e, http.client.RemoteDisconnected):
        return "ERR:disconnected"
    if isinstance(e, ssl.SSLError):
        return "ERR:tls"
    m = re.search(r"Tunnel connection failed: (\d+)", str(e))
    if m:
        return f"CONNECT-{m.group(1)}"
    if isinstance(e, OSError) and e.errno:
        return f"ERR:{errno_name(e.errno)}"
    return f"ERR:{type(e).__name__}"


def errno_name(n: int) -> str:
    import errno

    return errno.errorcode.get(n, str(n))


# =========================================================================== worker: hostile


class Tally:
    """Thread-safe counts: per kind, per variant, per status label; latencies; LEAK samples."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds: dict[str, dict] = {}

    def add(self, kind: str, variant: str, label: str, seconds: float, leak: str | None = None) -> None:
        with self.lock:
            k = self.kinds.setdefault(
                kind, {"count": 0, "status": {}, "variants": {}, "seconds": [], "leaks": 0, "leak_samples": []})
            k["count"] += 1
            k["status"][label] = k["status"].get(label, 0) + 1
            v = k["variants"].setdefault(variant, {})
            v[label] = v.get(label, 0) + 1
            if len(k["seconds"]) < 20000:
                k["seconds"].append(round(seconds, 4))
            if leak:
                k["leaks"] += 1
                if len(k["leak_samples"]) < 20:
                    k["leak_samples"].append(leak)

    def snapshot(self) -> dict:
        with self.lock:
            out = {}
            for name, k in self.kinds.items():
                secs = k["seconds"]
                out[name] = {
                    "count": k["count"], "status": dict(k["status"]),
                    "variants": {v: dict(s) for v, s in k["variants"].items()},
                    "leaks": k["leaks"], "leak_samples": list(k["leak_samples"]),
                    "p50": pct(secs, 0.5), "p95": pct(secs, 0.95), "max": max(secs) if secs else None,
                }
            return out


class Hostile:
    """Every hostile client of the soak, in one process in the client namespace."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.router = spec["router"]
        self.deadline = time.time() + spec["seconds"]
        self.tally = Tally()
        self.ctx = ssl.create_default_context(cafile=spec["ca_bundle"])
        self.counter = 0
        self.counter_lock = threading.Lock()
        self.token = ""
        self.token_at = 0.0
        self.token_lock = threading.Lock()
        self.slow = {"fastpath": self._slow_stats(), "proxy": self._slow_stats()}
        self.trickle = {"started": 0, "done": 0, "in_flight": 0, "status": {}, "seconds": []}
        self.trickle_lock = threading.Lock()

    @staticmethod
    def _slow_stats() -> dict:
        return {"target": 0, "opened": 0, "open_now": 0, "open_max": 0, "closed_by_server": 0, "held_to_the_end": 0,
                "answered": {}, "reset": 0, "connect_fail": {}, "held_seconds": []}

    def next_n(self) -> int:
        with self.counter_lock:
            self.counter += 1
            return self.counter

    # ------------------------------------------------------------ one request

    def request(self, via: str, method: str, target: str, headers: dict | None = None, timeout: float = 30.0,
                host: str = "", port: int = 443) -> tuple[str, int, dict, bytes]:
        """One HTTP exchange on a new connection: via the mirror listener, the proxy in absolute
        form (plain http://), or the proxy with CONNECT + TLS (regcache's CA is trusted).
        Returns (label, status, headers, first 1 MiB of the body); label is the status or ERR:..."""
        conn = None
        try:
            if via == "mirror":
                conn = http.client.HTTPConnection(self.router, self.spec["mirror_port"], timeout=timeout)
            elif via == "proxy-http":
                conn = http.client.HTTPConnection(self.router, self.spec["proxy_port"], timeout=timeout)
            elif via == "proxy-tls":
                conn = http.client.HTTPSConnection(self.router, self.spec["proxy_port"], timeout=timeout,
                                                   context=self.ctx)
                conn.set_tunnel(host, port)
            else:
                raise ValueError(via)
            conn.request(method, target, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read(1 << 20) if method != "HEAD" else b""
            return str(resp.status), resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        except Exception as e:  # noqa: BLE001 - every failure is a countable outcome
            return error_label(e), 0, {}, b""
        finally:
            if conn is not None:
                conn.close()

    def docker_token(self, repo: str = "library/small") -> str:
        """An anonymous docker.io pull token for a public repository (asked of auth.docker.io
        directly), refreshed every minute."""
        with self.token_lock:
            if time.time() - self.token_at > 60 or not self.token:
                url = f"https://auth.docker.io/token?service=registry.docker.io&scope=repository:{repo}:pull"
                try:
                    with urllib.request.urlopen(url, context=self.ctx, timeout=10) as r:
                        self.token = json.loads(r.read())["token"]
                        self.token_at = time.time()
                except Exception:  # noqa: BLE001 - without a token the attempt is still made
                    pass
            return self.token

    # ------------------------------------------------------------ (b)-(e), (g)

    def one(self, kind: str) -> None:
        s = self.spec
        n = self.next_n()
        t0 = time.monotonic()
        leak = None
        if kind == "junk_ns":
            variant = "mirror ?ns=junkN.example"
            label, status, hdrs, _ = self.request("mirror", "GET", f"/v2/library/small/manifests/1?ns=junk{n}.example",
                                                  {"Accept": ACCEPT_ALL})
        elif kind == "junk_repo":
            variant = "mirror /v2/junkN/x/manifests/1"
            label, status, hdrs, _ = self.request("mirror", "GET", f"/v2/junk{n}/x/manifests/1", {"Accept": ACCEPT_ALL})
        elif kind == "junk_bearer":
            variant = "proxy private/secret, Authorization: Bearer junkN"
            label, status, hdrs, _ = self.request("proxy-tls", "GET", "/v2/private/secret/manifests/1",
                                                  {"Authorization": f"Bearer junk{n}", "Accept": ACCEPT_ALL},
                                                  host="registry-1.docker.io")
        elif kind == "leak":
            variant, label, status, hdrs, body = self.leak_attempt(n)
            if 200 <= status < 300:
                leak = f"{variant}: {status}"
            elif 300 <= status < 400 and "/_regcache/blobs/" in hdrs.get("location", ""):
                # a redirect to the fast path hands out the bytes: follow it once
                loc = hdrs["location"]
                m = re.match(r"https?://([^/:]+):(\d+)(/.*)", loc)
                if m:
                    try:
                        c = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=30)
                        c.request("GET", m.group(3))
                        r = c.getresponse()
                        r.read(1 << 20)
                        c.close()
                        if r.status == 200:
                            leak = f"{variant}: {status} -> fast path 200"
                            label = f"{label}->200"
                    except Exception:  # noqa: BLE001
                        pass
        elif kind == "unknown":
            variant, label, status = self.unknown_attempt(n)
        elif kind == "badport":
            variant, label, status = self.badport_attempt(n)
        elif kind == "loopback":
            variant, label, status = self.loopback_attempt(n)
            if 200 <= status < 300:
                leak = f"{variant}: {status}"
        else:
            raise ValueError(kind)
        self.tally.add(kind, variant, label, time.monotonic() - t0, leak)

    def leak_attempt(self, n: int):
        s = self.spec
        layer, manifest = s["secret_layer"], s["secret_manifest"]
        token = {"Authorization": f"Bearer {self.docker_token()}"}
        token_m = {**token, "Accept": ACCEPT_ALL}
        hub, small, ghcr = "registry-1.docker.io", "/v2/library/small", "/v2/owner/small"
        attempts = [
            ("proxy docker.io library/small blob GET", "proxy-tls", "GET", f"{small}/blobs/{layer}", token, hub),
            ("proxy docker.io library/small blob HEAD", "proxy-tls", "HEAD", f"{small}/blobs/{layer}", token, hub),
            ("proxy docker.io library/small manifest GET", "proxy-tls", "GET", f"{small}/manifests/{manifest}",
             token_m, hub),
            ("proxy docker.io library/small manifest HEAD", "proxy-tls", "HEAD", f"{small}/manifests/{manifest}",
             token_m, hub),
            ("proxy ghcr.io owner/small blob GET", "proxy-tls", "GET", f"{ghcr}/blobs/{layer}", {}, "ghcr.io"),
            ("proxy ghcr.io owner/small manifest GET", "proxy-tls", "GET", f"{ghcr}/manifests/{manifest}",
             {"Accept": ACCEPT_ALL}, "ghcr.io"),
            ("mirror library/small blob GET", "mirror", "GET", f"{small}/blobs/{layer}", token, ""),
            ("mirror library/small manifest GET", "mirror", "GET", f"{small}/manifests/{manifest}", token_m, ""),
            ("mirror ?ns=ghcr.io owner/small blob GET", "mirror", "GET", f"{ghcr}/blobs/{layer}?ns=ghcr.io", {}, ""),
            ("mirror /v2/ghcr.io/owner/small blob GET", "mirror", "GET", f"/v2/ghcr.io/owner/small/blobs/{layer}",
             {}, ""),
        ]
        variant, via, method, target, headers, host = attempts[n % len(attempts)]
        label, status, hdrs, body = self.request(via, method, target, headers, host=host)
        return variant, label, status, hdrs, body

    def unknown_attempt(self, n: int):
        digest = "sha256:" + hashlib.sha256(f"soak-unknown-{n}-{random.random()}".encode()).hexdigest()
        token = {"Authorization": f"Bearer {self.docker_token()}"}
        token_m = {**token, "Accept": ACCEPT_ALL}
        hub, small = "registry-1.docker.io", "/v2/library/small"
        attempts = [
            ("proxy docker.io library/small blob GET", "proxy-tls", f"{small}/blobs/{digest}", token, hub),
            ("proxy docker.io library/small manifest GET", "proxy-tls", f"{small}/manifests/{digest}", token_m, hub),
            ("proxy quay.io org/s2 blob GET", "proxy-tls", f"/v2/org/s2/blobs/{digest}", {}, "quay.io"),
            ("mirror library/small blob GET", "mirror", f"{small}/blobs/{digest}", token, ""),
            ("mirror library/small manifest GET", "mirror", f"{small}/manifests/{digest}", token_m, ""),
        ]
        variant, via, target, headers, host = attempts[n % len(attempts)]
        label, status, _, _ = self.request(via, "GET", target, headers, host=host)
        return variant, label, status

    def badport_attempt(self, n: int):
        attempts = [
            ("proxy http://quay.io/v2/org/s2/manifests/1", "proxy-http", "http://quay.io/v2/org/s2/manifests/1", 443),
            ("proxy https://quay.io:9999/v2/org/s2/manifests/1", "proxy-tls", "/v2/org/s2/manifests/1", 9999),
            ("mirror ?ns=gcr.io:1 proj/small manifest", "mirror", "/v2/proj/small/manifests/1?ns=gcr.io:1", 0),
            ("mirror ?ns=quay.io:9999 org/s2 manifest", "mirror", "/v2/org/s2/manifests/1?ns=quay.io:9999", 0),
        ]
        variant, via, target, port = attempts[n % len(attempts)]
        label, status, _, _ = self.request(via, "GET", target, {"Accept": ACCEPT_ALL}, timeout=30, host="quay.io",
                                           port=port)
        return variant, label, status

    def loopback_attempt(self, n: int):
        metrics = self.spec["metrics"]
        attempts = [
            f"http://{metrics}/status.json",
            f"http://{metrics}/metrics",
            f"http://localhost:{metrics.rsplit(':', 1)[1]}/",
            f"http://127.0.0.1:{self.spec['fastpath_port']}/_regcache/blobs/{self.spec['public_layer']}",
        ]
        url = attempts[n % len(attempts)]
        label, status, _, _ = self.request("proxy-http", "GET", url, {}, timeout=15)
        return f"proxy GET {url}", label, status

    def rate_loop(self, kind: str, rate: float) -> None:
        """One thread per kind: a new request every 1/rate s (or as soon as the last one is
        answered, if it took longer), until the deadline."""
        if rate <= 0:
            return
        interval = 1.0 / rate
        nxt = time.monotonic()
        while time.time() < self.deadline:
            self.one(kind)
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, max(0.0, self.deadline - time.time())))
            else:
                nxt = time.monotonic()

    # ------------------------------------------------------------ (f) trickle clients

    def trickle_loop(self, i: int) -> None:
        """Keep one request for a nvcr.io manifest in flight (half through the proxy, half via
        the mirror's ?ns=), a new one as soon as the last ends."""
        while time.time() < self.deadline:
            t0 = time.monotonic()
            with self.trickle_lock:
                self.trickle["started"] += 1
                self.trickle["in_flight"] += 1
            timeout = max(5.0, min(120.0, self.deadline - time.time()))
            if i % 2:
                label, *_ = self.request("proxy-tls", "GET", f"/v2/nvidia/cuda{i}/manifests/1", {"Accept": ACCEPT_ALL},
                                         timeout=timeout, host=self.spec["trickle_host"])
            else:
                ns = self.spec["trickle_host"]
                label, *_ = self.request("mirror", "GET", f"/v2/nvidia/cuda{i}/manifests/1?ns={ns}",
                                         {"Accept": ACCEPT_ALL}, timeout=timeout)
            with self.trickle_lock:
                self.trickle["in_flight"] -= 1
                if label == "ERR:timeout" and time.time() >= self.deadline - 1:
                    label = "cut at the end"
                self.trickle["done"] += 1
                self.trickle["status"][label] = self.trickle["status"].get(label, 0) + 1
                if len(self.trickle["seconds"]) < 5000:
                    self.trickle["seconds"].append(round(time.monotonic() - t0, 2))
            if time.monotonic() - t0 < 1:
                time.sleep(1)  # an immediate refusal must not turn this into a flood

    # ------------------------------------------------------------ (a) slowloris

    async def slow_conn(self, which: str, port: int, head: bytes) -> None:
        st = self.slow[which]
        while time.time() < self.deadline:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.router, port), 10)
            except Exception as e:  # noqa: BLE001
                lab = error_label(e)
                st["connect_fail"][lab] = st["connect_fail"].get(lab, 0) + 1
                await asyncio.sleep(2)
                continue
            st["opened"] += 1
            st["open_now"] += 1
            st["open_max"] = max(st["open_max"], st["open_now"])
            t0 = time.monotonic()
            try:
                writer.write(head)
                await writer.drain()
                while time.time() < self.deadline:
                    try:
                        # a header byte every 20 s: defeats a per-read idle timer, not a deadline
                        data = await asyncio.wait_for(reader.read(4096), 20)
                    except asyncio.TimeoutError:
                        writer.write(b"a")
                        await writer.drain()
                        continue
                    if not data:
                        st["closed_by_server"] += 1
                        if len(st["held_seconds"]) < 20000:
                            st["held_seconds"].append(round(time.monotonic() - t0, 1))
                        break
                    first = data.split(b"\r\n", 1)[0][:40].decode("latin-1")
                    code = first.split()[1] if first.startswith("HTTP/") and len(first.split()) > 1 else "bytes"
                    st["answered"][code] = st["answered"].get(code, 0) + 1
                    break
            except (ConnectionError, OSError):
                st["reset"] += 1
            finally:
                if time.time() >= self.deadline:
                    st["held_to_the_end"] += 1
                else:
                    st["open_now"] -= 1
                writer.close()
            await asyncio.sleep(1)

    async def slowloris(self) -> None:
        s = self.spec
        fast_head = (f"GET /_regcache/blobs/{s['public_layer']} HTTP/1.1\r\n"
                     f"Host: {self.router}:{s['fastpath_port']}\r\nX-Slow: ").encode()
        proxy_head = b"CONNECT registry-1.docker.io:443 HTTP/1.1\r\nHost: registry-1.docker.io:443\r\nX-Slow: "
        tasks = []
        self.slow["fastpath"]["target"] = s["slow_fastpath"]
        self.slow["proxy"]["target"] = s["slow_proxy"]
        plan = [("fastpath", s["fastpath_port"], fast_head)] * s["slow_fastpath"]
        plan += [("proxy", s["proxy_port"], proxy_head)] * s["slow_proxy"]
        random.shuffle(plan)
        for which, port, head in plan:
            tasks.append(asyncio.ensure_future(self.slow_conn(which, port, head)))
            await asyncio.sleep(0.01)  # ~100 new connections a second
        await asyncio.gather(*tasks, return_exceptions=True)

    def slow_summary(self) -> dict:
        out = {}
        for which, st in self.slow.items():
            held = st["held_seconds"]
            out[which] = {k: v for k, v in st.items() if k != "held_seconds"}
            out[which]["held_p50"] = pct(held, 0.5)
            out[which]["held_max"] = max(held) if held else None
        return out

    # ------------------------------------------------------------ run

    def result(self) -> dict:
        with self.trickle_lock:
            trickle = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.trickle.items() if k != "seconds"}
            secs = list(self.trickle["seconds"])
        trickle["seconds_p50"] = pct(secs, 0.5)
        trickle["seconds_max"] = max(secs) if secs else None
        return {"time": time.time(), "kinds": self.tally.snapshot(), "slowloris": self.slow_summary(),
                "trickle": trickle}

    def write(self) -> None:
        out = Path(self.spec["out"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result(), default=str))
        os.replace(tmp, out)

    def run(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
        threads = []
        scale = self.spec["rate_scale"]
        for kind, rate in RATES.items():
            threads.append(threading.Thread(target=self.rate_loop, args=(kind, rate * scale), daemon=True, name=kind))
        for i in range(self.spec["trickle_in_flight"]):
            threads.append(threading.Thread(target=self.trickle_loop, args=(i,), daemon=True, name=f"trickle{i}"))
        loop = asyncio.new_event_loop()
        slow = threading.Thread(target=lambda: loop.run_until_complete(self.slowloris()), daemon=True, name="slowloris")
        threads.append(slow)
        for t in threads:
            t.start()
        while time.time() < self.deadline:
            time.sleep(min(SAMPLE_EVERY / 2, max(0.1, self.deadline - time.time())))
            self.write()
        # rate loops end at the deadline; trickle requests and slowloris connections are cut
        for t in threads:
            t.join(timeout=max(0.0, self.deadline + 20 - time.time()))
        self.write()


# =========================================================================== worker: trickle


def trickle_server(spec: dict) -> None:
    """Accept on ip:443 and send one byte every 5 s: a TLS record header announcing 16 KiB,
    then its body, byte by byte — a TLS client reading it never times out on a single read."""
    stats = {"connections": 0, "open_now": 0, "open_max": 0, "bytes": 0}
    payload = b"\x16\x03\x03\x40\x00" + b"\x02" * 16384
    deadline = time.time() + spec["seconds"]

    async def handle(reader, writer):
        stats["connections"] += 1
        stats["open_now"] += 1
        stats["open_max"] = max(stats["open_max"], stats["open_now"])
        try:
            for i in range(len(payload)):
                if time.time() > deadline:
                    break
                writer.write(payload[i:i + 1])
                await writer.drain()
                stats["bytes"] += 1
                # what the client sends is read and ignored; the next byte goes out on schedule
                next_at = time.monotonic() + spec["interval"]
                while (left := next_at - time.monotonic()) > 0:
                    try:
                        if not await asyncio.wait_for(reader.read(4096), left):
                            return  # the client gave up
                    except asyncio.TimeoutError:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            stats["open_now"] -= 1
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, spec["ip"], 443, backlog=256)
        Path(spec["ready"]).write_text("ready\n")
        async with server:
            while time.time() < deadline:
                await asyncio.sleep(2)
                Path(spec["out"]).write_text(json.dumps(stats))

    asyncio.run(main())


# =========================================================================== the soak (parent)


class Soak:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.seconds = args.minutes * 60
        self.pulls: list[dict] = []  # every normal client operation
        self.pulls_lock = threading.Lock()
        self.samples: list[dict] = []
        self.hostile: dict = {}
        self.trickle_stats: dict = {}
        self.log_stats: dict = {}
        self.errors: list[str] = []
        self.phase = "setup"
        self.stop_normal = threading.Event()
        self.load_start = 0.0
        self.config_text = ""
        self.fd_limit = "?"

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    # ------------------------------------------------------------------ world add-ons

    def add_trickle_upstream(self) -> None:
        """10.77.1.50 in the upstream ns with a server that trickles; nvcr.io -> it in the
        router's hosts file (regcache resolves through it when it starts)."""
        w = self.world
        self.trickle_ip = f"{w.router_upstream_ip.rsplit('.', 1)[0]}.{TRICKLE_IP_OCTET}"
        dev = f"{w.prefix}-u0"
        w.run(w.ns_upstream, ["ip", "addr", "add", f"{self.trickle_ip}/24", "dev", dev])
        self.cleanups.append(
            lambda: w.run(w.ns_upstream, ["ip", "addr", "del", f"{self.trickle_ip}/24", "dev", dev], check=False))
        spec = {"ip": self.trickle_ip, "seconds": self.seconds + 600, "interval": 5.0,
                "out": str(self.work / "trickle.json"), "ready": str(self.work / "trickle.ready")}
        spec_path = self.work / "trickle-spec.json"
        spec_path.write_text(json.dumps(spec))
        log = open(self.work / "trickle.log", "ab")
        argv = [sys.executable, "-m", "bench.soak", "--worker", "trickle", "--spec", str(spec_path)]
        self.trickle_proc = w.popen(w.ns_upstream, argv, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.cleanups.append(lambda: infra_stop(self.trickle_proc))
        deadline = time.monotonic() + 15
        while not Path(spec["ready"]).exists():
            if self.trickle_proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.work / "trickle.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"trickle server did not start: {tail}")
            time.sleep(0.1)
        w.write_hosts(w.ns_router, {**w.upstream_ips, TRICKLE_HOST: self.trickle_ip})
        self.cleanups.append(lambda: w.write_hosts(w.ns_router))

    def isolate_clients(self) -> None:
        """Clients reach upstream only through the cache (the token service excepted): a mirror
        pull that silently fell back to the registry itself would otherwise pass as a success."""
        w = self.world
        client_net = w.client_ip.rsplit(".", 1)[0] + ".0/24"
        upstream_net = w.router_upstream_ip.rsplit(".", 1)[0] + ".0/24"
        rules = [
            ["FORWARD", "-s", client_net, "-d", upstream_net, "-j", "REJECT"],
            ["FORWARD", "-s", client_net, "-d", w.upstream_ips[w.auth_host], "-j", "ACCEPT"],
        ]
        for rule in rules:
            w.run(w.ns_router, ["iptables", "-I", *rule])
            self.cleanups.append(lambda rule=rule: w.run(w.ns_router, ["iptables", "-D", *rule], check=False))

    # ------------------------------------------------------------------ normal clients

    def record(self, op: dict) -> None:
        with self.pulls_lock:
            self.pulls.append(op)

    def skopeo_pull(self, way: str, ref: str, creds: str | None, n: int) -> dict:
        from . import infra

        dest = self.work / "pulls" / f"{way}-{n}"
        if way == "mirror":
            env = {"SSL_CERT_FILE": str(self.bundle)}
            if creds:
                env["REGISTRY_AUTH_FILE"] = str(self.mirror_auth)
            extra = ["--registries-conf", str(self.registries_conf)]
        else:
            env = dict(self.proxy_env)
            extra = ["--src-creds", creds] if creds else []
        t_start = time.monotonic() - self.load_start if self.load_start else None
        try:
            secs, r = infra.skopeo_copy(self.world, f"docker://{ref}", dest, env, extra, timeout=self.args.pull_timeout)
            ok = r.returncode == 0
            err = "" if ok else (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        except subprocess.TimeoutExpired:
            secs, ok, err = float(self.args.pull_timeout), False, f"timeout after {self.args.pull_timeout} s"
        digest_ok = None
        if ok:
            got = dir_digest(dest)
            digest_ok = got == self.world.image(ref).manifest_digest
            if not digest_ok:
                err = f"wrong manifest digest {got}"
        shutil.rmtree(dest, ignore_errors=True)
        return {"client": f"skopeo {way}", "what": ref, "phase": self.phase, "t": t_start, "seconds": round(secs, 3),
                "ok": ok and bool(digest_ok), "wrong_digest": ok and digest_ok is False, "error": err}

    def curl_blob(self, way: str, n: int) -> dict:
        w = self.world
        dest = self.work / "pulls" / f"blob-{way}-{n}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        curl = ["curl", "-sS", "-o", str(dest), "-w", "%{http_code}", "--max-time", str(self.args.pull_timeout)]
        if way == "mirror":
            digest = self.mirror_layer
            url = f"http://{w.router_client_ip}:{MIRROR_PORT}/v2/library/small/blobs/{digest}"
            argv = [*curl, "-L", url]
            env = None
        else:
            digest = self.proxy_layer
            url = f"https://quay.io/v2/org/s2/blobs/{digest}"
            argv = [*curl, "--cacert", str(self.bundle), url]
            env = self.proxy_env
        t_start = time.monotonic() - self.load_start if self.load_start else None
        t0 = time.monotonic()
        r = w.run(w.ns_client, argv, env=env, check=False, timeout=self.args.pull_timeout + 30)
        secs = time.monotonic() - t0
        code = r.stdout.strip()
        data = dest.read_bytes() if dest.exists() else b""
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        ok = r.returncode == 0 and code == "200" and got == digest
        wrong = "" if got == digest else ", wrong sha256"
        err = "" if ok else f"curl exit {r.returncode}, HTTP {code}, {len(data)} bytes{wrong} {r.stderr.strip()[:200]}"
        dest.unlink(missing_ok=True)
        return {"client": f"curl blob {way}", "what": url, "phase": self.phase, "t": t_start, "seconds": round(secs, 3),
                "ok": ok,
                "wrong_digest": r.returncode == 0 and code == "200" and got != digest, "error": err}

    def skopeo_loop(self, way: str) -> None:
        n = 0
        while not self.stop_normal.is_set():
            for ref, creds in NORMAL_IMAGES:
                if self.stop_normal.is_set():
                    return
                n += 1
                op = self.skopeo_pull(way, ref, creds, n)
                self.record(op)
                if not op["ok"]:
                    self.say(f"  NORMAL PULL FAILED: skopeo {way} {ref}: {op['error']}")

    def curl_loop(self) -> None:
        n = 0
        while not self.stop_normal.is_set():
            n += 1
            op = self.curl_blob("mirror" if n % 2 else "proxy", n)
            self.record(op)
            if not op["ok"]:
                self.say(f"  NORMAL BLOB GET FAILED: {op['what']}: {op['error']}")
            self.stop_normal.wait(1.0)

    # ------------------------------------------------------------------ samples

    def sample(self) -> dict:
        from . import infra

        pid = self.rc.pid
        s = {"t": round(time.monotonic() - self.load_start, 1) if self.load_start else 0.0, "phase": self.phase}
        try:
            st = infra.read_status(pid)
            s["rss_mib"] = round(st["VmRSS"] / 1024, 1)
            s["hwm_mib"] = round(st["VmHWM"] / 1024, 1)
            s["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            cpu = infra.cpu_seconds(pid)
            s["cpu_s"] = round(cpu[0], 1)
            s["cpu_main_s"] = round(cpu[1], 1)
            s["threads"] = len(os.listdir(f"/proc/{pid}/task"))
        except (OSError, KeyError) as e:
            s["error"] = f"mitmdump gone? {e}"
        try:
            s["log_bytes"] = self.rc.rc.log_path.stat().st_size
        except OSError:
            s["log_bytes"] = None
        try:
            h = json.loads((self.work / "hostile.json").read_text())
            s["hostile_requests"] = sum(k["count"] for k in h["kinds"].values())
            s["slow_open"] = sum(v["open_now"] for v in h["slowloris"].values())
            s["trickle_in_flight"] = h["trickle"]["in_flight"]
        except (OSError, ValueError, KeyError):
            pass
        free = shutil.disk_usage(self.work).free
        s["disk_free_gib"] = round(free / 2**30, 1)
        return s

    def sampler(self) -> None:
        while not self.stop_normal.is_set():
            s = self.sample()
            self.samples.append(s)
            self.say(f"  sample t={s['t']:.0f}s rss={s.get('rss_mib')} MiB fds={s.get('fds')} cpu={s.get('cpu_s')} s "
                     f"log={(s.get('log_bytes') or 0) / 2**20:.1f} MiB hostile={s.get('hostile_requests')} "
                     f"slow_open={s.get('slow_open')} "
                     f"trickle={s.get('trickle_in_flight')} pulls={len(self.pulls)}")
            if s["disk_free_gib"] < 2:
                self.say("  disk almost full (the mitmdump log?): stopping the soak early")
                self.errors.append(f"stopped early at t={s['t']} s: {s['disk_free_gib']} GiB disk free")
                self.stop_normal.set()
                break
            self.stop_normal.wait(SAMPLE_EVERY)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        from tests.e2e.conftest import mirror_registries_conf
        from tests.world import World

        from . import infra

        self.cleanups: list = []
        self.say("world up")
        with World() as world:
            self.world = world
            self.work = world.workdir / "soak"
            (self.work / "pulls").mkdir(parents=True, exist_ok=True)
            self.say(f"  world {world.prefix} up in {world.timings['total']:.1f}s")
            try:
                return self.run_in(world, infra, mirror_registries_conf)
            finally:
                self.stop_normal.set()
                for fn in reversed(self.cleanups):
                    try:
                        fn()
                    except Exception as e:  # noqa: BLE001 - clean up the rest anyway
                        self.say(f"  cleanup step failed: {e}")
                self.say("cleaned up (regcache, workers, address, hosts file, iptables rules)")

    def run_in(self, world, infra, mirror_registries_conf) -> int:
        self.isolate_clients()
        self.add_trickle_upstream()
        secret = world.image("docker.io/private/secret:1")
        small = world.image("docker.io/library/small:1")
        s2 = world.image("quay.io/org/s2:1")
        self.mirror_layer = max((d for d in small.blobs if d != small.config_digest), key=small.layer_sizes.get)
        self.proxy_layer = max((d for d in s2.blobs if d != s2.config_digest), key=s2.layer_sizes.get)

        self.say(f"regcache: proxy :{PROXY_PORT}, docker.io mirror :{MIRROR_PORT}, fast path :{FASTPATH_PORT}, "
                 f"metrics {METRICS}")
        config = f"fastpath_port: {FASTPATH_PORT}\n" + self.args.regcache_config.replace("\\n", "\n").strip() + "\n"
        self.config_text = config
        self.rc = infra.RegcacheProc(world, self.work / "regcache", config=config, mirror_of="registry-1.docker.io",
                                     options={"regcache_metrics": METRICS})
        if self.args.memwatch:
            # bench/memwatch.py beside the addon: tracemalloc + gc type counts every 30 s to a file
            OUT.mkdir(parents=True, exist_ok=True)
            self.memwatch_out = OUT / f"soak-{self.run_id}-memwatch.txt"
            self.rc.rc.argv[1:1] = ["-s", str(BENCH / "memwatch.py")]
            self.rc.rc.env = {"MEMWATCH_OUT": str(self.memwatch_out), "MEMWATCH_EVERY": str(self.args.memwatch),
                           "MEMWATCH_FRAMES": str(self.args.memwatch_frames)}
            self.say(f"  memwatch: {self.memwatch_out}")
        self.rc.start()
        self.cleanups.append(self.rc.stop)
        # written once: client_bundle() rewrites the file, which a client reading it at that moment sees half-written
        self.bundle = self.rc.client_bundle()
        self.proxy_env = {"HTTPS_PROXY": f"http://{world.router_client_ip}:{PROXY_PORT}",
                          "SSL_CERT_FILE": str(self.bundle)}
        # skopeo logs in to a mirror by the mirror's host name, not with --src-creds (which it keeps for the registry)
        self.mirror_auth = self.work / "mirror-auth.json"
        user = base64.b64encode(f"{world.username}:{world.password}".encode()).decode()
        self.mirror_auth.write_text(json.dumps({"auths": {f"{world.router_client_ip}:{MIRROR_PORT}": {"auth": user}}}))
        self.registries_conf = mirror_registries_conf(self.work / "registries.conf",
                                                      f"{world.router_client_ip}:{MIRROR_PORT}")
        self.cpu0 = infra.cpu_seconds(self.rc.pid)
        self.fd_limit = fd_limit(self.rc.pid)
        self.meter = infra.CpuMeter()

        self.phase = "baseline"
        self.say("baseline, no hostile load: every normal pull twice (the first fills the cache)")
        for way in ("proxy", "mirror"):
            for ref, creds in NORMAL_IMAGES:
                for i in range(2):
                    op = self.skopeo_pull(way, ref, creds, 1000 + i)
                    op["phase"] = "fill" if i == 0 else "baseline"
                    self.record(op)
                    self.say(f"  skopeo {way} {ref}: {op['seconds']:.2f} s {outcome(op)}")
        for i in range(4):
            op = self.curl_blob("mirror" if i % 2 else "proxy", 1000 + i)
            op["phase"] = "baseline"
            self.record(op)
            self.say(f"  {op['client']}: {op['seconds']:.2f} s {outcome(op)}")

        spec = {
            "router": world.router_client_ip, "proxy_port": PROXY_PORT, "mirror_port": MIRROR_PORT,
            "fastpath_port": FASTPATH_PORT, "metrics": METRICS, "ca_bundle": str(self.bundle), "seconds": self.seconds,
            "out": str(self.work / "hostile.json"),
            "secret_layer": max((d for d in secret.blobs if d != secret.config_digest), key=secret.layer_sizes.get),
            "secret_manifest": secret.manifest_digest, "public_layer": self.mirror_layer, "trickle_host": TRICKLE_HOST,
            "rate_scale": self.args.hostile_rate, "slow_fastpath": self.args.slow_fastpath,
            "slow_proxy": self.args.slow_proxy,
            "trickle_in_flight": self.args.trickle,
        }
        spec_path = self.work / "hostile-spec.json"
        spec_path.write_text(json.dumps(spec))
        self.spec = spec

        self.phase = "soak"
        self.say(f"soak: {self.args.minutes:g} min of hostile + normal clients")
        self.load_start = time.monotonic()
        self.noise0 = self.meter.snapshot()
        log = open(self.work / "hostile.log", "ab")
        argv = [sys.executable, "-m", "bench.soak", "--worker", "hostile", "--spec", str(spec_path)]
        self.hostile_proc = world.popen(world.ns_client, argv, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.cleanups.append(lambda: infra_stop(self.hostile_proc))
        threads = [threading.Thread(target=self.skopeo_loop, args=("proxy",), daemon=True),
                   threading.Thread(target=self.skopeo_loop, args=("mirror",), daemon=True),
                   threading.Thread(target=self.curl_loop, daemon=True),
                   threading.Thread(target=self.sampler, daemon=True)]
        for t in threads:
            t.start()
        end = self.load_start + self.seconds
        while time.monotonic() < end and not self.stop_normal.is_set():
            if self.rc.rc.proc.poll() is not None:
                self.errors.append(f"mitmdump exited with {self.rc.rc.proc.returncode} during the soak")
                self.say("  mitmdump EXITED")
                break
            self.stop_normal.wait(min(5.0, max(0.0, end - time.monotonic())))
        self.soak_seconds = time.monotonic() - self.load_start
        self.stop_normal.set()
        self.say("soak over: waiting for the normal clients' last pulls and the hostile worker")
        for t in threads:
            t.join(timeout=self.args.pull_timeout + 60)
        try:
            self.hostile_proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.errors.append("hostile worker did not finish in time; killed (its last progress file is reported)")
            infra_stop(self.hostile_proc)
        self.samples.append(self.sample())
        self.noise = self.meter.foreign(self.noise0)
        self.cpu_soak = infra.cpu_seconds(self.rc.pid)[0] - self.cpu0[0] if self.rc.rc.proc.poll() is None else None
        try:
            self.hostile = json.loads((self.work / "hostile.json").read_text())
        except (OSError, ValueError) as e:
            tail = (self.work / "hostile.log").read_text(errors="replace")[-1500:]
            self.errors.append(f"no hostile results: {e}: {tail}")
        try:
            self.trickle_stats = json.loads((self.work / "trickle.json").read_text())
        except (OSError, ValueError):
            pass
        hostile_log = (self.work / "hostile.log").read_text(errors="replace")
        if "Traceback" in hostile_log:
            self.errors.append("hostile worker: " + hostile_log[-1500:])
        self.rc.stop()
        self.log_stats = scan_log(self.rc.rc.log_path)
        self.keep_log()
        return 0

    def keep_log(self) -> None:
        """Keep the mitmdump log's head and tail beside the raw figures (the world's dir goes)."""
        path = self.rc.rc.log_path
        OUT.mkdir(parents=True, exist_ok=True)
        dest = OUT / f"soak-{self.run_id}-mitmdump.log"
        size = path.stat().st_size if path.exists() else 0
        with open(path, "rb") as src, open(dest, "wb") as out:
            if size <= 8 * 2**20:
                shutil.copyfileobj(src, out)
            else:
                out.write(src.read(4 * 2**20))
                out.write(f"\n[... {size - 8 * 2**20} bytes left out by bench.soak ...]\n".encode())
                src.seek(size - 4 * 2**20)
                shutil.copyfileobj(src, out)
        self.log_copy = dest


def fd_limit(pid: int) -> str:
    """The process's soft limit on open files (what a flood of connections runs into)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    except OSError:
        pass
    return "?"


def outcome(op: dict) -> str:
    return "ok" if op["ok"] else "FAILED: " + op["error"]


def dir_digest(layout: Path) -> str:
    try:
        return "sha256:" + hashlib.sha256((layout / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return "(no manifest.json)"


def infra_stop(proc) -> None:
    from . import infra

    infra.stop_proc(proc)


def scan_log(path: Path) -> dict:
    """Size of the mitmdump log, its 'Addon error' and 'Traceback' lines, and its most repeated
    warning/error lines (digits and hex folded, so one message counts once)."""
    out = {"bytes": 0, "lines": 0, "addon_error": 0, "traceback": 0, "top": []}
    if not path.exists():
        return out
    out["bytes"] = path.stat().st_size
    counts: collections.Counter = collections.Counter()
    fold = re.compile(r"0x[0-9a-f]+|[0-9a-f]{12,}|\d+")
    with open(path, "rb") as f:
        for raw in f:
            out["lines"] += 1
            if b"Addon error" in raw:
                out["addon_error"] += 1
            if b"Traceback" in raw:
                out["traceback"] += 1
            low = raw.lower()
            if b"error" in low or b"warn" in low or b"exception" in low or b"traceback" in low:
                counts[fold.sub("N", raw.decode("utf-8", "replace").strip())[:160]] += 1
    out["top"] = counts.most_common(8)
    return out


# =========================================================================== report


def summarize(soak: Soak) -> dict:
    ops = soak.pulls
    during = [o for o in ops if o["phase"] == "soak"]
    base = [o for o in ops if o["phase"] == "baseline"]
    fill = [o for o in ops if o["phase"] == "fill"]

    def stats(sel):
        secs = [o["seconds"] for o in sel if o["ok"]]
        return {"count": len(sel), "failures": sum(1 for o in sel if not o["ok"]),
                "slow": sum(1 for o in sel if o["ok"] and o["seconds"] > soak.args.slow_seconds),
                "wrong_digests": sum(1 for o in sel if o["wrong_digest"]),
                "p50": pct(secs, 0.5), "p95": pct(secs, 0.95), "max": max(secs) if secs else None}

    skopeo = [o for o in during if o["client"].startswith("skopeo")]
    blobs = [o for o in during if o["client"].startswith("curl")]
    soak_s = getattr(soak, "soak_seconds", soak.seconds)
    first = [o for o in skopeo if o["t"] is not None and o["t"] < 60]
    last = [o for o in skopeo if o["t"] is not None and o["t"] >= soak_s - 60]
    by_client = {}
    for o in during:
        key = f"{o['client']} {o['what'].split('/v2/')[0] if o['client'].startswith('curl') else o['what']}"
        by_client.setdefault(key, []).append(o)
    kinds = soak.hostile.get("kinds", {})
    leaks = sum(k.get("leaks", 0) for k in kinds.values())
    rss = [s["rss_mib"] for s in soak.samples if "rss_mib" in s]
    fds = [s["fds"] for s in soak.samples if "fds" in s]
    return {
        "skopeo": stats(skopeo), "blobs": stats(blobs),
        "baseline_skopeo": stats([o for o in base if o["client"].startswith("skopeo")]),
        "baseline_blobs": stats([o for o in base if o["client"].startswith("curl")]), "fill": stats(fill),
        "first_minute_p50": pct([o["seconds"] for o in first if o["ok"]], 0.5), "first_minute_n": len(first),
        "last_minute_p50": pct([o["seconds"] for o in last if o["ok"]], 0.5), "last_minute_n": len(last),
        "by_client": {k: stats(v) for k, v in sorted(by_client.items())},
        "failures": [o for o in ops if not o["ok"]][:30],
        "leaks": leaks, "rss_min": min(rss) if rss else None, "rss_max": max(rss) if rss else None,
        "hwm_max": max((s.get("hwm_mib", 0) for s in soak.samples), default=None), "fds_max": max(fds) if fds else None,
        "fds_min": min(fds) if fds else None,
    }


KIND_TITLES = {
    "junk_ns": "(b) junk ?ns=junkN.example (mirror)",
    "junk_repo": "(b) junk repository names (mirror)",
    "junk_bearer": "(b) junk Bearer tokens, private repo (proxy)",
    "leak": "(c) private digests under public names",
    "unknown": "(d) unknown digests, public repos",
    "badport": "(e) client-chosen scheme/port",
    "loopback": "(g) proxy to the cache host's loopback",
}


def histogram(counts: dict) -> str:
    return ", ".join(f"{s}×{n}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def report_markdown(soak: Soak, summ: dict, command: str, started, source: str) -> str:
    a = soak.args
    L = ["# regcache soak run (issue 10)\n", "<!-- generated by bench/soak.py; every run overwrites this file -->\n"]
    L.append(f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}; command: `{command}`")
    config = "; ".join(soak.config_text.strip().splitlines())
    L.append(f"- regcache source: {source}; regcache_config: `{config}`")
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    L.append(f"- soak: {getattr(soak, 'soak_seconds', 0):.0f} s of load (asked: {a.minutes:g} min); machine: "
             f"{os.cpu_count()} CPUs, load average at the end {loadavg}")
    if hasattr(soak, "noise") and soak.cpu_soak is not None:
        L.append(f"- CPU other processes on this shared machine took during the soak: {soak.noise[0]:.0f} CPU-s "
                 f"({soak.noise[1] * 100:.0f} % of all cores); regcache (mitmdump) itself: {soak.cpu_soak:.0f} CPU-s")
    verdict = "PASS" if verdict_ok(soak, summ) else "FAIL"
    L.append(f"- **verdict: {verdict}** (PASS needs every normal pull and blob GET correct, no LEAK, no harness "
             "error)\n")
    if soak.errors:
        L.append("Harness notes:\n")
        L += [f"- {e}" for e in soak.errors]
        L.append("")

    L.append("## Normal clients (measured)\n")
    head = [f"| what | count | failures | wrong digests | slower than {a.slow_seconds:g} s | p50 | p95 | max |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    L += head

    def row(name, s):
        L.append(f"| {name} | {s['count']} | {s['failures']} | {s['wrong_digests']} | {s['slow']} | "
                 f"{fmt_s(s['p50'])} | {fmt_s(s['p95'])} | {fmt_s(s['max'])} |")

    row("skopeo copy, all, under hostile load", summ["skopeo"])
    row("curl blob GET (sha256 checked), under hostile load", summ["blobs"])
    row("skopeo copy, warm, before the load (baseline)", summ["baseline_skopeo"])
    row("curl blob GET, before the load (baseline)", summ["baseline_blobs"])
    row("skopeo copy, cold (first pull, fills the cache)", summ["fill"])
    L.append("")
    L.append(f"skopeo p50 in the first minute of load: {fmt_s(summ['first_minute_p50'])} ({summ['first_minute_n']} "
             f"pulls); in the last minute: {fmt_s(summ['last_minute_p50'])} ({summ['last_minute_n']} pulls).\n")
    L.append("Per client and image, under load:\n")
    L += head
    for k, s in summ["by_client"].items():
        row(k, s)
    L.append("")
    if summ["failures"]:
        L.append("Failed normal operations (first 30):\n")
        for o in summ["failures"]:
            t = "-" if o["t"] is None else round(o["t"])
            L.append(f"- [{o['phase']}] t={t} s {o['client']} {o['what']}: {o['error']}")
        L.append("")

    L.append("## Hostile clients\n")
    kinds = soak.hostile.get("kinds", {})
    L.append(f"**LEAKs: {summ['leaks']}** (a 2xx — or a redirect to the fast path that then answered 200 — for (c) "
             "the private image's digests under public names, or for (g) the cache host's loopback services)\n")
    L.append("| kind | requests | status histogram | p50 | max |")
    L.append("|---|---:|---|---:|---:|")
    for kind in RATES:
        k = kinds.get(kind)
        if not k:
            L.append(f"| {KIND_TITLES[kind]} | 0 | — | — | — |")
            continue
        L.append(f"| {KIND_TITLES[kind]} | {k['count']} | {histogram(k['status'])} | {fmt_s(k['p50'])} | "
                 f"{fmt_s(k['max'])} |")
    L.append("")
    tr = soak.hostile.get("trickle", {})
    if tr:
        ts = soak.trickle_stats
        L.append(f"(f) trickling upstream ({TRICKLE_HOST} -> a server sending 1 byte / 5 s), "
                 f"{soak.spec['trickle_in_flight']} clients each keeping one request in flight: {tr.get('started', 0)} "
                 f"requests started, outcomes {histogram(tr.get('status', {})) or 'none finished'}; p50 "
                 f"{fmt_s(tr.get('seconds_p50'))}, max {fmt_s(tr.get('seconds_max'))}. The trickling server saw "
                 f"{ts.get('connections', '?')} connections (at most {ts.get('open_max', '?')} at once).\n")
    for which, st in soak.hostile.get("slowloris", {}).items():
        L.append(f"(a) slowloris on the {which} port: {st['target']} held at once (max reached {st['open_max']}), "
                 f"{st['opened']} connections opened in all; held until the soak ended {st.get('held_to_the_end', 0)}; "
                 f"closed by the server {st['closed_by_server']} (after p50 {fmt_s(st.get('held_p50'))}, max "
                 f"{fmt_s(st.get('held_max'))}), answered {histogram(st.get('answered', {})) or 'none'}, reset "
                 f"{st['reset']}, connect failures {histogram(st.get('connect_fail', {})) or 'none'} (a header byte "
                 "is added every 20 s).\n")
    L.append("Per variant (status histogram):\n")
    for kind in RATES:
        for v, hist in kinds.get(kind, {}).get("variants", {}).items():
            L.append(f"- {kind}: {v}: {histogram(hist)}")
    leak_samples = [s for k in kinds.values() for s in k.get("leak_samples", [])]
    if leak_samples:
        L.append("\nLEAK samples (first 20 per kind):\n")
        L += [f"- {s}" for s in sorted(set(leak_samples))]
    L.append("")

    L.append("## regcache process\n")
    L.append(f"- RSS (VmRSS) min {summ['rss_min']} MiB, max {summ['rss_max']} MiB; peak (VmHWM) {summ['hwm_max']} MiB")
    L.append(f"- open fds: min {summ['fds_min']}, max {summ['fds_max']} (its limit: {soak.fd_limit})")
    ls = soak.log_stats
    L.append(f"- mitmdump log: {ls.get('bytes', 0) / 2**20:.1f} MiB, {ls.get('lines', 0)} lines; 'Addon error' lines: "
             f"{ls.get('addon_error', 0)}; 'Traceback' lines: {ls.get('traceback', 0)}")
    if ls.get("top"):
        L.append("- most repeated warning/error lines (digits folded to N):")
        L += [f"  - {n}× `{line.replace('`', '')}`" for line, n in ls["top"]]
    L.append("")
    L.append("Samples every 10 s (t = seconds since the load started):\n")
    L.append("| t | RSS MiB | HWM MiB | fds | threads | CPU s | log MiB | hostile reqs | slowloris open | "
             "trickle in flight |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in soak.samples:
        cells = [f"{s['t']:.0f}", *(str(s.get(k, "—")) for k in ("rss_mib", "hwm_mib", "fds", "threads", "cpu_s")),
                 f"{(s.get('log_bytes') or 0) / 2**20:.1f}",
                 *(str(s.get(k, "—")) for k in ("hostile_requests", "slow_open", "trickle_in_flight"))]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("## How\n")
    L.append(HOW)
    return "\n".join(L) + "\n"


HOW = """\
- One `tests.world.World`; ONE regcache (`mitmdump -s addons/regcache.py --mode regular@8080 --mode
  reverse:https://registry-1.docker.io@5000`, fast path :5080, `regcache_metrics=127.0.0.1:9090`) in the router
  ns, run from this tree's `src/` or `--src` (PYTHONPATH). Clients run in the client ns; an iptables FORWARD rule
  in the router ns keeps them from reaching the registries except through the cache (auth.docker.io excepted), so
  a mirror pull cannot silently fall back to the registry itself.
- Normal clients: two `skopeo copy docker://… dir:…` loops (HTTPS_PROXY with regcache's CA; registries.conf
  mirror with docker.io as the default mirror and the others by path prefix), each over the four images, a fresh
  dir each time, manifest digest compared with the world's; one curl loop (1 s apart) alternating a library/small
  layer via the mirror (307 to the fast path, `-L`) and a quay.io/org/s2 layer through the proxy, sha256 checked.
  Wall time per operation; a timeout (`--pull-timeout`) is a failure. Baseline: each pull twice before the load.
- Hostile clients: one worker process (`--worker hostile`) in the client ns: one thread per kind at a fixed rate
  (`--hostile-rate` scales them), a new TCP connection per request; 16 threads keeping the nvcr.io requests in
  flight (half CONNECT via the proxy, half `?ns=nvcr.io` on the mirror); asyncio for the slowloris connections
  (reopened 1 s after the server closes one). nvcr.io is mapped in the router's hosts file to 10.77.1.50 in the
  upstream ns, where `--worker trickle` sends a TLS record header announcing 16 KiB and then one byte every 5 s.
- Samples: VmRSS/VmHWM from /proc/<pid>/status, fds = entries of /proc/<pid>/fd, CPU from /proc/<pid>/stat, size
  of the mitmdump log. The log's head and tail are kept under bench/out/.
"""


def verdict_ok(soak: Soak, summ: dict) -> bool:
    bad = sum(1 for o in soak.pulls if not o["ok"])
    return bad == 0 and summ["leaks"] == 0 and not soak.errors


# =========================================================================== main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the mixed load runs (default 10)")
    ap.add_argument("--hostile-rate", type=float, default=1.0, help="scale of the hostile request rates (default 1.0: "
                    + ", ".join(f"{k} {v:g}/s" for k, v in RATES.items()) + ")")
    ap.add_argument("--slow-fastpath", type=int, default=SLOW_FASTPATH,
                    help=f"slowloris connections held on the fast-path port (default {SLOW_FASTPATH})")
    ap.add_argument("--slow-proxy", type=int, default=SLOW_PROXY,
                    help=f"slowloris connections held on the proxy port (default {SLOW_PROXY})")
    ap.add_argument("--trickle", type=int, default=TRICKLE_IN_FLIGHT,
                    help=f"nvcr.io requests kept in flight (default {TRICKLE_IN_FLIGHT})")
    ap.add_argument("--pull-timeout", type=int, default=120,
                    help="seconds before a normal pull counts as failed (default 120)")
    ap.add_argument("--slow-seconds", type=float, default=5.0,
                    help="normal operations slower than this are counted apart (default 5; reported, not a failure)")
    ap.add_argument("--regcache-config", default=DEFAULT_CONFIG,
                    help=f"regcache_config lines besides the fast-path port, \\n between lines (default "
                    f"{DEFAULT_CONFIG!r}: short TTLs, so normal pulls keep asking upstream while the load runs)")
    ap.add_argument("--src", help="run regcache from this source tree's src/ (default: this tree's)")
    ap.add_argument("--memwatch", type=float, default=0, metavar="SECONDS",
                    help="load bench/memwatch.py into mitmdump: tracemalloc, malloc and gc type counts every "
                    "SECONDS s to bench/out/soak-<time>-memwatch.txt (default 0: off; slows mitmdump)")
    ap.add_argument("--memwatch-frames", type=int, default=25,
                    help="tracemalloc frames for --memwatch (default 25; 0: no tracemalloc, only RSS by mapping, "
                    "malloc and gc counts)")
    ap.add_argument("--report", default=str(BENCH / "SOAK.md"),
                    help="where to write the report (default bench/SOAK.md)")
    ap.add_argument("--worker", choices=("hostile", "trickle"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if args.worker == "hostile":
            Hostile(spec).run()
        else:
            trickle_server(spec)
        return 0

    if os.geteuid() != 0:
        print("python -m bench.soak needs root (network namespaces)", file=sys.stderr)
        return 2
    src_root = Path(args.src).resolve() if args.src else ROOT
    src = src_root / "src"
    if not (src / "regcachelib").is_dir():
        ap.error(f"{src}/regcachelib does not exist")
    # regcache (mitmdump, started by the e2e helper) runs from this tree's src/, not an installed copy
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(src))
    given = argv if argv is not None else sys.argv[1:]
    command = os.environ.get("BENCH_COMMAND") or shlex.join(["python", "-m", "bench.soak", *given])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    from . import infra

    started = _dt.datetime.now().astimezone()
    source = infra.source_version(src_root)
    if args.src:
        source = f"`{src}` (--src; git: {source})"
    soak = Soak(args)
    try:
        soak.run()
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - report what was measured so far
        traceback.print_exc()
        soak.errors.append("the soak failed: " + traceback.format_exc().strip().splitlines()[-1])
    summ = summarize(soak)
    text = report_markdown(soak, summ, command, started, source)
    Path(args.report).write_text(text)
    OUT.mkdir(parents=True, exist_ok=True)
    raw = OUT / f"soak-{soak.run_id}.json"
    raw.write_text(json.dumps({"command": command, "source": source, "args": vars(args), "summary": summ,
                               "pulls": soak.pulls,
                               "samples": soak.samples, "hostile": soak.hostile, "trickle_server": soak.trickle_stats,
                               "log": soak.log_stats, "errors": soak.errors}, indent=1, default=str))
    print()
    print(text)
    kept = f" (mitmdump log kept as {soak.log_copy})" if hasattr(soak, "log_copy") else ""
    print(f"wrote {args.report} and {raw}{kept}")
    return 0 if verdict_ok(soak, summ) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The test world: upstream registries, a router and a client in network namespaces.

::

    client ns (<p>-cl)            router ns (<p>-rt)              upstream ns (<p>-up)
    10.77.2.2/24  <-- veth -->  10.77.2.1 | 10.77.1.1  <-- veth -->  10.77.1.11 registry-1.docker.io
    default via 10.77.2.1         ip_forward=1                       10.77.1.12 auth.docker.io
                                  (regcache runs here)               10.77.1.13 production.cloudflare.docker.com
                                                                     10.77.1.14 quay.io  .15 gcr.io
                                                                     10.77.1.16 registry.k8s.io  .17 ghcr.io
                                                                     default via 10.77.1.1

In the upstream namespace one nginx terminates TLS for every host name on its
own IP:443 (one access log per host) and proxies to:

* a docker-registry with token auth for registry-1.docker.io (127.0.0.1:5001);
  nginx answers authenticated ``GET /v2/<name>/blobs/sha256:<hex>`` itself with
  a 307 to production.cloudflare.docker.com, which serves the blob files
  straight from that registry's storage;
* the token service (tokenserver.py) for auth.docker.io (127.0.0.1:5100);
* open docker-registry instances for quay.io, gcr.io, registry.k8s.io, ghcr.io
  (127.0.0.1:5002..5005).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import images as _images
from .pki import PKI, make_token_signing_key

HERE = Path(__file__).resolve().parent

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"
SKOPEO_BIN = shutil.which("skopeo") or "/usr/bin/skopeo"
SQUID_BIN = shutil.which("squid") or "/usr/sbin/squid"

UPSTREAM_NET = "10.77.1"
CLIENT_NET = "10.77.2"

DOCKER_HOST = "registry-1.docker.io"
AUTH_HOST = "auth.docker.io"
CDN_HOST = "production.cloudflare.docker.com"

# host name -> last octet of its upstream IP
HOSTS = {
    DOCKER_HOST: 11,
    AUTH_HOST: 12,
    CDN_HOST: 13,
    "quay.io": 14,
    "gcr.io": 15,
    "registry.k8s.io": 16,
    "ghcr.io": 17,
}
# extra names served by the same server (same IP, in the cert, in hosts files)
ALIASES = {DOCKER_HOST: ["index.docker.io"]}
# names accepted by request_log()/image() that mean another host
HOST_ALIASES = {"docker.io": DOCKER_HOST, "index.docker.io": DOCKER_HOST}

# registries behind nginx: host -> loopback port in the upstream ns
REGISTRY_PORTS = {
    DOCKER_HOST: 5001,
    "quay.io": 5002,
    "gcr.io": 5003,
    "registry.k8s.io": 5004,
    "ghcr.io": 5005,
}
TOKEN_PORT = 5100
# The opt-in egress proxy (start_egress_proxy): Debian's squid on its own upstream-side address.
EGRESS_PROXY_OCTET = 30
EGRESS_PROXY_PORT = 3128

TOKEN_SERVICE = "registry.docker.io"
TOKEN_ISSUER = "auth.docker.io"
TOKEN_REALM = f"https://{AUTH_HOST}/token"
USERNAME = "testuser"
PASSWORD = "testpass"
# the account a cache is configured with (regcache's credentials:), as a Docker Hub PAT would be
HUB_USERNAME = "hubuser"
HUB_PASSWORD = "hubpass-0123456789abcdef"
# Docker Hub's pull limit per token subject (tokenserver.py /ratelimit); only reported, never
# enforced, except while ratelimited(True)
RATELIMITS = {"anonymous": 10000, "*": 20000}

PROXY_ENV_VARS = {
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
}

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_AUTO_PREFIX_RE = re.compile(r"^rc(\d+)[a-z]?$")
_NS_SUFFIXES = ("up", "rt", "cl", "st")  # st: the cache tier's store (tier.py)
_VETH_SUFFIXES = ("u0", "r0", "r1", "c0")
_counter = itertools.count()
_WORKDIR_SUBDIRS = ("pki", "certdir", "logs", "conf", "nginx", "registries", "images", "auth.json")


class WorldError(RuntimeError):
    pass


def _sh(argv, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(argv, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise WorldError(
            f"command failed ({p.returncode}): {' '.join(map(str, argv))}\n"
            f"stdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def _netns_list() -> list[str]:
    p = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(ns: str) -> None:
    for _ in range(3):
        p = _sh(["ip", "netns", "pids", ns], check=False)
        pids = [int(x) for x in p.stdout.split() if x.isdigit() and int(x) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def default_workdir(prefix: str) -> Path:
    return Path("/tmp") / f"regcache-world-{prefix}"


def cleanup_prefix(prefix: str, remove_workdir: bool = True) -> None:
    """Remove everything a world with ``prefix`` may have left behind:
    processes in its namespaces, the namespaces, stray veths in the root
    namespace, /etc/netns/<ns> and (``remove_workdir``) its default work
    directory /tmp/regcache-world-<prefix>."""
    existing = set(_netns_list())
    for suffix in _NS_SUFFIXES:
        ns = f"{prefix}-{suffix}"
        if ns in existing:
            _kill_netns_pids(ns)
            _sh(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    for suffix in _VETH_SUFFIXES:
        dev = f"{prefix}-{suffix}"
        if os.path.exists(f"/sys/class/net/{dev}"):
            _sh(["ip", "link", "del", dev], check=False)
    if remove_workdir:
        shutil.rmtree(default_workdir(prefix), ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Clean worlds with an automatic prefix (``rc<pid>``) whose pid is dead."""
    cleaned = []
    prefixes = set()
    for ns in _netns_list():
        base, _, suffix = ns.rpartition("-")
        m = _AUTO_PREFIX_RE.match(base)
        if m and suffix in _NS_SUFFIXES:
            prefixes.add((base, int(m.group(1))))
    for prefix, pid in prefixes:
        if pid != os.getpid() and not _pid_alive(pid):
            cleanup_prefix(prefix)
            cleaned.append(prefix)
    return cleaned


class World:
    """See the module docstring.  ``with World() as w: ...`` or ``up()``/``down()``."""

    def __init__(
        self,
        prefix: str | None = None,
        workdir: str | os.PathLike | None = None,
        *,
        specs=None,
        http2: bool = True,
        keep_workdir: bool | None = None,
    ):
        if prefix is None:
            n = next(_counter)
            prefix = f"rc{os.getpid()}" + ("" if n == 0 else chr(ord("a") + (n - 1) % 26))
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: want [a-z][a-z0-9]{{0,11}}")
        self.prefix = prefix
        self.ns_upstream = f"{prefix}-up"
        self.ns_router = f"{prefix}-rt"
        self.ns_client = f"{prefix}-cl"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else default_workdir(prefix)
        if keep_workdir is None:
            keep_workdir = os.environ.get("REGCACHE_WORLD_KEEP", "") not in ("", "0")
        self.keep_workdir = keep_workdir
        self.specs = tuple(specs) if specs is not None else _images.DEFAULT_SPECS
        self.http2 = http2

        self.router_upstream_ip = f"{UPSTREAM_NET}.1"
        self.router_client_ip = f"{CLIENT_NET}.1"
        self.client_ip = f"{CLIENT_NET}.2"
        self.upstream_ips = {h: f"{UPSTREAM_NET}.{o}" for h, o in HOSTS.items()}
        for h, al in ALIASES.items():
            for a in al:
                self.upstream_ips.setdefault(a, self.upstream_ips[h])
        self.username, self.password = USERNAME, PASSWORD
        self.cdn_host, self.auth_host, self.docker_host = CDN_HOST, AUTH_HOST, DOCKER_HOST

        self.images: list[_images.Image] = []
        self.timings: dict[str, float] = {}
        self._procs: list[tuple[str, subprocess.Popen]] = []  # (group, proc)
        self._up = False
        self._atexit_registered = False

    # ------------------------------------------------------------------ paths
    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def ca_cert_path(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.pki_dir / "ca.key"

    @property
    def ca_bundle_path(self) -> Path:
        return self.pki_dir / "ca-bundle.crt"

    @property
    def cert_dir(self) -> Path:
        """Directory with ``ca.crt`` for skopeo/podman ``--*-cert-dir``."""
        return self.workdir / "certdir"

    @property
    def auth_file(self) -> Path:
        """An empty containers auth.json (REGISTRY_AUTH_FILE) so no host creds leak in."""
        return self.workdir / "auth.json"

    def registry_root(self, host: str) -> Path:
        return self.workdir / "registries" / self._canon(host)

    def hosts_file(self, ns: str) -> Path:
        return Path("/etc/netns") / self._ns(ns) / "hosts"

    @property
    def all_ns(self) -> list[str]:
        return [self.ns_upstream, self.ns_router, self.ns_client]

    # ---------------------------------------------------------------- helpers
    def _ns(self, ns: str) -> str:
        short = {
            "up": self.ns_upstream, "upstream": self.ns_upstream,
            "rt": self.ns_router, "router": self.ns_router,
            "cl": self.ns_client, "client": self.ns_client,
        }
        return short.get(ns, ns)

    @staticmethod
    def _canon(host: str) -> str:
        return HOST_ALIASES.get(host, host)

    @staticmethod
    def base_env(env: dict | None = None) -> dict:
        """os.environ without proxy variables, updated with ``env``."""
        e = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_VARS}
        if env:
            e.update(env)
        return e

    def client_env(self, **extra) -> dict:
        """Env for a client: SSL_CERT_FILE = CA bundle, an empty REGISTRY_AUTH_FILE."""
        e = {"SSL_CERT_FILE": str(self.ca_bundle_path), "REGISTRY_AUTH_FILE": str(self.auth_file)}
        e.update(extra)
        return e

    def run(self, ns, argv, env=None, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` in namespace ``ns`` (full name or up/rt/cl/upstream/router/client).

        ``env`` is merged over os.environ minus proxy variables.  Output is
        captured as text unless overridden."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        full = ["ip", "netns", "exec", self._ns(ns), *map(str, argv)]
        p = subprocess.run(full, env=self.base_env(env), timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, full, p.stdout, p.stderr)
        return p

    def popen(self, ns, argv, env=None, group: str = "user", **kw) -> subprocess.Popen:
        """Start ``argv`` in ``ns`` in its own session; killed at down()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        full = ["ip", "netns", "exec", self._ns(ns), *map(str, argv)]
        p = subprocess.Popen(full, env=self.base_env(env), start_new_session=True, **kw)
        self._procs.append((group, p))
        return p

    def _kill(self, procs: list[subprocess.Popen], timeout: float = 3.0) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # stragglers in the group too
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                pass

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "World":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "World":
        if self._up:
            return self
        if os.geteuid() != 0:
            raise WorldError("World needs root (network namespaces)")
        t0 = time.monotonic()
        cleanup_stale()
        cleanup_prefix(self.prefix, remove_workdir=self._own_workdir)
        if not self._own_workdir:  # a caller's workdir: only our own subdirs
            for sub in _WORKDIR_SUBDIRS:
                shutil.rmtree(self.workdir / sub, ignore_errors=True)
        if not self._atexit_registered:
            atexit.register(self.down)
            self._atexit_registered = True
        self._up = True  # from here on down() has something to undo
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.workdir, 0o755)
            self.logs_dir.mkdir(exist_ok=True)
            self.auth_file.write_text("{}\n")
            with ThreadPoolExecutor(2) as ex:
                fut_img = ex.submit(_images.build_all, self.workdir / "images", self.specs)
                t = time.monotonic()
                self._setup_network()
                self.timings["network"] = time.monotonic() - t
                t = time.monotonic()
                self._setup_pki()
                self._write_configs()
                self.timings["pki+configs"] = time.monotonic() - t
                t = time.monotonic()
                self.start_upstream()
                self.timings["start_upstream"] = time.monotonic() - t
                built = fut_img.result()
            t = time.monotonic()
            self._push_images(built)
            self.timings["push"] = time.monotonic() - t
            self.clear_request_logs()
        except BaseException:
            self.down()
            raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def down(self) -> None:
        """Tear everything down; idempotent and safe after a failed up()."""
        if not self._up:
            return
        self._up = False
        self._kill([p for _, p in self._procs])
        self._procs.clear()
        for ns in self.all_ns:
            if ns in _netns_list():
                _kill_netns_pids(ns)
        cleanup_prefix(self.prefix, remove_workdir=False)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def is_up(self) -> bool:
        return self._up

    # --------------------------------------------------------------- network
    def _setup_network(self) -> None:
        p = self.prefix
        up, rt, cl = self.ns_upstream, self.ns_router, self.ns_client
        u0, r0, r1, c0 = (f"{p}-{s}" for s in _VETH_SUFFIXES)
        for ns in (up, rt, cl):
            _sh(["ip", "netns", "add", ns])
        # /etc/netns/<ns>/{hosts,resolv.conf} are bind-mounted by `ip netns exec`
        for ns in (up, rt, cl):
            self.write_hosts(ns)
            d = Path("/etc/netns") / ns
            # no real DNS in here: fail fast for names missing from hosts
            (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        batch = [
            f"link add {u0} type veth peer name {r0}",
            f"link set {u0} netns {up}",
            f"link set {r0} netns {rt}",
            f"link add {c0} type veth peer name {r1}",
            f"link set {c0} netns {cl}",
            f"link set {r1} netns {rt}",
        ]
        _sh(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        nsb = {
            up: [f"link set lo up", f"link set {u0} up"]
            + [f"addr add {ip}/24 dev {u0}" for h, ip in self.upstream_ips.items() if h in HOSTS]
            + [f"route add default via {self.router_upstream_ip}"],
            rt: [
                "link set lo up",
                f"addr add {self.router_upstream_ip}/24 dev {r0}",
                f"addr add {self.router_client_ip}/24 dev {r1}",
                f"link set {r0} up",
                f"link set {r1} up",
            ],
            cl: [
                "link set lo up",
                f"addr add {self.client_ip}/24 dev {c0}",
                f"link set {c0} up",
                f"route add default via {self.router_client_ip}",
            ],
        }
        for ns, cmds in nsb.items():
            _sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
        # forwarding in the router ns (per-netns sysctl)
        _sh(["ip", "netns", "exec", rt, "sysctl", "-qw", "net.ipv4.ip_forward=1"])

    def hosts_content(self, mapping: dict[str, str] | None = None) -> str:
        mapping = mapping if mapping is not None else self.upstream_ips
        by_ip: dict[str, list[str]] = {}
        for h, ip in mapping.items():
            by_ip.setdefault(ip, []).append(h)
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{ip}\t{' '.join(names)}" for ip, names in by_ip.items()]
        return "\n".join(lines) + "\n"

    def write_hosts(self, ns: str, mapping: dict[str, str] | None = None) -> Path:
        """(Re)write /etc/netns/<ns>/hosts; default maps every host to its upstream IP.
        Takes effect for processes started afterwards."""
        path = self.hosts_file(ns)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.hosts_content(mapping))
        return path

    # ------------------------------------------------------------------- PKI
    def _setup_pki(self) -> None:
        pki = PKI(self.pki_dir)
        pki.create_ca()
        self._leaf = {}
        for host in HOSTS:
            names = [host, *ALIASES.get(host, [])]
            self._leaf[host] = pki.issue(names, ips=[self.upstream_ips[host]])
        self._token_key, self._token_cert, self._token_kid = make_token_signing_key(
            self.pki_dir, TOKEN_ISSUER
        )
        pki.make_cert_dir(self.cert_dir)
        self.pki = pki

    # --------------------------------------------------------------- configs
    def _registry_config(self, host: str) -> Path:
        root = self.registry_root(host)
        root.mkdir(parents=True, exist_ok=True)
        cfg = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(root)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{REGISTRY_PORTS[host]}",
                "host": f"https://{host}",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if host == DOCKER_HOST:
            cfg["auth"] = {
                "token": {
                    "realm": TOKEN_REALM,
                    "service": TOKEN_SERVICE,
                    "issuer": TOKEN_ISSUER,
                    "rootcertbundle": str(self._token_cert),
                }
            }
        path = self.workdir / "conf" / f"registry-{host}.yml"
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        return path

    def _nginx_config(self) -> str:
        L = self.logs_dir
        tmp = self.workdir / "nginx"
        docker_root = self.registry_root(DOCKER_HOST)
        h2 = " http2" if self.http2 else ""

        def tls(host):
            leaf = self._leaf[host]
            ip = self.upstream_ips[host]
            names = " ".join([host, *ALIASES.get(host, [])])
            return (
                f"        listen {ip}:443 ssl{h2};\n"
                f"        server_name {names};\n"
                f"        ssl_certificate {leaf.cert_path};\n"
                f"        ssl_certificate_key {leaf.key_path};\n"
                f"        access_log {L}/{host}.access.log world;\n"
            )

        proxy = (
            "            proxy_pass http://127.0.0.1:{port};\n"
            "            proxy_http_version 1.1;\n"
            "            proxy_set_header Host $host;\n"
            "            proxy_set_header Connection \"\";\n"
            "            proxy_set_header X-Forwarded-Proto https;\n"
            "            proxy_set_header X-Forwarded-For $remote_addr;\n"
            "            proxy_buffering off;\n"
            "            proxy_request_buffering off;\n"
            "            proxy_read_timeout 300s;\n"
            "            proxy_send_timeout 300s;\n"
        )
        servers = []
        # Docker Hub registry: blob GETs with a token -> 307 to the CDN
        servers.append(
            "    server {\n" + tls(DOCKER_HOST)
            + '        location ~ "^/v2/(?<repo>.+)/blobs/(?<dg>sha256:(?<hex>(?<h2>[0-9a-f]{2})[0-9a-f]{62}))$" {\n'
            + "            if ($blob_redirect) {\n"
            + f"                return 307 https://{CDN_HOST}/registry-v2/docker/registry/v2/blobs/sha256/$h2/$hex/data?verify=$msec-$request_id;\n"
            + "            }\n"
            + proxy.format(port=REGISTRY_PORTS[DOCKER_HOST])
            + "        }\n"
            # Docker Hub's pull limit on manifests (tokenserver.py /ratelimit): figures on every
            # answer; 429 while world.ratelimited(True)
            + '        location ~ "^/v2/.+/manifests/[^/]+$" {\n'
            + "            auth_request /_ratelimit;\n"
            + "            auth_request_set $rl_limit $upstream_http_ratelimit_limit;\n"
            + "            auth_request_set $rl_remaining $upstream_http_ratelimit_remaining;\n"
            + "            auth_request_set $rl_source $upstream_http_docker_ratelimit_source;\n"
            + "            add_header ratelimit-limit $rl_limit always;\n"
            + "            add_header ratelimit-remaining $rl_remaining always;\n"
            + "            add_header docker-ratelimit-source $rl_source always;\n"
            + "            error_page 403 = @toomanyrequests;\n"
            + proxy.format(port=REGISTRY_PORTS[DOCKER_HOST])
            + "        }\n"
            + "        location = /_ratelimit {\n"
            + "            internal;\n"
            + f"            proxy_pass http://127.0.0.1:{TOKEN_PORT}/ratelimit;\n"
            + "            proxy_pass_request_body off;\n"
            + "            proxy_set_header Content-Length \"\";\n"
            + "            proxy_set_header X-Original-Method $request_method;\n"
            + "            proxy_set_header X-Real-IP $remote_addr;\n"
            + "        }\n"
            + "        location @toomanyrequests {\n"
            + "            default_type application/json;\n"
            + "            add_header ratelimit-limit $rl_limit always;\n"
            + "            add_header ratelimit-remaining $rl_remaining always;\n"
            + "            add_header docker-ratelimit-source $rl_source always;\n"
            + "            return 429 '{\"errors\":[{\"code\":\"TOOMANYREQUESTS\",\"message\":\"You have reached your "
            + "pull rate limit.\"}]}';\n"
            + "        }\n"
            + "        location / {\n" + proxy.format(port=REGISTRY_PORTS[DOCKER_HOST]) + "        }\n"
            + "    }\n"
        )
        # CDN: blob files straight from the registry storage
        servers.append(
            "    server {\n" + tls(CDN_HOST)
            + "        location /registry-v2/docker/registry/v2/blobs/ {\n"
            + f"            alias {docker_root}/docker/registry/v2/blobs/;\n"
            + "            limit_except GET { deny all; }\n"
            + "            add_header Cache-Control \"public, max-age=14400\";\n"
            + "        }\n"
            + "        location / { return 404; }\n"
            + "    }\n"
        )
        servers.append(
            "    server {\n" + tls(AUTH_HOST)
            + "        location / {\n" + proxy.format(port=TOKEN_PORT) + "        }\n"
            + "    }\n"
        )
        for host, port in REGISTRY_PORTS.items():
            if host == DOCKER_HOST:
                continue
            servers.append(
                "    server {\n" + tls(host)
                + "        location / {\n" + proxy.format(port=port) + "        }\n"
                + "    }\n"
            )
        return (
            "daemon off;\n"
            "master_process on;\n"
            "user root root;\n"
            "worker_processes 2;\n"
            f"pid {tmp}/nginx.pid;\n"
            f"error_log {L}/nginx-error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            "    types { }\n"
            "    default_type application/octet-stream;\n"
            "    sendfile on;\n"
            "    tcp_nopush on;\n"
            "    keepalive_timeout 65;\n"
            "    server_tokens off;\n"
            "    client_max_body_size 0;\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"
            f"    client_body_temp_path {tmp}/body;\n"
            f"    proxy_temp_path {tmp}/proxy;\n"
            f"    fastcgi_temp_path {tmp}/fastcgi;\n"
            f"    uwsgi_temp_path {tmp}/uwsgi;\n"
            f"    scgi_temp_path {tmp}/scgi;\n"
            "    map $http_authorization $has_auth { \"\" false; default true; }\n"
            "    map \"$request_method:$http_authorization\" $blob_redirect { \"~^GET:.\" 1; default 0; }\n"
            "    log_format world escape=json '{\"time\":$msec,\"host\":\"$host\",\"method\":\"$request_method\","
            "\"path\":\"$request_uri\",\"status\":$status,\"bytes\":$body_bytes_sent,\"range\":\"$http_range\","
            "\"auth\":$has_auth,\"ua\":\"$http_user_agent\",\"request_time\":$request_time,"
            "\"location\":\"$sent_http_location\",\"proto\":\"$server_protocol\","
            "\"conn\":\"$pid-$connection\",\"conn_requests\":$connection_requests}';\n"
            "    access_log off;\n"
            + "".join(servers)
            + "}\n"
        )

    def _write_configs(self) -> None:
        (self.workdir / "conf").mkdir(exist_ok=True)
        tmp = self.workdir / "nginx"
        tmp.mkdir(exist_ok=True)
        self._registry_configs = {h: self._registry_config(h) for h in REGISTRY_PORTS}
        self._nginx_conf = self.workdir / "conf" / "nginx.conf"
        self._nginx_conf.write_text(self._nginx_config())
        _sh(["ip", "netns", "exec", self.ns_upstream, NGINX_BIN, "-t", "-q", "-p", str(tmp), "-c", str(self._nginx_conf)])

    # ---------------------------------------------------------- processes
    def _service_env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(self.workdir)}

    def start_upstream(self, timeout: float = 20) -> None:
        """Start every registry, the token service and nginx; wait until ready.
        Data (registry storage) and logs are kept across stop/start."""
        ups = [p for g, p in self._procs if g == "upstream"]
        if ups and all(p.poll() is None for p in ups):
            return  # already running
        self.stop_upstream()  # some died: restart them all
        ns = self.ns_upstream
        env = self._service_env()
        started = []
        for host, cfg in self._registry_configs.items():
            log = open(self.logs_dir / f"{host}.registry.log", "ab")
            p = self._popen_raw(ns, [REGISTRY_BIN, "serve", str(cfg)], env, log)
            started.append((f"docker-registry {host}", p, self.logs_dir / f"{host}.registry.log"))
        log = open(self.logs_dir / "tokenserver.stderr", "ab")
        p = self._popen_raw(
            ns,
            [
                sys.executable, str(HERE / "tokenserver.py"),
                "--listen", f"127.0.0.1:{TOKEN_PORT}",
                "--key", str(self._token_key), "--kid", self._token_kid,
                "--issuer", TOKEN_ISSUER, "--service", TOKEN_SERVICE,
                "--user", f"{USERNAME}:{PASSWORD}", "--user", f"{HUB_USERNAME}:{HUB_PASSWORD}",
                "--private-prefix", "private/",
                "--log", str(self.token_log_path),
                *[f"--ratelimit={name}={n}" for name, n in RATELIMITS.items()],
                "--ratelimit-file", str(self.ratelimit_file),
            ],
            env,
            log,
        )
        started.append(("token service", p, self.logs_dir / "tokenserver.stderr"))
        log = open(self.logs_dir / "nginx.stderr", "ab")
        p = self._popen_raw(
            ns,
            [NGINX_BIN, "-p", str(self.workdir / "nginx"), "-c", str(self._nginx_conf)],
            env,
            log,
        )
        started.append(("nginx", p, self.logs_dir / "nginx-error.log"))
        addrs = [f"127.0.0.1:{port}" for port in REGISTRY_PORTS.values()]
        addrs += [f"127.0.0.1:{TOKEN_PORT}"]
        addrs += [f"{self.upstream_ips[h]}:443" for h in HOSTS]
        r = self.run(ns, [sys.executable, str(HERE / "probe.py"), "wait", "--timeout", str(timeout), *addrs],
                     check=False, timeout=timeout + 10, env=env)
        dead = [(n, p, lp) for n, p, lp in started if p.poll() is not None]
        if r.returncode != 0 or dead:
            msg = [f"upstream not ready: {r.stderr.strip()}"]
            for n, p, lp in started:
                if p.poll() is not None:
                    tail = lp.read_text(errors="replace")[-2000:] if lp.exists() else ""
                    msg.append(f"{n} exited with {p.returncode}:\n{tail}")
            raise WorldError("\n".join(msg))

    def _popen_raw(self, ns, argv, env, log) -> subprocess.Popen:
        try:
            p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *map(str, argv)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(("upstream", p))
        return p

    def stop_upstream(self) -> None:
        """Stop every registry, nginx and the token service (storage is kept)."""
        ups = [p for g, p in self._procs if g == "upstream"]
        self._kill(ups)
        self._procs = [(g, p) for g, p in self._procs if g != "upstream"]

    def restart_upstream(self) -> None:
        self.stop_upstream()
        self.start_upstream()

    # ------------------------------------------------------------------ images
    def _push_images(self, built: list[_images.Image]) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.workdir),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "SSL_CERT_FILE": str(self.ca_bundle_path),
            "TMPDIR": str(self.workdir),
        }

        def push(img: _images.Image):
            argv = [
                SKOPEO_BIN, "--insecure-policy", "copy", "--all", "--preserve-digests", "-q",
                "--retry-times", "2",
                "--dest-cert-dir", str(self.cert_dir),
            ]
            if img.host == DOCKER_HOST:
                argv += ["--dest-creds", f"{USERNAME}:{PASSWORD}"]
            argv += [_images.skopeo_source(img), f"docker://{img.host_ref}"]
            r = self.run(self.ns_upstream, argv, env=env, check=False, timeout=300)
            if r.returncode != 0:
                raise WorldError(f"push of {img.ref} failed:\n{r.stderr}\n{r.stdout}")

        with ThreadPoolExecutor(4) as ex:  # shared blobs: skopeo copes with races
            list(ex.map(push, built))

        # check what the registries report (through nginx, with tokens)
        refs = [[i.host, i.repository, i.tag] for i in built]
        r = self.run(
            self.ns_upstream,
            [sys.executable, str(HERE / "probe.py"), "manifests", "--ca", str(self.ca_bundle_path),
             "--creds", f"{USERNAME}:{PASSWORD}"],
            input=json.dumps(refs), env=env, timeout=120,
        )
        reported = json.loads(r.stdout)
        for img, rep in zip(built, reported):
            if rep["status"] != 200 or rep["digest"] != img.digest:
                raise WorldError(f"{img.ref}: registry reports {rep}, expected {img.digest}")
            if rep["media_type"] != img.media_type:
                raise WorldError(f"{img.ref}: registry reports type {rep['media_type']}, expected {img.media_type}")
        self.images = built

    def image(self, ref: str) -> _images.Image:
        """Look up an image by ``docker.io/library/small:1`` or
        ``registry-1.docker.io/library/small:1`` (also ``library/small:1`` for
        docker.io; a leading ``docker://`` is ignored)."""
        ref = ref.removeprefix("docker://")
        if "/" not in ref.split(":")[0] or "." not in ref.split("/")[0]:
            ref = "docker.io/" + ref
        reg, _, rest = ref.partition("/")
        reg = {"registry-1.docker.io": "docker.io", "index.docker.io": "docker.io"}.get(reg, reg)
        for img in self.images:
            if img.registry == reg and f"{img.repository}:{img.tag}" == rest:
                return img
        raise KeyError(ref)

    # ------------------------------------------------------- egress proxy (opt-in)
    @property
    def egress_proxy_ip(self) -> str:
        return f"{UPSTREAM_NET}.{EGRESS_PROXY_OCTET}"

    @property
    def egress_proxy_url(self) -> str:
        return f"http://{self.egress_proxy_ip}:{EGRESS_PROXY_PORT}"

    @property
    def egress_proxy_log_path(self) -> Path:
        return self.workdir / "squid" / "access.log"

    def start_egress_proxy(self, deny: tuple[str, ...] = (), users: dict[str, str] | None = None,
                           timeout: float = 20) -> None:
        """(Re)start squid in the upstream namespace on egress_proxy_ip:3128: CONNECT to :443
        and plain HTTP from the router and client networks, no caching, 403 for the hosts in
        ``deny``; with ``users`` (name -> password) only for them (Basic auth, 407 otherwise).
        Its access log (egress_proxy_log()) shows what went through it since this start. Not
        part of up(): tests that want it start it."""
        self.stop_egress_proxy()
        d = self.workdir / "squid"
        d.mkdir(exist_ok=True)
        (d / "access.log").unlink(missing_ok=True)
        shutil.chown(d, "proxy", "proxy")  # squid drops root for its effective user before writing logs
        os.chmod(self.workdir, 0o755)
        dev = f"{self.prefix}-u0"
        _sh(["ip", "-n", self.ns_upstream, "addr", "replace", f"{self.egress_proxy_ip}/24", "dev", dev])
        auth = ""
        if users:
            passwd = d / "passwd"
            lines = []
            for user, password in users.items():
                hashed = _sh(["openssl", "passwd", "-apr1", "-stdin"], input=password + "\n").stdout.strip()
                lines.append(f"{user}:{hashed}\n")
            passwd.write_text("".join(lines))
            shutil.chown(passwd, "proxy", "proxy")
            auth = (f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}\n"
                    "auth_param basic realm world-egress\n"
                    "acl users proxy_auth REQUIRED\n"
                    "http_access deny !users\n")
        conf = d / "squid.conf"
        conf.write_text(
            f"http_port {self.egress_proxy_ip}:{EGRESS_PROXY_PORT}\n"
            f"pid_filename {d}/squid.pid\n"
            "logformat world %ts.%03tu %>a %rm %ru %>Hs %un\n"
            f"access_log stdio:{d}/access.log world\n"
            f"cache_log {d}/cache.log\n"
            f"coredump_dir {d}\n"
            "cache deny all\n"
            "cache_mem 8 MB\n"
            "shutdown_lifetime 0 seconds\n"
            "acl SSL_ports port 443\n"
            "acl CONNECT method CONNECT\n"
            "http_access deny CONNECT !SSL_ports\n"
            + (f"acl denied dstdomain {' '.join(deny)}\nhttp_access deny denied\n" if deny else "")
            + auth
            + f"acl world src {UPSTREAM_NET}.0/24 {CLIENT_NET}.0/24\n"
            "http_access allow world\n"
            "http_access deny all\n"
        )
        log = open(d / "squid.stderr", "ab")
        try:
            p = self.popen(self.ns_upstream, [SQUID_BIN, "-N", "-f", str(conf)], env=self._service_env(),
                           group="squid", stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        r = self.run(self.ns_upstream, [sys.executable, str(HERE / "probe.py"), "wait", "--timeout", str(timeout),
                                        f"{self.egress_proxy_ip}:{EGRESS_PROXY_PORT}"],
                     check=False, timeout=timeout + 10, env=self._service_env())
        if r.returncode != 0 or p.poll() is not None:
            tail = "".join(f.read_text(errors="replace")[-2000:] for f in (d / "squid.stderr", d / "cache.log")
                           if f.exists())
            raise WorldError(f"squid not ready: {r.stderr.strip()}\n{tail}")

    def stop_egress_proxy(self) -> None:
        self._kill([p for g, p in self._procs if g == "squid"])
        self._procs = [(g, p) for g, p in self._procs if g != "squid"]

    def egress_proxy_log(self) -> list[dict]:
        """What went through squid, oldest first: time, client, method, url (host:port for a
        CONNECT), status, user (the proxy user, "-" for none)."""
        try:
            text = self.egress_proxy_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 6:
                out.append({"time": float(parts[0]), "client": parts[1], "method": parts[2], "url": parts[3],
                            "status": int(parts[4]) if parts[4].isdigit() else 0, "user": parts[5]})
        return out

    def block_direct_upstream(self, ns: str = "router") -> list[list[str]]:
        """Reject every TCP connection from ``ns`` to the upstream hosts but the egress proxy
        (iptables OUTPUT in that namespace). Returns the rules, for unblock_direct_upstream."""
        rules = [
            ["OUTPUT", "-d", self.egress_proxy_ip, "-p", "tcp", "-j", "ACCEPT"],
            # icmp, not tcp-reset: a reset made in OUTPUT never reaches the local socket (it hangs)
            ["OUTPUT", "-d", f"{UPSTREAM_NET}.0/24", "-p", "tcp", "-j", "REJECT",
             "--reject-with", "icmp-port-unreachable"],
        ]
        for rule in rules:
            self.run(ns, ["iptables", "-A", *rule])
        return rules

    def unblock_direct_upstream(self, rules: list[list[str]], ns: str = "router") -> None:
        for rule in rules:
            self.run(ns, ["iptables", "-D", *rule], check=False)

    # -------------------------------------------------------------------- logs
    @property
    def ratelimit_file(self) -> Path:
        """While it exists, registry-1.docker.io answers manifest GETs 429 (Docker Hub's pull limit)."""
        return self.workdir / "conf" / "ratelimited"

    def ratelimited(self, on: bool) -> None:
        """Make registry-1.docker.io answer manifest GETs 429 TOOMANYREQUESTS (on) or not."""
        if on:
            self.ratelimit_file.touch()
        else:
            self.ratelimit_file.unlink(missing_ok=True)

    @property
    def token_log_path(self) -> Path:
        """The token service's own JSON-lines log (subject and granted access)."""
        return self.logs_dir / "auth-token.jsonl"

    def access_log_path(self, host: str) -> Path:
        return self.logs_dir / f"{self._canon(host)}.access.log"

    def request_log(self, host: str) -> list[dict]:
        """Requests that reached upstream ``host`` (nginx access log), oldest first.

        Each entry: method, path (with query), status, plus host, bytes, range,
        auth (Authorization header present), ua, time, request_time, location, conn (the
        TCP connection it came on: unique per nginx worker pid and connection serial),
        conn_requests (how many requests that connection has carried so far)."""
        host = self._canon(host)
        if host not in HOSTS:
            raise KeyError(host)
        path = self.access_log_path(host)
        out = []
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_request_log(self, host: str, predicate=None, count: int = 1,
                         timeout: float = 5.0) -> list[dict]:
        """Poll ``request_log(host)`` until ``count`` entries match ``predicate``
        (default: any entry); returns the whole log.  nginx writes a line when
        it finalizes a request, which can be a moment after the client has
        its last byte; use this instead of reading the log right away when
        counting exact requests."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.request_log(host)
            n = sum(1 for e in log if predicate is None or predicate(e))
            if n >= count or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def token_log(self) -> list[dict]:
        try:
            text = self.token_log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(l) for l in text.splitlines() if l.strip()]

    def clear_request_logs(self) -> None:
        for host in HOSTS:
            p = self.access_log_path(host)
            if p.exists():
                os.truncate(p, 0)
        if self.token_log_path.exists():
            os.truncate(self.token_log_path, 0)

    # -------------------------------------------------------------- describe
    def describe(self) -> str:
        lines = [
            f"world {self.prefix}: workdir {self.workdir}",
            f"  namespaces: upstream={self.ns_upstream} router={self.ns_router} client={self.ns_client}",
            f"  router: {self.router_upstream_ip} (upstream side), {self.router_client_ip} (client side)",
            f"  client: {self.client_ip}",
            f"  CA: {self.ca_cert_path}   bundle: {self.ca_bundle_path}   cert dir: {self.cert_dir}",
            f"  logs: {self.logs_dir}",
            "  upstream hosts:",
        ]
        lines += [f"    {ip:<12} {h}" for h, ip in self.upstream_ips.items()]
        lines.append("  images:")
        for i in self.images:
            lines.append(f"    {i.ref:<34} {i.digest}  {i.media_type}")
        return "\n".join(lines)

"""What an operator meets before the first pull, with the real tools: the legacy Docker builder
sending the build context (.dockerignore), dockerd reading the daemon.json `client-config docker`
prints, the iptables script `client-config iptables` prints run twice, and mitmdump using the
CA `regcache ca create` makes.

dockerd runs as in test_clients_docker.py (nsenter --net into a namespace of its own, unshare -m,
a tmpfs on /run, a private /etc/docker), but without the world: nothing here needs a registry."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import stop_process_group

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKERD = shutil.which("dockerd")
DOCKER = shutil.which("docker")




class Dockerd:
    """A private dockerd in its own network namespace, everything under one /tmp directory."""

    def __init__(self, netns: str, daemon_json: str = "{}"):
        self.netns = netns
        self.root = Path(tempfile.mkdtemp(prefix="rcop-", dir="/tmp"))
        for d in ("data", "exec", "etc-docker", "cli"):
            (self.root / d).mkdir()
        self.config_file = self.root / "daemon.json"
        self.config_file.write_text(daemon_json)
        self.log_path = self.root / "dockerd.log"
        self.host = f"unix://{self.root}/docker.sock"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Dockerd":
        argv = [
            "nsenter", f"--net=/run/netns/{self.netns}", "unshare", "-m", "--propagation", "private",
            "sh", "-c", 'mount -t tmpfs -o mode=755 regcache-dockerd-run /run && mount --bind "$1" /etc/docker && shift && exec "$@"',
            "sh", str(self.root / "etc-docker"),
            DOCKERD, "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"), "--config-file", str(self.config_file), "-H", self.host,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            r = self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
            if r.returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise DockerdRefused(self.log_path.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd not ready after {timeout}s:\n{r.stderr}\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def docker(self, *args, check=True, timeout=180, env=None, binary=True) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), "DOCKER_CONFIG": str(self.root / "cli"), **(env or {})}
        r = subprocess.run([DOCKER, "-H", self.host, *args], env=env, capture_output=True, timeout=timeout, text=not binary or None)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}): {r.stderr}\n{self.log()[-3000:]}")
        return r

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, 20)
            self.proc = None
        mark = str(self.root).encode()
        for p in Path("/proc").iterdir():  # dockerd's containerd runs in a session of its own
            try:
                if p.name.isdigit() and mark in (p / "cmdline").read_bytes():
                    os.kill(int(p.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class DockerdRefused(Exception):
    pass


@pytest.fixture
def dockerd(netns):
    if not DOCKERD or not DOCKER:
        pytest.skip("dockerd/docker not installed (./test.sh installs docker.io)")
    started: list[Dockerd] = []

    def make(daemon_json: str = "{}") -> Dockerd:
        d = Dockerd(netns, daemon_json)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


# --- .dockerignore: what the legacy builder sends ----------------------------------------------------------

# What a working checkout holds besides the sources: none of it may reach a build context.
NEVER_SENT = [
    ".venv/bin/python", ".venv312/pyvenv.cfg", "src/.venv/lib/x.py",
    "regcache-cache/content/cache.db", "regcache-cache/misses.jsonl",
    "certs/mitmproxy-ca.pem", "certs/mitmproxy-ca.p12", "certs/mitmproxy-ca-cert.pem",
    "bench/out/run1/result.json", ".git/HEAD", "tests/world/ca.pem",
    "src/regcachelib/__pycache__/cli.cpython-311.pyc", "src/regcache.egg-info/PKG-INFO",
]


def test_legacy_builder_sends_only_what_the_dockerfile_copies(dockerd, tmp_path):
    """DOCKER_BUILDKIT=0 docker build of the repository root: the context that arrives in the
    image (FROM scratch, COPY . /ctx/) holds the sources the Dockerfile copies, and no venv,
    cache dir, CA key, benchmark output or .git."""
    checkout = tmp_path / "checkout"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    if (ROOT / ".dockerignore").exists():  # also while uncommitted
        shutil.copy2(ROOT / ".dockerignore", checkout / ".dockerignore")
    for name in NEVER_SENT:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("secret\n")
    dockerfile = tmp_path / "Dockerfile.ctx"
    dockerfile.write_text("FROM scratch\nCOPY . /ctx/\n")
    d = dockerd()
    built = d.docker("build", "-q", "-t", "ctx", "-f", str(dockerfile), str(checkout), env={"DOCKER_BUILDKIT": "0"}, binary=False)
    assert built.returncode == 0
    d.docker("create", "--name", "ctx", "ctx", "/none")
    tar = tarfile.open(fileobj=io.BytesIO(d.docker("export", "ctx").stdout))
    sent = {m.name.removeprefix("ctx/") for m in tar.getmembers() if m.isfile() and m.name.startswith("ctx/")}
    assert not sent & set(NEVER_SENT), sorted(sent & set(NEVER_SENT))
    # what docker/Dockerfile COPYs is all there, and not much else
    for needed in ("pyproject.toml", "README.md", "src/regcachelib/cli.py", "addons/regcache.py",
                   "docker/entrypoint.sh", "docker/entrypoint-transparent.sh"):
        assert needed in sent, needed
    assert all(n.startswith(("src/", "addons/", "docker/entrypoint")) or n in ("pyproject.toml", "README.md") for n in sent), sorted(sent)


# --- the CA: named for regcache, and what mitmdump signs with -----------------------------------------------

MITMDUMP = str(Path(os.sys.executable).parent / "mitmdump")
REGCACHE = [os.sys.executable, "-m", "regcachelib.cli"]


def in_ns(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60, **kw)


def openssl_field(pem: str, field: str) -> str:
    return subprocess.run(["openssl", "x509", "-noout", f"-{field}", "-nameopt", "RFC2253"], input=pem, capture_output=True, text=True, check=True).stdout.strip()


def test_ca_is_named_for_regcache_and_signs_mitmdumps_leaves(netns, tmp_path):
    certs = tmp_path / "certs"
    r = subprocess.run([*REGCACHE, "ca", "create", "--certs", str(certs), "--organization", "Example Corp"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ca_pem = (certs / "mitmproxy-ca-cert.pem").read_text()
    assert openssl_field(ca_pem, "subject") == "subject=O=Example Corp,CN=regcache CA"
    assert "mitmproxy" not in openssl_field(ca_pem, "issuer")
    # mitmdump with that confdir (as run.sh, the service and the image start it) signs with it
    log = open(tmp_path / "mitmdump.log", "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, MITMDUMP, "-s", str(ROOT / "addons" / "regcache.py"),
                             "--set", f"confdir={certs}", "--set", f"regcache_dir={tmp_path / 'cache'}",
                             "--mode", "reverse:https://registry.invalid@5443"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            s = in_ns(netns, ["openssl", "s_client", "-connect", "127.0.0.1:5443", "-servername", "quay.io", "-showcerts"], input="")
            if "BEGIN CERTIFICATE" in s.stdout:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "mitmdump.log").read_text()
            time.sleep(0.3)
    finally:
        stop_process_group(proc, 10)
        log.close()
    leaf = s.stdout[s.stdout.index("-----BEGIN CERTIFICATE"):s.stdout.index("-----END CERTIFICATE-----") + 25] + "\n"
    assert openssl_field(leaf, "issuer") == "issuer=O=Example Corp,CN=regcache CA"
    (tmp_path / "leaf.pem").write_text(leaf)
    v = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "mitmproxy-ca-cert.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    # mitmdump created nothing of its own next to it
    assert sorted(p.name for p in certs.iterdir() if p.name.startswith("mitmproxy-ca")) == [
        "mitmproxy-ca-cert.cer", "mitmproxy-ca-cert.p12", "mitmproxy-ca-cert.pem", "mitmproxy-ca.p12", "mitmproxy-ca.pem"]


# --- client-config docker: a daemon.json this host's dockerd starts with -------------------------------------


def client_config(*argv: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*REGCACHE, "client-config", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r


def test_docker_daemon_json_is_one_this_dockerd_starts_with(dockerd):
    """Without --docker-version, client-config asks the installed dockerd (Debian 12: 20.10, which
    refuses "proxies"); dockerd starts with what it prints and uses the mirror, the port from
    --cache in registry-mirrors."""
    installed = subprocess.run([DOCKERD or "dockerd", "--version"], capture_output=True, text=True).stdout
    r = client_config("docker", "--cache", "cache.example.net:5001")
    d = dockerd(r.stdout)
    mirrors = json.loads(d.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}", binary=False).stdout)
    assert mirrors == ["http://cache.example.net:5001/"]
    assert f"dockerd {'.'.join(installed.split()[2].split('.')[:2])} is installed here" in r.stderr
    if "proxies" in json.loads(r.stdout):  # a dockerd >= 23 here: it took them, and shows them
        assert "cache.example.net:8080" in d.docker("info", "--format", "{{.HTTPSProxy}}", binary=False).stdout


def test_docker_daemon_json_for_another_version_is_what_that_version_needs(dockerd):
    """The control: the config for a dockerd >= 23 has "proxies", which an older dockerd refuses
    to start with, so asking the right version is what keeps the daemon up."""
    installed = subprocess.run([DOCKERD or "dockerd", "--version"], capture_output=True, text=True).stdout
    r = client_config("docker", "--cache", "cache.example.net", "--docker-version", "24.0")
    assert json.loads(r.stdout)["proxies"]["https-proxy"] == "http://cache.example.net:8080"
    if int(installed.split()[2].split(".")[0]) >= 23:
        d = dockerd(r.stdout)
        assert "cache.example.net:8080" in d.docker("info", "--format", "{{.HTTPSProxy}}", binary=False).stdout
    else:
        with pytest.raises(DockerdRefused, match=r"directives don.t match any configuration option: .*https-proxy"):
            dockerd(r.stdout)


# --- client-config iptables: idempotent, IPv4 and IPv6, removable ----------------------------------------------


def nat_rules(ns: str) -> dict[str, list[str]]:
    out = {}
    for tool in ("iptables-save", "ip6tables-save"):
        text = in_ns(ns, [tool, "-t", "nat"]).stdout
        out[tool] = sorted(l for l in text.splitlines() if l.startswith(("-A", ":REGCACHE")))
    return out


def test_iptables_script_is_idempotent_covers_ipv6_and_comes_out_again(netns):
    script = client_config("iptables", "--user", "nobody", "--iface", "eth7").stdout
    for _ in range(2):  # the second run (a reboot script, a re-run by hand) adds nothing
        r = in_ns(netns, ["sh", "-c", script])
        assert r.returncode == 0, r.stderr
    expected = sorted([
        ":REGCACHE - [0:0]",
        "-A OUTPUT -p tcp -m tcp --dport 443 -m owner ! --uid-owner 65534 -j REGCACHE",
        "-A PREROUTING -i eth7 -p tcp -m tcp --dport 443 -j REGCACHE",
        "-A REGCACHE -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8081",
    ])
    assert nat_rules(netns) == {"iptables-save": expected, "ip6tables-save": expected}
    remove = client_config("iptables", "--user", "nobody", "--iface", "eth7", "--remove").stdout
    for _ in range(2):
        r = in_ns(netns, ["sh", "-c", remove])
        assert r.returncode == 0, r.stderr
    assert nat_rules(netns) == {"iptables-save": [], "ip6tables-save": []}


def test_iptables_script_stops_when_the_exempted_user_is_missing(netns):
    script = client_config("iptables", "--user", "no-such-regcache-user").stdout
    r = in_ns(netns, ["sh", "-c", script])
    assert r.returncode == 1 and "no user no-such-regcache-user" in r.stderr
    assert nat_rules(netns) == {"iptables-save": [], "ip6tables-save": []}


# --- the service and the pod, started as the unit file and the manifests say --------------------------------
#
# Neither systemd (PID 1 here is no systemd) nor a kubelet runs here, and this machine's Python lives
# where an unprivileged user cannot enter, so both run as root; what is checked is the command line,
# the environment and the files they are given, with the CA directory mounted read-only as the
# service (ProtectSystem=strict) and the pod (a Secret volume) see it.


def serve_read_only_ca(netns: str, argv: list[str], env: dict, ca_dir: Path, log_path: Path) -> str:
    """Start argv in netns with ca_dir read-only, wait for /healthz on :9090 and the mirror and
    proxy listeners; return the issuer of the certificate a proxy client gets for quay.io."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    log = open(log_path, "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(ca_dir), *argv],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while True:
            health = in_ns(netns, ["curl", "-sf", "--max-time", "2", "http://127.0.0.1:9090/healthz"])
            if health.stdout == "ok\n":
                break
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        listening = in_ns(netns, ["ss", "-Htln"]).stdout
        assert ":5000 " in listening and ":8080 " in listening, listening
        # a client of the proxy gets a certificate from this CA (the handshake needs no upstream)
        s = in_ns(netns, ["openssl", "s_client", "-proxy", "127.0.0.1:8080", "-connect", "quay.io:443", "-servername", "quay.io"], input="")
        return openssl_field(s.stdout[s.stdout.index("-----BEGIN CERTIFICATE"):], "issuer")
    finally:
        stop_process_group(proc, 10)
        log.close()


def test_systemd_units_command_serves_with_the_readme_files_and_a_read_only_etc(netns, tmp_path):
    from tests.unit.test_deploy_files import UNIT, unit_settings

    etc, state = tmp_path / "etc-regcache", tmp_path / "var-lib-regcache"
    state.mkdir(mode=0o700)
    # the README's steps: the CA, then the sample config
    subprocess.run([*REGCACHE, "ca", "create", "--certs", str(etc), "--organization", "Example Corp"], check=True, capture_output=True)
    shutil.copy(ROOT / "deploy" / "systemd" / "regcache.yml", etc / "regcache.yml")
    before = sorted(p.name for p in etc.iterdir())
    settings = unit_settings(UNIT.read_text().replace("/etc/regcache", str(etc)).replace("/var/lib/regcache", str(state))
                             .replace("/opt/regcache/.venv/bin/mitmdump", MITMDUMP).replace("/opt/regcache", str(ROOT)))
    argv = settings["ExecStart"][0].split()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT / "src")}
    for assignments in settings["Environment"]:
        env.update(a.split("=", 1) for a in assignments.split())
    issuer = serve_read_only_ca(netns, argv, env, etc, tmp_path / "service.log")
    assert issuer == "issuer=O=Example Corp,CN=regcache CA"
    assert sorted(p.name for p in etc.iterdir()) == before
    assert (state / "cache" / "content").is_dir()  # the cache dir is where the unit says


def test_k8s_pod_serves_with_the_ca_secret_and_the_configmap(netns, tmp_path):
    """docker/entrypoint.sh as the StatefulSet runs it (uid 10001, so no privilege drop: the
    CA volume is its confdir as is): the Secret holds exactly the files the README puts in it,
    read-only; the config is the ConfigMap's."""
    from tests.unit.test_deploy_files import k8s_documents

    docs = {d["kind"]: d for _, d in k8s_documents()}
    container = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    created = tmp_path / "workstation-certs"
    subprocess.run([*REGCACHE, "ca", "create", "--certs", str(created), "--organization", "Example Corp"], check=True, capture_output=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    readme = (ROOT / "README.md").read_text()
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem", "mitmproxy-dhparam.pem"):
        assert f"--from-file=certs/{name}" in readme
        shutil.copy(created / name, secret / name)
    config = tmp_path / "configmap"
    config.mkdir()
    (config / "regcache.yml").write_text(docs["ConfigMap"]["data"]["regcache.yml"])
    where = {mounts["ca"]: secret, mounts["config"]: config, mounts["cache"]: tmp_path / "cache", mounts["run"]: tmp_path / "run"}
    env = {"PATH": f"{Path(MITMDUMP).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src"),
           "REGCACHE_ADDON": str(ROOT / "addons" / "regcache.py"), "REGCACHE_RUNTIME": str(tmp_path / "run"), "REGCACHE_USER": "no-such-user-here"}
    for e in container["env"]:
        value = e["value"]
        for path, local in sorted(where.items(), key=lambda kv: -len(kv[0])):  # /etc/regcache-config before /etc/regcache
            if value == path or value.startswith(path + "/"):
                value = str(local) + value[len(path):]
                break
        env[e["name"]] = value
    issuer = serve_read_only_ca(netns, [str(ROOT / "docker" / "entrypoint.sh")], env, secret, tmp_path / "pod.log")
    assert issuer == "issuer=O=Example Corp,CN=regcache CA"
    assert (tmp_path / "cache" / "content").is_dir()

"""Exact configuration snippets that point a container runtime at this cache.

Each generator returns (text, hint): the text is the whole file (or shell script) to write,
valid as it stands (JSON, TOML, a systemd unit drop-in, sh); the hint says where it goes and
what to run afterwards. The CLI prints the text on stdout and the hint on stderr, so
`regcache client-config docker > /etc/docker/daemon.json` does the right thing. The one
exception is dns, which prints two files (hosts lines, daemon.json), each under a comment
naming it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass

from .config import DEFAULT_REGISTRIES

PROXY_PORT = 8080
MIRROR_PORT = 5000
FASTPATH_PORT = 5080
TRANSPARENT_PORT = 8081
KINDS = ("docker", "containerd", "podman", "systemd", "iptables", "dns")
# The DNS way in: names the nodes' hosts file (or DNS) points at the cache, and the registries
# dockerd must be told are insecure (it then takes the cache's certificate on 443 unverified,
# or falls back to plain HTTP on 80).
DNS_NAMES = ("quay.io", "gcr.io", "k8s.gcr.io", "registry-1.docker.io")
DNS_INSECURE = ("k8s.gcr.io", "quay.io", "gcr.io")

# Registries a registries.conf gets mirrors for by default: the built-in list without
# patterns and without Docker Hub's other names.
MIRRORED = tuple(r for r in DEFAULT_REGISTRIES if "*" not in r and r not in ("index.docker.io", "registry-1.docker.io"))


@dataclass
class Cache:
    host: str
    port: int | None = None  # as given in --cache HOST:PORT; overrides the listener's default
    proxy_port: int = PROXY_PORT
    mirror_port: int = MIRROR_PORT
    fastpath_port: int = FASTPATH_PORT
    transparent_port: int = TRANSPARENT_PORT

    def netloc(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    @property
    def mirror(self) -> str:
        return self.netloc(self.port or self.mirror_port)

    @property
    def proxy(self) -> str:
        return self.netloc(self.port or self.proxy_port)


def default_host() -> str:
    """This machine's name as others probably reach it (run client-config on the cache host)."""
    name = socket.getfqdn()
    return name if name and name != "localhost" else socket.gethostname()


def parse_cache(text: str | None) -> Cache:
    if not text:
        return Cache(default_host())
    text = text.strip()
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.rstrip("/")
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"--cache: no host in {text!r}")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"--cache: bad port in {text!r}")
    return Cache(host, int(port) if port else None)


def no_proxy(cache: Cache) -> str:
    # The cache host must be reached directly: the fast path's 307 redirects point at it
    # (plain HTTP on the fast-path port) and must not loop back through the proxy.
    return ",".join(dict.fromkeys([cache.host, "localhost", "127.0.0.1", "::1"]))


# daemon.json "proxies" arrived in dockerd 23.0; older daemons refuse to start with it
# ("the following directives don't match any configuration option: proxies").
DOCKER_PROXIES_SINCE = (23, 0)


def parse_docker_version(text: str) -> tuple[int, int]:
    """(major, minor) from "20.10", "24.0.7" or the whole `dockerd --version` line."""
    m = re.search(r"(?:^|[^\w.])v?(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(
            f"--docker-version: no version in {text!r} (e.g. 20.10, 24.0.7, or dockerd --version's output)"
        )
    return int(m.group(1)), int(m.group(2) or 0)


def installed_docker_version() -> tuple[int, int] | None:
    """The version of the dockerd installed on this host, if any."""
    exe = shutil.which("dockerd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
        return parse_docker_version(out)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def docker(cache: Cache, proxies: bool = True, version: tuple[int, int] | None = None) -> tuple[str, str]:
    """daemon.json for dockerd `version` (None: unknown). "proxies" only where that dockerd
    accepts it: a config the daemon refuses stops it from starting at all.

    A port in --cache is the mirror's (what registry-mirrors names); the proxy keeps its own."""
    known = version is not None and version >= DOCKER_PROXIES_SINCE
    with_proxies = proxies and known
    mirror = cache.mirror
    proxy = cache.netloc(cache.proxy_port)
    doc: dict = {"registry-mirrors": [f"http://{mirror}"]}
    if with_proxies:
        doc["proxies"] = {"https-proxy": f"http://{proxy}", "no-proxy": no_proxy(cache)}
    hint = (
        "# write to /etc/docker/daemon.json (merge with what is there), then: systemctl restart docker\n"
        f"# registry-mirrors: Docker Hub pulls go to the cache's mirror listener (plain HTTP, {mirror}).\n"
    )
    if with_proxies:
        hint += (
            f"# proxies (dockerd {version[0]}.{version[1]} >= 23): every other registry goes through the "
            "cache's HTTPS proxy\n"
            f"# ({proxy}); trust its CA: regcache ca install system (or: regcache ca install docker).\n"
        )
    elif proxies:
        why = (
            "dockerd version unknown (no dockerd here; give --docker-version, e.g. $(ssh NODE dockerd --version))"
            if version is None
            else f'dockerd {version[0]}.{version[1]} < 23 refuses daemon.json "proxies"'
        )
        hint += (
            f'# no "proxies": {why}.\n'
            f"# For every other registry use the systemd drop-in: regcache client-config systemd --cache {cache.host}\n"
        )
    return json.dumps(doc, indent=2) + "\n", hint


def containerd(cache: Cache) -> tuple[str, str]:
    text = (
        f"# /etc/containerd/certs.d/_default/hosts.toml: every registry through regcache's mirror\n"
        f"# (containerd names the registry in ?ns=<registry>; regcache routes by it)\n"
        f'[host."http://{cache.mirror}"]\n'
        f'  capabilities = ["pull", "resolve"]\n'
    )
    hint = (
        "# write to /etc/containerd/certs.d/_default/hosts.toml, and in /etc/containerd/config.toml set\n"
        '#   [plugins."io.containerd.grpc.v1.cri".registry]\n'
        '#     config_path = "/etc/containerd/certs.d"\n'
        "# then: systemctl restart containerd   (ctr: pass --hosts-dir /etc/containerd/certs.d)\n"
    )
    return text, hint


def podman(cache: Cache, registries: list[str] | None = None) -> tuple[str, str]:
    blocks = ["# /etc/containers/registries.conf.d/50-regcache.conf: pull every registry through regcache's mirror"]
    for reg in registries or MIRRORED:
        # Docker Hub is the mirror listener's own upstream; others are named by a path prefix.
        location = cache.mirror if reg == "docker.io" else f"{cache.mirror}/{reg}"
        blocks.append(
            f'[[registry]]\nprefix = "{reg}"\nlocation = "{reg}"\n\n[[registry.mirror]]\nlocation = '
            f'"{location}"\ninsecure = true\n'
        )
    hint = "# write to /etc/containers/registries.conf.d/50-regcache.conf (podman, CRI-O, skopeo, buildah read it)\n"
    return "\n".join(blocks), hint


def systemd(cache: Cache, service: str = "docker") -> tuple[str, str]:
    text = (
        f"# /etc/systemd/system/{service}.service.d/regcache-proxy.conf\n"
        "[Service]\n"
        f'Environment="HTTPS_PROXY=http://{cache.proxy}"\n'
        f'Environment="NO_PROXY={no_proxy(cache)}"\n'
    )
    hint = (
        f"# write to /etc/systemd/system/{service}.service.d/regcache-proxy.conf, trust the CA\n"
        f"# (regcache ca install system), then: systemctl daemon-reload && systemctl restart {service}\n"
    )
    return text, hint


_USER = re.compile(r"^(?:[0-9]+|[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?)$")
_IFACE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")


def _iptables_rules(port: int, user: str, iface: str | None) -> list[tuple[str, str]]:
    """(chain, rule) pairs, in the order they are added."""
    return [
        ("REGCACHE", f"-p tcp --dport 443 -j REDIRECT --to-ports {port}"),
        # containers and hosts routed through this one (docker0, cni0, a LAN interface)
        ("PREROUTING", f"{'-i ' + shlex.quote(iface) + ' ' if iface else ''}-p tcp --dport 443 -j REGCACHE"),
        # processes on this host (dockerd, containerd), except regcache itself, which must reach the real registries
        ("OUTPUT", f"-p tcp --dport 443 -m owner ! --uid-owner {shlex.quote(user)} -j REGCACHE"),
    ]


def iptables(cache: Cache, user: str = "regcache", iface: str | None = None, remove: bool = False) -> tuple[str, str]:
    """A sh script for IPv4 (iptables) and IPv6 (ip6tables, where the kernel has IPv6 NAT) that
    redirects port 443 to the transparent listener. Running it again adds nothing (-C before -A);
    remove=True prints the script that takes every rule out again."""
    if not _USER.match(user):
        raise ValueError(f"--user: {user!r} is not a user name or uid")
    if iface is not None and not _IFACE.match(iface):
        raise ValueError(f"--iface: {iface!r} is not an interface name")
    port = cache.port or cache.transparent_port
    rules = _iptables_rules(port, user, iface)
    options = (
        f"--user {shlex.quote(user)}"
        + (f" --iface {shlex.quote(iface)}" if iface else "")
        + (f" --transparent-port {port}" if port != TRANSPARENT_PORT else "")
    )
    lines = ["#!/bin/sh"]
    if remove:
        lines += [
            f"# regcache transparent mode: remove what `regcache client-config iptables {options}` added.",
            "set -u",
            "for tool in iptables ip6tables; do",
            '    if ! { command -v "$tool" >/dev/null 2>&1 && "$tool" -t nat -S >/dev/null 2>&1; }; then continue; fi',
            *[
                f'    while "$tool" -t nat -D {chain} {rule} 2>/dev/null; do :; done'
                for chain, rule in rules
                if chain != "REGCACHE"
            ],
            '    "$tool" -t nat -F REGCACHE 2>/dev/null && "$tool" -t nat -X REGCACHE 2>/dev/null',
            "done",
            "exit 0",
        ]
        hint = "# run as root on the host where regcache runs: takes out the REDIRECT rules (IPv4 and IPv6)\n"
        return "\n".join(lines) + "\n", hint
    q_user = shlex.quote(user)
    lines += [
        f"# regcache transparent mode: mitmdump --mode transparent@{port} runs on this host as user {user}.",
        "# Safe to run again: each rule is checked (-C) before it is added. Remove it all with:",
        f"#   regcache client-config iptables {options} --remove | sudo sh",
        "set -eu",
    ]
    if not user.isdigit():  # a bare uid needs no user entry: the owner match compares numbers
        lines += [
            f"if ! id -u {q_user} >/dev/null 2>&1; then",
            f'    echo "no user {user} on this host: regcache must run as the user exempted here, or its own" >&2',
            '    echo "upstream connections loop back into itself (create it, or give --user)" >&2',
            "    exit 1",
            "fi",
        ]
    lines += [
        "add() {  # add TOOL CHAIN RULE...: append the rule to the nat table unless it is there",
        "    tool=$1; shift",
        '    "$tool" -t nat -C "$@" 2>/dev/null || "$tool" -t nat -A "$@"',
        "}",
        "for tool in iptables ip6tables; do",
        '    if [ "$tool" = ip6tables ] && ! '
        '{ command -v ip6tables >/dev/null 2>&1 && ip6tables -t nat -S >/dev/null 2>&1; }; then',
        '        echo "ip6tables: no IPv6 NAT on this host; IPv6 connections to port 443 are not redirected" >&2',
        "        continue",
        "    fi",
        '    "$tool" -t nat -N REGCACHE 2>/dev/null || true',
        *[f'    add "$tool" {chain} {rule}' for chain, rule in rules],
        "done",
    ]
    hint = (
        "# run as root on the host where regcache runs (IPv4 and IPv6); running it again adds nothing.\n"
        f"# undo: regcache client-config iptables {options} --remove | sudo sh\n"
        "# clients must trust regcache's CA (regcache ca install system). docker/entrypoint-transparent.sh "
        "does all this.\n"
    )
    return "\n".join(lines) + "\n", hint


def dns(cache: Cache) -> tuple[str, str]:
    """The DNS way in: registries' names resolve to the cache, which listens on 80 and 443."""
    try:
        ipaddress.ip_address(cache.host)
    except ValueError:
        raise ValueError(
            f"dns: --cache must be the cache's IP address (a hosts file maps names to addresses), not {cache.host!r}"
        ) from None
    hosts = "".join(f"{cache.host}\t{name}\n" for name in DNS_NAMES)
    mirror = cache.netloc(cache.port) if cache.port else (f"[{cache.host}]" if ":" in cache.host else cache.host)
    doc = {"mtu": 1350, "registry-mirrors": [f"http://{mirror}"], "insecure-registries": list(DNS_INSECURE)}
    text = "# /etc/hosts on every node (or the same names in its DNS):\n" + hosts
    text += "\n# /etc/docker/daemon.json:\n" + json.dumps(doc, indent=2) + "\n"
    hint = (
        "# the cache must listen on port 80 (plain) and 443 (TLS) as a mirror, e.g.\n"
        "#   --mode reverse:https://registry-1.docker.io@80 --mode reverse:https://registry-1.docker.io@443\n"
        "# and resolve the registries to their real addresses itself (its own /etc/hosts must not have these lines).\n"
        "# dockerd: Docker Hub through registry-mirrors (port 80); the insecure registries over TLS on 443 with\n"
        "# the cache's certificate unverified, or plain HTTP on 80. Restart dockerd after writing daemon.json.\n"
        "# Other runtimes reaching registry-1.docker.io on 443 must trust the cache's CA\n"
        "# (regcache ca install system).\n"
    )
    return text, hint

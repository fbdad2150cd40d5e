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
import socket
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
            text = text[len(prefix):]
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


def docker(cache: Cache, proxies: bool = True) -> tuple[str, str]:
    doc: dict = {"registry-mirrors": [f"http://{cache.mirror}"]}
    if proxies:
        doc["proxies"] = {"https-proxy": f"http://{cache.proxy}", "no-proxy": no_proxy(cache)}
    hint = (
        "# write to /etc/docker/daemon.json (merge with what is there), then: systemctl restart docker\n"
        "# registry-mirrors: Docker Hub pulls go to the cache's mirror listener (plain HTTP).\n"
    )
    if proxies:
        hint += (
            "# proxies (dockerd >= 23): every other registry goes through the cache's HTTPS proxy;\n"
            "# trust its CA: regcache ca install system (or: regcache ca install docker).\n"
            "# dockerd < 23 rejects \"proxies\": use --no-proxies and `regcache client-config systemd` instead.\n"
        )
    return json.dumps(doc, indent=2) + "\n", hint


def containerd(cache: Cache) -> tuple[str, str]:
    text = (
        f'# /etc/containerd/certs.d/_default/hosts.toml: every registry through regcache\'s mirror\n'
        f'# (containerd names the registry in ?ns=<registry>; regcache routes by it)\n'
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
        blocks.append(f'[[registry]]\nprefix = "{reg}"\nlocation = "{reg}"\n\n[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n')
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


def iptables(cache: Cache, user: str = "regcache", iface: str | None = None) -> tuple[str, str]:
    port = cache.port or cache.transparent_port
    lines = [
        "#!/bin/sh",
        f"# regcache transparent mode: mitmdump --mode transparent@{port} runs on this host as user {user!r}.",
        "set -e",
        "iptables -t nat -N REGCACHE 2>/dev/null || iptables -t nat -F REGCACHE",
        f"iptables -t nat -A REGCACHE -p tcp --dport 443 -j REDIRECT --to-ports {port}",
        "# containers and hosts routed through this one (e.g. docker0, cni0, a LAN interface):",
        f"iptables -t nat -A PREROUTING {'-i ' + iface + ' ' if iface else ''}-p tcp --dport 443 -j REGCACHE",
        "# processes on this host (dockerd, containerd), except regcache itself, which must reach the real registries:",
        f"iptables -t nat -A OUTPUT -p tcp --dport 443 -m owner ! --uid-owner {user} -j REGCACHE",
    ]
    hint = (
        "# run as root on the host where regcache runs; undo with:\n"
        f"#   iptables -t nat -D PREROUTING {'-i ' + iface + ' ' if iface else ''}-p tcp --dport 443 -j REGCACHE\n"
        f"#   iptables -t nat -D OUTPUT -p tcp --dport 443 -m owner ! --uid-owner {user} -j REGCACHE\n"
        "#   iptables -t nat -F REGCACHE && iptables -t nat -X REGCACHE\n"
        "# clients must trust regcache's CA (regcache ca install system). docker/entrypoint-transparent.sh does all this.\n"
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

"""`regcache client-config` (every snippet parses as what the client reads) and `regcache ca`
(created by mitmproxy's own code, key 0600, never printed, installed where clients look)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import tomllib

import pytest

from regcachelib import cacerts, clientconfig

from .test_cli_inventory import run_cli


def systemd_environment(text: str) -> dict[str, str]:
    """The environment a systemd drop-in sets (Environment= lines, systemd's quoting)."""
    env = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        assert section == "[Service]" and key == "Environment", line
        for assignment in shlex.split(value):
            k, _, v = assignment.partition("=")
            env[k] = v
    return env


def test_docker_daemon_json(capsys):
    code, out, err = run_cli(capsys, "client-config", "docker", "--cache", "cache.example.net", "--docker-version", "24.0.7")
    assert code == 0
    doc = json.loads(out)
    assert doc["registry-mirrors"] == ["http://cache.example.net:5000"]
    assert doc["proxies"]["https-proxy"] == "http://cache.example.net:8080"
    assert "cache.example.net" in doc["proxies"]["no-proxy"].split(",")
    assert "/etc/docker/daemon.json" in err
    code, out, _ = run_cli(capsys, "client-config", "docker", "--cache", "10.0.0.5:5001", "--no-proxies")
    assert json.loads(out) == {"registry-mirrors": ["http://10.0.0.5:5001"]}


@pytest.mark.parametrize("version, proxies", [
    ("20.10", False), ("Docker version 20.10.24+dfsg1, build 5d6db84", False), ("22.06.0-beta", False),
    ("23.0", True), ("Docker version 28.2.2, build e6534b4", True),
])
def test_docker_proxies_only_for_a_dockerd_that_accepts_them(capsys, version, proxies):
    code, out, err = run_cli(capsys, "client-config", "docker", "--cache", "cache", "--docker-version", version)
    assert code == 0 and ("proxies" in json.loads(out)) == proxies
    if not proxies:
        assert "< 23" in err and "client-config systemd" in err


def test_docker_version_unknown_prints_no_proxies(capsys, monkeypatch):
    monkeypatch.setattr(clientconfig.shutil, "which", lambda name: None)  # no dockerd on this host
    code, out, err = run_cli(capsys, "client-config", "docker", "--cache", "cache")
    assert code == 0 and json.loads(out) == {"registry-mirrors": ["http://cache:5000"]}
    assert "version unknown" in err and "--docker-version" in err
    code, _, err = run_cli(capsys, "client-config", "docker", "--docker-version", "latest")
    assert code == 2 and "no version in 'latest'" in err


def test_docker_cache_port_is_the_mirrors_and_the_proxy_keeps_its_own(capsys):
    _, out, _ = run_cli(capsys, "client-config", "docker", "--cache", "cache:5001", "--docker-version", "24", "--proxy-port", "3128")
    doc = json.loads(out)
    assert doc["registry-mirrors"] == ["http://cache:5001"] and doc["proxies"]["https-proxy"] == "http://cache:3128"


def test_containerd_hosts_toml(capsys):
    code, out, err = run_cli(capsys, "client-config", "containerd", "--cache", "10.0.0.5")
    doc = tomllib.loads(out)
    assert doc == {"host": {"http://10.0.0.5:5000": {"capabilities": ["pull", "resolve"]}}}
    assert "config_path" in err


def test_podman_registries_conf(capsys):
    code, out, err = run_cli(capsys, "client-config", "podman", "--cache", "cache:5000")
    doc = tomllib.loads(out)
    by_prefix = {r["prefix"]: r for r in doc["registry"]}
    assert by_prefix["docker.io"]["mirror"] == [{"location": "cache:5000", "insecure": True}]
    assert by_prefix["quay.io"]["mirror"] == [{"location": "cache:5000/quay.io", "insecure": True}]
    assert by_prefix["registry.k8s.io"]["location"] == "registry.k8s.io"
    assert not any("*" in p for p in by_prefix)
    _, out, _ = run_cli(capsys, "client-config", "podman", "--cache", "cache", "--registry", "ghcr.io", "--mirror-port", "5555")
    assert [r["prefix"] for r in tomllib.loads(out)["registry"]] == ["ghcr.io"]
    assert tomllib.loads(out)["registry"][0]["mirror"][0]["location"] == "cache:5555/ghcr.io"


def test_systemd_drop_in_never_proxies_the_cache_itself(capsys):
    code, out, err = run_cli(capsys, "client-config", "systemd", "--cache", "cache.lan", "--service", "containerd")
    env = systemd_environment(out)
    assert env["HTTPS_PROXY"] == "http://cache.lan:8080"
    assert {"cache.lan", "localhost", "127.0.0.1"} <= set(env["NO_PROXY"].split(","))
    assert "containerd.service.d" in out and "daemon-reload" in err


def test_iptables_script_exempts_the_owner(capsys):
    code, out, _ = run_cli(capsys, "client-config", "iptables", "--user", "999", "--iface", "docker0")
    assert 'add "$tool" OUTPUT -p tcp --dport 443 -m owner ! --uid-owner 999 -j REGCACHE' in out
    assert 'add "$tool" PREROUTING -i docker0 -p tcp --dport 443 -j REGCACHE' in out
    assert "REDIRECT --to-ports 8081" in out and out.startswith("#!/bin/sh")
    assert "id -u" not in out  # a bare uid needs no user entry
    _, out, _ = run_cli(capsys, "client-config", "iptables", "--user", "regcache")
    assert "if ! id -u regcache" in out and "ip6tables" in out and "--remove | sudo sh" in out


@pytest.mark.parametrize("option", [["--user", "x; rm -rf /"], ["--iface", "eth0 -j ACCEPT"], ["--user", "$(id)"]])
def test_iptables_refuses_what_would_be_shell(capsys, option):
    code, out, err = run_cli(capsys, "client-config", "iptables", *option)
    assert code == 2 and out == "" and "is not" in err


@pytest.mark.parametrize("text,host,port", [
    ("cache", "cache", None), ("cache:5001", "cache", 5001), ("http://cache:5001/", "cache", 5001),
    ("[fd00::1]:5000", "fd00::1", 5000), ("fd00::1", "fd00::1", None), ("10.0.0.1", "10.0.0.1", None),
])
def test_parse_cache(text, host, port):
    c = clientconfig.parse_cache(text)
    assert (c.host, c.port) == (host, port)


def test_ipv6_cache_address_is_bracketed(capsys):
    _, out, _ = run_cli(capsys, "client-config", "docker", "--cache", "[fd00::1]")
    assert json.loads(out)["registry-mirrors"] == ["http://[fd00::1]:5000"]


def test_bad_cache_address(capsys):
    code, _, err = run_cli(capsys, "client-config", "docker", "--cache", "host:99999")
    assert code == 2 and "bad port" in err


def dns_files(out: str) -> tuple[list[tuple[str, str]], dict]:
    """The two files `client-config dns` prints: (hosts entries, daemon.json)."""
    hosts_part, _, json_part = out.partition("# /etc/docker/daemon.json:\n")
    entries = [tuple(line.split()) for line in hosts_part.splitlines() if line.strip() and not line.startswith("#")]
    return entries, json.loads(json_part)


def test_dns_way_in_hosts_lines_and_daemon_json(capsys):
    code, out, err = run_cli(capsys, "client-config", "dns", "--cache", "10.0.0.5")
    assert code == 0
    entries, doc = dns_files(out)
    assert entries == [("10.0.0.5", n) for n in ("quay.io", "gcr.io", "k8s.gcr.io", "registry-1.docker.io")]
    insecure = ["k8s.gcr.io", "quay.io", "gcr.io"]
    assert doc == {"mtu": 1350, "registry-mirrors": ["http://10.0.0.5"], "insecure-registries": insecure}
    assert "@443" in err and "@80" in err
    code, _, err = run_cli(capsys, "client-config", "dns", "--cache", "cache.example.net")
    assert code == 2 and "IP address" in err


# --- ca ---------------------------------------------------------------------------------------------


def test_ca_create_show_install(tmp_path, capsys):
    certs = tmp_path / "certs"
    code, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "create")
    assert code == 0 and out.startswith("created")
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem", "mitmproxy-ca.p12", "mitmproxy-ca-cert.cer", "mitmproxy-dhparam.pem"):
        assert (certs / name).exists(), name
    assert stat.S_IMODE(os.stat(certs / "mitmproxy-ca.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(certs / "mitmproxy-ca.p12").st_mode) == 0o600
    key_pem = (certs / "mitmproxy-ca.pem").read_text()
    assert "PRIVATE KEY" in key_pem
    first = (certs / "mitmproxy-ca-cert.pem").read_bytes()
    # again: kept, not replaced
    code, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "create")
    assert out.startswith("already there") and (certs / "mitmproxy-ca-cert.pem").read_bytes() == first

    code, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "show")
    assert code == 0 and "O=regcache,CN=regcache CA" in out and "sha256" in out and "BEGIN CERTIFICATE" in out
    assert "mitmproxy" not in out.split("BEGIN CERTIFICATE")[0].replace(str(certs / "mitmproxy-ca-cert.pem"), "")
    assert "PRIVATE KEY" not in out and key_pem.splitlines()[1] not in out
    _, pem, _ = run_cli(capsys, "ca", "show", "--certs", str(certs), "--pem")
    assert pem == first.decode()
    os.chmod(certs / "mitmproxy-ca.pem", 0o644)
    _, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "show")
    assert "WARNING" in out and "chmod 600" in out
    os.chmod(certs / "mitmproxy-ca.pem", 0o600)

    root = tmp_path / "root"
    code, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "install", "system", "--root", str(root), "--no-update")
    assert code == 0 and (root / "usr/local/share/ca-certificates/regcache-ca.crt").read_bytes() == first
    code, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "install", "docker", "--root", str(root), "--host", "quay.io", "--host", "cache:5000")
    assert (root / "etc/docker/certs.d/quay.io/ca.crt").read_bytes() == first
    assert (root / "etc/docker/certs.d/cache:5000/ca.crt").read_bytes() == first
    code, out, _ = run_cli(capsys, "ca", "--certs", str(certs), "install", "docker", "--root", str(root))
    assert (root / "etc/docker/certs.d/registry-1.docker.io/ca.crt").exists() and (root / "etc/docker/certs.d/ghcr.io/ca.crt").exists()
    code, out, err = run_cli(capsys, "ca", "--certs", str(certs), "install", "containerd", "--root", str(root))
    assert 'ca = "/etc/containerd/certs.d/regcache-ca.crt"' in out
    assert tomllib.loads(out.splitlines()[-1])["ca"] == "/etc/containerd/certs.d/regcache-ca.crt"
    assert (root / "etc/containerd/certs.d/regcache-ca.crt").read_bytes() == first
    for p in root.rglob("*.crt"):
        assert "PRIVATE KEY" not in p.read_text()


def test_ca_created_is_what_mitmproxy_loads(tmp_path):
    from mitmproxy.certs import CertStore

    created, cert = cacerts.create(str(tmp_path / "c"))
    assert created
    store = CertStore.from_store(tmp_path / "c", "mitmproxy", 2048)
    leaf = store.get_cert("quay.io", [])
    assert leaf.cert.issuer == store.default_ca.issuer


def test_ca_create_names_the_operators_organisation_and_keeps_an_existing_ca(tmp_path, capsys):
    certs = tmp_path / "certs"
    code, out, _ = run_cli(capsys, "ca", "create", "--certs", str(certs), "--organization", "Example Corp")
    assert code == 0 and "subject O=Example Corp,CN=regcache CA" in out
    assert cacerts.info(str(certs)).issuer == "O=Example Corp,CN=regcache CA"
    first = (certs / "mitmproxy-ca-cert.pem").read_bytes()
    code, out, err = run_cli(capsys, "ca", "create", "--certs", str(certs), "--organization", "Other")
    assert code == 0 and out.startswith("already there") and "O=Example Corp" in out and "kept" in err
    assert (certs / "mitmproxy-ca-cert.pem").read_bytes() == first
    code, _, err = run_cli(capsys, "ca", "create", "--certs", str(tmp_path / "x"), "--organization", "a\nb")
    assert code == 2 and "one line" in err and not (tmp_path / "x" / "mitmproxy-ca.pem").exists()


def test_ca_show_without_a_ca(tmp_path, capsys):
    code, _, err = run_cli(capsys, "ca", "--certs", str(tmp_path / "none"), "show")
    assert code == 2 and "regcache ca create" in err

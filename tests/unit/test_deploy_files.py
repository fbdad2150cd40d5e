"""The operator-facing deployment files, checked by the tools that will read them: the systemd
unit by systemd-analyze, the Kubernetes manifests by a schema validator, .dockerignore by the
matching rules Docker applies."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from regcachelib.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "regcache.service"
VENV_BIN = Path(sys.executable).parent


# --- systemd --------------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> values of a unit file (continuation lines joined, comments dropped)."""
    settings: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def installed_unit(tmp_path):
    """The unit as installed by the README, with /opt/regcache pointing at this checkout's venv:
    systemd-analyze checks that ExecStart names an executable."""
    prefix = tmp_path / "opt-regcache"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / ".venv" / "bin" / "mitmdump").symlink_to(VENV_BIN / "mitmdump")
    unit = tmp_path / "regcache.service"
    unit.write_text(UNIT.read_text().replace("/opt/regcache", str(prefix)))
    return unit


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd; ./test.sh does)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies_without_a_warning(installed_unit):
    # systemd-analyze verify exits 0 on unknown keys and only warns: any output is a mistake
    p = systemd_analyze("verify", str(installed_unit))
    assert p.returncode == 0 and p.stderr.strip() == "" and p.stdout.strip() == "", p.stderr + p.stdout


def test_systemd_verify_catches_a_misspelt_setting(installed_unit):
    # the check above can fail: a typo in a hardening option is reported
    installed_unit.write_text(installed_unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    p = systemd_analyze("verify", str(installed_unit))
    assert "Unknown key" in p.stderr


def test_systemd_unit_is_sandboxed(installed_unit):
    # systemd's own exposure score (0 = fully sandboxed, 10 = not at all); 2.0 is well inside "OK"
    p = systemd_analyze("security", "--offline=true", "--threshold=20", str(installed_unit))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    assert re.search(r"Overall exposure level for regcache.service: [01]\.\d OK", p.stdout), p.stdout[-500:]


def test_systemd_unit_runs_as_regcache_with_state_and_ca_where_the_readme_says():
    settings = unit_settings(UNIT.read_text())
    assert settings["User"] == ["regcache"] and settings["StateDirectory"] == ["regcache"]
    exec_start = settings["ExecStart"][0].split()
    assert exec_start[:3] == ["/opt/regcache/.venv/bin/mitmdump", "-s", "/opt/regcache/addons/regcache.py"]
    sets = dict(exec_start[i + 1].split("=", 1) for i, a in enumerate(exec_start) if a == "--set")
    assert sets["confdir"] == "/etc/regcache"
    assert sets["regcache_dir"].startswith("/var/lib/regcache/")
    # the service may write its state and nothing else
    assert settings["ProtectSystem"] == ["strict"] and settings["ReadWritePaths"] == ["/var/lib/regcache"]
    for option in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert settings[option] == ["yes"], option
    # the README installs the sample config where ExecStart reads it, and it is valid
    readme = (ROOT / "README.md").read_text()
    assert "deploy/systemd/regcache.yml /etc/regcache/regcache.yml" in readme
    assert sets["regcache_config"] == "/etc/regcache/regcache.yml"
    load_config(str(SYSTEMD / "regcache.yml"))


# --- Kubernetes ---------------------------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"


def k8s_documents() -> list[tuple[str, dict]]:
    import yaml

    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_pass_strict_schema_validation():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' installs kubernetes-validate")
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ConfigMap", "StatefulSet", "Service", "DaemonSet"}
    for name, doc in docs:
        # strict: an unknown or misplaced field fails, as `kubectl apply --validate=strict` would
        kv.validate(doc, kv.latest_version(), strict=True)


def test_k8s_schema_validation_can_fail():
    kv = pytest.importorskip("kubernetes_validate")
    (name, sts), = [(n, d) for n, d in k8s_documents() if d["kind"] == "StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, kv.latest_version(), strict=True)


def test_k8s_manifests_fit_together():
    import yaml

    from regcachelib import cli
    from regcachelib.config import parse_config

    docs = {d["kind"]: d for _, d in k8s_documents()}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    sts, svc, ds, cm = docs["StatefulSet"], docs["Service"], docs["DaemonSet"], docs["ConfigMap"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the cache dir is the persistent volume; the CA the secret the README creates; the config the ConfigMap
    assert mounts["cache"] == env["REGCACHE_DIR"]
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["cache"]
    assert mounts["ca"] == env["REGCACHE_CERTS"] and volumes["ca"]["secret"]["secretName"] == "regcache-ca"
    assert "kubectl -n regcache create secret generic regcache-ca" in (ROOT / "README.md").read_text()
    assert env["REGCACHE_CONFIG"] == mounts["config"] + "/regcache.yml"
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    parse_config(cm["data"]["regcache.yml"], "configmap.yaml")
    # every Service port reaches a named container port; mirror and proxy are there
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"] for p in svc["spec"]["ports"]} >= {"mirror", "proxy"}
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in container_ports
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # the DaemonSet resolves the Service by its cluster DNS name and calls a real regcache command
    script = ds["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert f'{svc["metadata"]["name"]}.{svc["metadata"]["namespace"]}.svc.cluster.local' in script
    (line,) = [l.strip() for l in script.splitlines() if l.strip().startswith("regcache ")]
    argv = line.split(">")[0].split()[1:]
    args = cli.build_parser().parse_args([a.replace('"$ip"', "10.0.0.1") for a in argv])
    assert args.kind == "containerd"

"""The CA clients trust for intercepted registries, in mitmproxy's confdir format.

    certs/mitmproxy-ca.pem        private key + certificate (mode 0600; never leaves the host)
    certs/mitmproxy-ca-cert.pem   the certificate alone: what clients install
    (+ mitmproxy's .p12/.cer/dhparam companions)

mitmdump --set confdir=certs/ uses it as is; it is created with mitmproxy's own code, so the
files are what mitmproxy would have written on its first start, except for the name: clients
see "regcache CA" and the operator's organisation in their trust store, not "mitmproxy". The
file names stay mitmproxy's (the confdir basename), or mitmproxy would not load them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BASENAME = "mitmproxy"
KEY_SIZE = 2048  # mitmproxy's default key_size
SECRET_FILES = (f"{BASENAME}-ca.pem", f"{BASENAME}-ca.p12")
CERT_FILE = f"{BASENAME}-ca-cert.pem"
KEY_FILE = f"{BASENAME}-ca.pem"
CA_COMMON_NAME = "regcache CA"
DEFAULT_ORGANIZATION = "regcache"

SYSTEM_ANCHORS = "/usr/local/share/ca-certificates"
SYSTEM_NAME = "regcache-ca.crt"
DOCKER_CERTS_D = "/etc/docker/certs.d"
CONTAINERD_CERTS_D = "/etc/containerd/certs.d"


class CAError(Exception):
    pass


@dataclass
class CAInfo:
    cert_path: str
    subject: str
    issuer: str
    not_before: str
    not_after: str
    sha256: str
    pem: str


def create(certs_dir: str, organization: str | None = None) -> tuple[bool, str]:
    """Create the CA unless it exists; (created?, path of the certificate). Key files 0600.

    An existing CA is kept whatever organization says: clients already trust it."""
    from mitmproxy.certs import CertStore

    organization = organization or DEFAULT_ORGANIZATION
    if not organization.strip() or any(c in organization for c in "\r\n\0"):
        raise CAError(f"organization {organization!r}: give a name on one line")
    path = Path(certs_dir)
    existed = (path / KEY_FILE).exists()
    path.mkdir(parents=True, exist_ok=True)
    if not existed:
        CertStore.create_store(path, BASENAME, KEY_SIZE, organization=organization, cn=CA_COMMON_NAME)
    CertStore.from_store(path, BASENAME, KEY_SIZE)  # loads it as mitmdump will, and writes the dhparam file
    for name in SECRET_FILES:
        p = path / name
        if p.exists():
            os.chmod(p, 0o600)
    return not existed, str(path / CERT_FILE)


def cert_path(certs_dir: str) -> str:
    p = os.path.join(certs_dir, CERT_FILE)
    if not os.path.exists(p):
        raise CAError(
            f"no CA in {certs_dir} (create it: regcache ca create --certs {certs_dir}; mitmdump also creates "
            "it on first start)"
        )
    return p


def info(certs_dir: str) -> CAInfo:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    p = cert_path(certs_dir)
    pem = Path(p).read_text()
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        nb, na = cert.not_valid_before, cert.not_valid_after
    fp = cert.fingerprint(hashes.SHA256()).hex().upper()
    return CAInfo(
        p,
        cert.subject.rfc4514_string(),
        cert.issuer.rfc4514_string(),
        nb.isoformat(),
        na.isoformat(),
        ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)),
        pem,
    )


def key_mode_problem(certs_dir: str) -> str | None:
    key = os.path.join(certs_dir, KEY_FILE)
    if not os.path.exists(key):
        return None
    mode = os.stat(key).st_mode & 0o777
    if mode & 0o077:
        return f"{key} is mode {mode:o}: readable by others; fix with chmod 600 {key}"
    return None


def _root(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root and root != "/" else path


def install_system(certs_dir: str, root: str = "/", update: bool = True) -> list[str]:
    """Debian/Ubuntu system trust: /usr/local/share/ca-certificates + update-ca-certificates."""
    src = cert_path(certs_dir)
    dest = _root(root, os.path.join(SYSTEM_ANCHORS, SYSTEM_NAME))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o644)
    done = [dest]
    if update:
        exe = shutil.which("update-ca-certificates")
        if exe is None:
            raise CAError(
                f"copied to {dest}, but update-ca-certificates is not installed (on RHEL-likes: copy to "
                "/etc/pki/ca-trust/source/anchors/ and run update-ca-trust)"
            )
        r = subprocess.run([exe], capture_output=True, text=True)
        if r.returncode != 0:
            raise CAError(f"update-ca-certificates failed: {r.stderr.strip() or r.stdout.strip()}")
        done.append("update-ca-certificates")
    return done


def install_docker(certs_dir: str, hosts: list[str], root: str = "/") -> list[str]:
    """dockerd's per-registry trust: /etc/docker/certs.d/<host>/ca.crt (no restart needed)."""
    src = cert_path(certs_dir)
    done = []
    for host in hosts:
        dest = _root(root, os.path.join(DOCKER_CERTS_D, host, "ca.crt"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o644)
        done.append(dest)
    return done


def install_containerd(certs_dir: str, root: str = "/") -> tuple[str, str]:
    """Copy the certificate next to containerd's hosts.toml files; return (path, the ca= line)."""
    src = cert_path(certs_dir)
    path = os.path.join(CONTAINERD_CERTS_D, SYSTEM_NAME)
    dest = _root(root, path)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o644)
    return dest, f'ca = "{path}"'

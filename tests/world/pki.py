"""Test PKI for the world: a CA, TLS leaf certificates per host, a CA bundle.

Everything is made with ``cryptography``; no openssl CLI needed.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # create with the final mode from the start: the key is never world-readable
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def libtrust_key_id(public_key) -> str:
    """Key ID as docker/libtrust computes it (what distribution expects in ``kid``).

    base32(sha256(DER SubjectPublicKeyInfo)[:30]) without padding, in groups of
    four characters joined by ':'.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i : i + 4] for i in range(0, len(s), 4))


@dataclass
class Leaf:
    names: list[str]
    cert_path: Path
    key_path: Path


@dataclass
class PKI:
    """A test CA plus leaf certificates under ``directory``."""

    directory: Path
    ca_cert_path: Path = field(init=False)
    ca_key_path: Path = field(init=False)
    ca_bundle_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.ca_cert_path = self.directory / "ca.crt"
        self.ca_key_path = self.directory / "ca.key"
        self.ca_bundle_path = self.directory / "ca-bundle.crt"
        self._ca_key = None
        self._ca_cert = None

    # -- CA ---------------------------------------------------------------
    def create_ca(self, common_name: str = "regcache test world CA") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "regcache tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write(self.ca_key_path, _key_pem(key), 0o600)
        _write(self.ca_cert_path, _cert_pem(cert))
        self._ca_key, self._ca_cert = key, cert
        self.write_bundle()

    def load_ca(self) -> None:
        self._ca_key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        self._ca_cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    def write_bundle(self) -> None:
        """ca_bundle = system roots + the test CA (for SSL_CERT_FILE)."""
        system = b""
        if os.path.exists(SYSTEM_CA_BUNDLE):
            system = Path(SYSTEM_CA_BUNDLE).read_bytes()
            if system and not system.endswith(b"\n"):
                system += b"\n"
        _write(self.ca_bundle_path, system + self.ca_cert_path.read_bytes())

    # -- leaves -----------------------------------------------------------
    def issue(
        self,
        names: list[str],
        ips: list[str] = (),
        basename: str | None = None,
        days: int = 365,
    ) -> Leaf:
        """Issue a TLS server certificate for ``names`` (first is the CN)."""
        if self._ca_key is None:
            self.load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        base = basename or names[0]
        cert_path = self.directory / f"{base}.crt"
        key_path = self.directory / f"{base}.key"
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, _cert_pem(cert))
        return Leaf(list(names), cert_path, key_path)

    def make_cert_dir(self, path: str | os.PathLike) -> Path:
        """A directory holding ``ca.crt`` (for skopeo/podman ``--*-cert-dir``,
        containerd ``certs.d/<host>/ca.crt`` or docker ``certs.d``)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        _write(p / "ca.crt", self.ca_cert_path.read_bytes())
        return p


def make_token_signing_key(directory: Path, issuer: str) -> tuple[Path, Path, str]:
    """RSA key + self-signed cert for the token service.

    Returns (key_path, cert_path, kid).  The cert is what distribution's
    ``auth.token.rootcertbundle`` points at.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = _dt.datetime.now(_dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_path = Path(directory) / "token-signing.key"
    cert_path = Path(directory) / "token-signing.crt"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert))
    return key_path, cert_path, libtrust_key_id(key.public_key())

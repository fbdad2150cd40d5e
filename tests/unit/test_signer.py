"""blobserver.Signer: short-lived HMAC URLs of the fast path."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from regcachelib.blobserver import FASTPATH_PREFIX, Signer

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
NOW = 1_700_000_000.0


def parts(url: str) -> tuple[str, int, str]:
    u = urlsplit(url)
    q = parse_qs(u.query)
    return u.path, int(q["exp"][0]), q["sig"][0]


def test_valid_url_is_accepted():
    signer = Signer(b"k" * 32, ttl=300)
    url = signer.sign(DIGEST, now=NOW)
    assert url.startswith(FASTPATH_PREFIX + DIGEST + "?")
    assert signer.check(url, now=NOW) == DIGEST
    assert signer.check(url, now=NOW + 299) == DIGEST
    # absolute-form request targets carry the same URL
    assert signer.check("http://10.0.0.1:5080" + url, now=NOW) == DIGEST


def test_forged_signature_is_rejected():
    signer = Signer(b"k" * 32)
    path, exp, sig = parts(signer.sign(DIGEST, now=NOW))
    forged = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert signer.check(f"{path}?exp={exp}&sig={forged}", now=NOW) is None
    assert signer.check(f"{path}?exp={exp}&sig=", now=NOW) is None
    assert signer.check(f"{path}?exp={exp}", now=NOW) is None
    assert signer.check(f"{path}?sig={sig}", now=NOW) is None
    assert signer.check(path, now=NOW) is None


def test_url_of_another_key_is_rejected():
    url = Signer(b"a" * 32).sign(DIGEST, now=NOW)
    assert Signer(b"b" * 32).check(url, now=NOW) is None


def test_altered_digest_is_rejected():
    signer = Signer(b"k" * 32)
    _, exp, sig = parts(signer.sign(DIGEST, now=NOW))
    assert signer.check(f"{FASTPATH_PREFIX}{OTHER}?exp={exp}&sig={sig}", now=NOW) is None


def test_extended_expiry_is_rejected():
    signer = Signer(b"k" * 32)
    path, exp, sig = parts(signer.sign(DIGEST, now=NOW))
    assert signer.check(f"{path}?exp={exp + 3600}&sig={sig}", now=NOW) is None
    assert signer.check(f"{path}?exp=never&sig={sig}", now=NOW) is None


def test_expired_url_is_rejected():
    signer = Signer(b"k" * 32, ttl=60)
    url = signer.sign(DIGEST, now=NOW)
    assert signer.check(url, now=NOW + 61) is None


def test_other_paths_are_rejected():
    signer = Signer(b"k" * 32)
    _, exp, sig = parts(signer.sign(DIGEST, now=NOW))
    assert signer.check(f"/v2/library/alpine/blobs/{DIGEST}?exp={exp}&sig={sig}", now=NOW) is None


def test_non_ascii_signature_is_rejected_not_raised():
    signer = Signer(b"k" * 32)
    path, exp, _ = parts(signer.sign(DIGEST, now=NOW))
    assert signer.check(f"{path}?exp={exp}&sig=%C3%A9", now=NOW) is None

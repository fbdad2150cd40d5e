"""blobserver.Signer: short-lived HMAC URLs of the fast path."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import logging

import pytest

from regcachelib.blobserver import FASTPATH_PREFIX, FASTPATH_URL_TTL, SENT_BACK_TTL, LogThrottle, Signer

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
NOW = 1_700_000_000.0
CLIENT = "10.0.0.2"


def parts(url: str) -> tuple[str, int, str]:
    u = urlsplit(url)
    q = parse_qs(u.query)
    return u.path, int(q["exp"][0]), q["sig"][0]


def test_valid_url_is_accepted():
    signer = Signer(b"k" * 32, ttl=300)
    url = signer.sign(DIGEST, CLIENT, now=NOW)
    assert url.startswith(FASTPATH_PREFIX + DIGEST + "?")
    assert signer.check(url, CLIENT, now=NOW) == DIGEST
    assert signer.check(url, CLIENT, now=NOW + 299) == DIGEST
    # absolute-form request targets carry the same URL
    assert signer.check("http://10.0.0.1:5080" + url, CLIENT, now=NOW) == DIGEST


def forged(sig: str) -> str:
    return ("0" if sig[0] != "0" else "1") + sig[1:]


# Each case rewrites a URL signed for DIGEST and CLIENT at NOW (its path, exp and sig) into one
# the signer must refuse.
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda path, exp, sig: f"{path}?exp={exp}&sig={forged(sig)}", id="forged-signature"),
        pytest.param(lambda path, exp, sig: f"{path}?exp={exp}&sig=", id="empty-signature"),
        pytest.param(lambda path, exp, sig: f"{path}?exp={exp}", id="no-signature"),
        pytest.param(lambda path, exp, sig: f"{path}?sig={sig}", id="no-expiry"),
        pytest.param(lambda path, exp, sig: path, id="no-query"),
        pytest.param(lambda path, exp, sig: f"{FASTPATH_PREFIX}{OTHER}?exp={exp}&sig={sig}", id="altered-digest"),
        pytest.param(lambda path, exp, sig: f"{path}?exp={exp + 3600}&sig={sig}", id="extended-expiry"),
        pytest.param(lambda path, exp, sig: f"{path}?exp=never&sig={sig}", id="non-numeric-expiry"),
        pytest.param(lambda path, exp, sig: f"/v2/library/alpine/blobs/{DIGEST}?exp={exp}&sig={sig}", id="other-path"),
        pytest.param(lambda path, exp, sig: f"{path}?exp={exp}&sig=%C3%A9", id="non-ascii-signature"),  # refused, not raised
    ],
)
def test_tampered_url_is_rejected(tamper):
    signer = Signer(b"k" * 32)
    path, exp, sig = parts(signer.sign(DIGEST, CLIENT, now=NOW))
    assert signer.check(tamper(path, exp, sig), CLIENT, now=NOW) is None


def test_url_of_another_key_is_rejected():
    url = Signer(b"a" * 32).sign(DIGEST, CLIENT, now=NOW)
    assert Signer(b"b" * 32).check(url, CLIENT, now=NOW) is None


def test_expired_url_is_rejected():
    signer = Signer(b"k" * 32, ttl=60)
    url = signer.sign(DIGEST, CLIENT, now=NOW)
    assert signer.check(url, CLIENT, now=NOW + 61) is None


def test_url_is_bound_to_the_client_it_was_issued_to():
    signer = Signer(b"k" * 32)
    url = signer.sign(DIGEST, CLIENT, now=NOW)
    assert CLIENT not in url  # who it was issued to is in the MAC, not spelled out
    assert signer.check(url, "10.0.0.3", now=NOW) is None
    assert signer.check(url, "127.0.0.1", now=NOW) is None
    digest, why = signer.verify(url, "10.0.0.3", now=NOW)
    assert digest is None and "another client" in why
    # one address, however the socket spells it
    assert signer.check(url, "::ffff:10.0.0.2", now=NOW) == DIGEST
    v6 = signer.sign(DIGEST, "fd00::2", now=NOW)
    assert signer.check(v6, "fd00:0:0::2", now=NOW) == DIGEST
    assert signer.check(v6, "fd00::3", now=NOW) is None


def test_default_lifetime_is_a_minute_from_issue():
    assert FASTPATH_URL_TTL == 60
    signer = Signer(b"k" * 32)
    url = signer.sign(DIGEST, CLIENT, now=NOW)
    assert parts(url)[1] == NOW + 60
    assert signer.check(url, CLIENT, now=NOW + 60) == DIGEST
    assert signer.verify(url, CLIENT, now=NOW + 61) == (None, "URL expired")


def test_url_of_a_proxied_client_is_sent_back_once_then_the_client_is_served_in_band():
    """A proxied client's URL that arrives from another address (its HTTP_PROXY is another
    proxy) is sent back to the https URL it asked for, once, while the URL is good; from then
    on that client, not others, is served in-band for SENT_BACK_TTL."""
    signer = Signer(b"k" * 32, ttl=60)
    asked = "https://registry-1.docker.io/v2/library/small/blobs/" + DIGEST
    url = signer.sign(DIGEST, CLIENT, now=NOW, way_back=asked)
    assert signer.send_back(url.replace("sig=", "sig=0"), now=NOW) is None  # only for the URL's holder
    assert signer.send_back(url, now=NOW + 61) is None  # expired
    assert not signer.sent_back(CLIENT, now=NOW)
    url = signer.sign(DIGEST, CLIENT, now=NOW, way_back=asked)
    assert signer.send_back("http://10.0.0.1:5080" + url, now=NOW + 1) == asked
    assert signer.send_back(url, now=NOW + 1) is None  # once
    assert signer.sent_back(CLIENT, now=NOW + 2) and signer.sent_back("::ffff:" + CLIENT, now=NOW + 2)
    assert not signer.sent_back("10.0.0.3", now=NOW + 2)
    assert not signer.sent_back(CLIENT, now=NOW + 2 + SENT_BACK_TTL)
    # expired entries are forgotten as new ones come, not only when asked for
    signer.sign(DIGEST, "10.0.0.4", now=NOW, way_back=asked)
    signer.sign(DIGEST, "10.0.0.5", now=NOW + 120, way_back=asked)
    assert len(signer._way_back) == 1
    # a URL that reached its client needs no way back any more
    reached = signer.sign(DIGEST, "10.0.0.6", now=NOW + 120, way_back=asked)
    assert signer.check(reached, "10.0.0.6", now=NOW + 121) == DIGEST
    assert signer.send_back(reached, now=NOW + 121) is None
    # URLs of direct clients (mirror, transparent) have no way back: refused as before
    direct = signer.sign(DIGEST, "10.0.0.3", now=NOW)
    assert signer.send_back(direct, now=NOW) is None


def test_log_throttle_says_how_many_lines_it_left_out(caplog):
    clock = [0.0]
    throttle = LogThrottle(interval=10, clock=lambda: clock[0])
    with caplog.at_level("INFO", logger="regcachelib.blobserver"):
        for _ in range(1000):
            throttle.log(logging.WARNING, "denied", "refused %s", "x")
        throttle.log(logging.WARNING, "other", "other kind")
        clock[0] = 10.5
        throttle.log(logging.WARNING, "denied", "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "other kind", "refused y (and 999 more like it in the last 10 s)"]

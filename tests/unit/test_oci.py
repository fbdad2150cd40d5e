"""oci.py: routes, names, digests, media types, Range, OCI error bodies."""

from __future__ import annotations

import json

import pytest

from regcachelib import oci
from regcachelib.oci import ProtocolError

HEX = "a" * 64
SHA256 = f"sha256:{HEX}"
SHA512 = "sha512:" + "b" * 128


def error_codes(exc: ProtocolError) -> list[str]:
    doc = json.loads(exc.body())
    assert set(doc) == {"errors"}
    assert isinstance(doc["errors"], list) and doc["errors"]
    for err in doc["errors"]:
        assert isinstance(err["message"], str)
    return [e["code"] for e in doc["errors"]]


# --- parse_route: what the cache answers ------------------------------------------------------


def test_blob_route():
    r = oci.parse_route("quay.io", f"/v2/coreos/etcd/blobs/{SHA256}")
    assert r == oci.Route(oci.BLOB, "coreos/etcd", SHA256, oci.Digest("sha256", HEX))
    assert not r.is_tag


def test_manifest_by_tag():
    r = oci.parse_route("quay.io", "/v2/coreos/etcd/manifests/v3.5.0")
    assert (r.kind, r.name, r.reference, r.digest) == (oci.MANIFEST, "coreos/etcd", "v3.5.0", None)
    assert r.is_tag


def test_manifest_by_digest():
    r = oci.parse_route("ghcr.io", f"/v2/org/team/img/manifests/{SHA512}")
    assert r.kind == oci.MANIFEST and r.name == "org/team/img"
    assert r.digest == oci.Digest("sha512", "b" * 128)
    assert r.reference == SHA512 and not r.is_tag


def test_query_string_is_ignored():
    r = oci.parse_route("quay.io", "/v2/a/b/manifests/latest?ns=quay.io")
    assert r.reference == "latest"


@pytest.mark.parametrize(
    "registry,name,expected",
    [
        ("docker.io", "alpine", "library/alpine"),
        ("docker.io", "library/alpine", "library/alpine"),
        ("docker.io", "bitnami/redis", "bitnami/redis"),
        ("quay.io", "alpine", "alpine"),  # only Docker Hub has library/
    ],
)
def test_docker_hub_library_normalisation(registry, name, expected):
    assert oci.parse_route(registry, f"/v2/{name}/manifests/latest").name == expected
    assert oci.parse_route(registry, f"/v2/{name}/blobs/{SHA256}").name == expected


def test_canonical_registry_folds_hub_aliases():
    for host in ("docker.io", "index.docker.io", "Registry-1.Docker.IO", "registry-1.docker.io:443", "docker.io."):
        assert oci.canonical_registry(host) == "docker.io"
    assert oci.canonical_registry("Quay.IO:443") == "quay.io"
    assert oci.canonical_registry("localhost:5000") == "localhost:5000"
    assert oci.api_host("docker.io") == "registry-1.docker.io"
    assert oci.api_host("quay.io") == "quay.io"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/",
        "/v2",
        "/",
        "/token",
        "/v1/_ping",
        "/v2/library/alpine/tags/list",
        "/v2/library/alpine/tags/list?n=10",
        "/v2/_catalog",
        "/v2/library/alpine/blobs/uploads/",
        "/v2/library/alpine/blobs/uploads/5f1d7e0a-uuid",
        "/v2/library/alpine/blobs/uploads",
        f"/v2/library/alpine/referrers/{SHA256}",
    ],
)
def test_pass_through_is_none(path):
    assert oci.parse_route("docker.io", path) is None


# --- parse_route: what it refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    "path,code",
    [
        ("/v2/library/../etc/manifests/latest", "NAME_INVALID"),
        ("/v2/../../etc/blobs/" + SHA256, "NAME_INVALID"),
        ("/v2/library/%2e%2e/manifests/latest", "NAME_INVALID"),
        ("/v2/%2E%2e/%2e%2E/blobs/" + SHA256, "NAME_INVALID"),
        ("/v2/library/alpine%00/manifests/latest", "NAME_INVALID"),
        ("/v2/library/alpine\x00/manifests/latest", "NAME_INVALID"),
        ("/v2/library\\alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/Library/Alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/library//alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/library/alpine-/manifests/latest", "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/latest", "NAME_INVALID"),
        ("/v2/" + "/".join(["abcdefgh"] * 40) + "/blobs/" + SHA256, "NAME_INVALID"),
        ("/v2/library/alpine/manifests/.hidden", "MANIFEST_INVALID"),
        ("/v2/library/alpine/manifests/" + "t" * 129, "MANIFEST_INVALID"),
        ("/v2/library/alpine/manifests/latest%0a", "MANIFEST_INVALID"),
        ("/v2/library/alpine/blobs/latest", "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/sha256:" + "g" * 64, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/sha256:" + "a" * 65, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/sha384:" + "a" * 96, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/sha512:" + "a" * 64, "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/" + SHA256 + "%0a", "DIGEST_INVALID"),
        ("/v2/library/alpine/manifests/md5:" + "a" * 32, "DIGEST_INVALID"),
    ],
)
def test_malformed_routes_raise_protocol_error(path, code):
    with pytest.raises(ProtocolError) as ei:
        oci.parse_route("docker.io", path)
    e = ei.value
    assert e.status == 400
    assert e.code == code
    assert error_codes(e) == [code]


def test_max_name_length_is_inclusive():
    name = "a" * 255
    assert oci.parse_route("quay.io", f"/v2/{name}/manifests/latest").name == name
    with pytest.raises(ProtocolError):
        oci.validate_name("a" * 256)


def test_validate_name_grammar():
    for ok in ("a", "a/b", "a.b_c__d---e/f0", "0/1/2/3"):
        assert oci.validate_name(ok) == ok
    for bad in ("", "A", "a/", "/a", "a..b", "a._b", "a_-b", "-a", "a b", "é", "a\n"):
        with pytest.raises(ProtocolError):
            oci.validate_name(bad)


def test_parse_digest():
    d = oci.parse_digest(SHA256)
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, SHA256)
    data = b"hello"
    real = oci.parse_digest(oci.sha256_digest(data))
    assert real.matches(data) and not real.matches(b"hellO")
    assert real.hasher().name == "sha256"
    assert oci.is_digest(SHA256) and not oci.is_digest("latest")


@pytest.mark.parametrize("text", ["", "sha256", "sha256:", ":" + HEX, "SHA256:" + HEX, "sha256:" + HEX + " ", "sha256:" + HEX + "\n", "foo:bar", "sha256+b64:" + HEX])
def test_parse_digest_rejects(text):
    with pytest.raises(ProtocolError) as ei:
        oci.parse_digest(text)
    assert ei.value.status == 400 and ei.value.code == "DIGEST_INVALID"


def test_error_body_shape():
    body = json.loads(oci.error_body("BLOB_UNKNOWN", "nope", {"digest": SHA256}))
    assert body == {"errors": [{"code": "BLOB_UNKNOWN", "message": "nope", "detail": {"digest": SHA256}}]}
    assert json.loads(oci.error_body("DENIED", "no")) == {"errors": [{"code": "DENIED", "message": "no"}]}


# --- media types ----------------------------------------------------------------------------------


def test_accepted_media_types():
    assert oci.accepted_media_types([]) is None
    assert oci.accepted_media_types([""]) is None
    assert oci.accepted_media_types(["*/*"]) is None
    assert oci.accepted_media_types([f"{oci.OCI_MANIFEST}, */*;q=0.1"]) is None
    assert oci.accepted_media_types(["application/*"]) is None
    got = oci.accepted_media_types([f"{oci.OCI_INDEX};q=0.9, {oci.OCI_MANIFEST}", "Application/VND.Docker.Distribution.Manifest.V2+JSON"])
    assert got == {oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST}


def test_client_accepts():
    accepted = {oci.DOCKER_MANIFEST}
    assert oci.client_accepts(oci.DOCKER_MANIFEST, accepted)
    assert oci.client_accepts(oci.DOCKER_MANIFEST.upper(), accepted)
    assert not oci.client_accepts(oci.OCI_INDEX, accepted)
    assert not oci.client_accepts(oci.DOCKER_LIST, accepted)
    assert oci.client_accepts(oci.OCI_INDEX, None)  # wildcard / no Accept: anything


def test_client_accepts_schema1_signed_and_unsigned():
    assert oci.client_accepts(oci.DOCKER_SCHEMA1_SIGNED, {oci.DOCKER_SCHEMA1})
    assert oci.client_accepts(oci.DOCKER_SCHEMA1, {oci.DOCKER_SCHEMA1_SIGNED})
    assert not oci.client_accepts(oci.DOCKER_SCHEMA1, {oci.DOCKER_MANIFEST})
    assert not oci.client_accepts(oci.DOCKER_MANIFEST, {oci.DOCKER_SCHEMA1, oci.DOCKER_SCHEMA1_SIGNED})


@pytest.mark.parametrize(
    "body,content_type,expected",
    [
        (b"{}", f"{oci.DOCKER_MANIFEST}; charset=utf-8", oci.DOCKER_MANIFEST),
        (json.dumps({"mediaType": oci.DOCKER_LIST, "manifests": []}).encode(), "application/json", oci.DOCKER_LIST),
        (json.dumps({"schemaVersion": 2, "manifests": []}).encode(), None, oci.OCI_INDEX),
        (json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode(), "", oci.OCI_MANIFEST),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "text/plain", oci.DOCKER_SCHEMA1),
        (json.dumps({"schemaVersion": 1, "signatures": []}).encode(), "application/octet-stream", oci.DOCKER_SCHEMA1_SIGNED),
        (b"not json", None, "application/octet-stream"),
        (b"\xff\xfe", "application/json", "application/json"),
        (b"[1, 2]", None, "application/octet-stream"),
        (b"[" * 100_000, None, "application/octet-stream"),  # absurd nesting must not raise
    ],
)
def test_manifest_media_type(body, content_type, expected):
    assert oci.manifest_media_type(body, content_type) == expected


# --- Range ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,size,expected",
    [
        (None, 100, None),
        ("", 100, None),
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=90-1000", 100, (90, 100)),
        ("bytes=99-99", 100, (99, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),
        ("BYTES=0-0", 100, (0, 1)),
        (" bytes= 5 - 6 ", 100, (5, 7)),
        ("bytes=0-1,5-6", 100, None),  # multiple ranges: the whole body
        ("bytes=0-1, 5-", 100, None),
        ("items=0-1", 100, None),
        ("bytes=", 100, None),
        ("bytes=abc", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=1-b", 100, None),
        ("bytes=--1", 100, None),
        ("bytes=-1-2", 100, None),
        ("bytes=+1-2", 100, None),
        ("bytes=\u0661-", 100, None),  # Arabic-Indic digit one is not an HTTP DIGIT
        ("bytes=\u00b2-", 100, None),
        ("bytes=" + "9" * 5000 + "-", 100, None),
    ],
)
def test_parse_range(header, size, expected):
    assert oci.parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header,size",
    [
        ("bytes=100-", 100),
        ("bytes=100-200", 100),
        ("bytes=5-3", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=-5", 0),  # a suffix of an empty body is unsatisfiable, not "0--1/0"
    ],
)
def test_parse_range_unsatisfiable(header, size):
    with pytest.raises(ProtocolError) as ei:
        oci.parse_range(header, size)
    assert ei.value.status == 416
    assert error_codes(ei.value) == [ei.value.code]

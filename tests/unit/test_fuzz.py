"""Hypothesis fuzzing of everything that parses client input."""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from regcachelib import oci

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAME_GRAMMAR = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
TAG_GRAMMAR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
HEX_LENGTH = {"sha256": 64, "sha512": 128}

FRAGMENTS = [
    "/", "..", ".", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%00", "\x00", "\\", "%5c", "%", "%%", "?", "#",
    "\n", "%0a", "\r", " ", "blobs", "manifests", "uploads", "tags", "list", "library", "alpine",
    "sha256:", "sha512:", "a" * 64, "0123456789abcdef" * 4, "b" * 128, "latest", "v1.2.3", "-", "_", "__",
    "é", "\u2024", "\uff0e", "\U0001f4a9", "~", ":", "@", "a" * 300,
]

path_parts = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(max_size=12),
    st.text(alphabet="abc.-_/%2e", max_size=30),
    st.builds(lambda c, n: c * n, st.sampled_from("a.-/"), st.integers(1, 400)),
)
fuzz_paths = st.one_of(
    st.text(max_size=200),
    st.lists(path_parts, max_size=14).map(lambda parts: "/v2/" + "".join(parts)),
    st.builds(
        lambda name, kind, ref: f"/v2/{name}/{kind}/{ref}",
        st.lists(path_parts, min_size=1, max_size=6).map("".join),
        st.sampled_from(["blobs", "manifests"]),
        st.lists(path_parts, min_size=1, max_size=4).map("".join),
    ),
)


@FUZZ
@given(registry=st.sampled_from(["docker.io", "quay.io", "localhost:5000"]), path=fuzz_paths)
@example(registry="docker.io", path="/v2/library/alpine/manifests/latest%0a")
@example(registry="docker.io", path="/v2/%2e%2e/%2e%2e/blobs/sha256:" + "a" * 64)
@example(registry="quay.io", path="/v2/a/blobs/sha256:" + "a" * 64 + "\n")
def test_parse_route_only_protocol_errors_and_safe_routes(registry, path):
    try:
        route = oci.parse_route(registry, path)
    except oci.ProtocolError as e:
        assert 400 <= e.status < 500
        assert e.body().startswith(b'{"errors": [{"code": ')
        return
    if route is None:
        return
    assert route.kind in (oci.BLOB, oci.MANIFEST)
    assert NAME_GRAMMAR.fullmatch(route.name), route.name
    assert len(route.name) <= oci.MAX_NAME_LENGTH + len("library/")
    if route.digest is not None:
        assert route.digest.algorithm in HEX_LENGTH
        assert re.fullmatch(f"[0-9a-f]{{{HEX_LENGTH[route.digest.algorithm]}}}", route.digest.hex)
    else:
        assert route.kind == oci.MANIFEST
        assert TAG_GRAMMAR.fullmatch(route.reference), route.reference
    # Whatever the store makes of these, it stays inside the cache directory.
    root = "/cache"
    for piece in (route.name, route.reference, str(route.digest)):
        joined = os.path.normpath(os.path.join(root, piece.replace(":", "-")))
        assert joined.startswith(root + "/")


range_headers = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.builds(
        lambda unit, a, b: f"{unit}={a}-{b}",
        st.sampled_from(["bytes", "BYTES", "items", "bytes ", " bytes"]),
        st.one_of(st.just(""), st.integers(0, 2**70).map(str), st.text(alphabet="0123456789 -+,\u0661\u00b2", max_size=6)),
        st.one_of(st.just(""), st.integers(0, 2**70).map(str), st.text(alphabet="0123456789 -+,\u0661\u00b2", max_size=6)),
    ),
    st.builds(lambda n: f"bytes=-{n}", st.integers(0, 2**40)),
)


@FUZZ
@given(header=range_headers, size=st.one_of(st.integers(0, 10), st.integers(0, 2**40)))
@example(header="bytes=-5", size=0)
@example(header="bytes=0-", size=0)
def test_parse_range_within_body_or_416(header, size):
    try:
        rng = oci.parse_range(header, size)
    except oci.ProtocolError as e:
        assert e.status == 416
        return
    if rng is not None:
        start, end = rng
        assert 0 <= start < end <= size


accept_headers = st.lists(
    st.one_of(
        st.text(max_size=60),
        st.lists(st.sampled_from([oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_LIST, oci.DOCKER_MANIFEST, oci.DOCKER_SCHEMA1, "*/*", "application/*", "text/html", ";q=0.5", ",", " ", ""]), max_size=6).map("".join),
    ),
    max_size=4,
)


@FUZZ
@given(headers=accept_headers, media_type=st.one_of(st.sampled_from(oci.MANIFEST_MEDIA_TYPES), st.text(max_size=30)))
def test_accept_parsing_never_raises(headers, media_type):
    accepted = oci.accepted_media_types(headers)
    assert accepted is None or (accepted and all(t == t.lower().strip() and t for t in accepted))
    parts = [p.split(";", 1)[0].strip().lower() for h in headers for p in h.split(",")]
    if "*/*" in parts:
        assert accepted is None
    elif accepted is not None:
        assert accepted == {p for p in parts if p}
    result = oci.client_accepts(media_type, accepted)
    assert isinstance(result, bool)
    if accepted is None:
        assert result


@FUZZ
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)), content_type=st.one_of(st.none(), st.text(max_size=40)))
def test_manifest_media_type_never_raises(body, content_type):
    assert isinstance(oci.manifest_media_type(body, content_type), str)

"""config.py: the regcache_config YAML file."""

from __future__ import annotations

import re

import pytest

from regcachelib import config
from regcachelib.config import Config, ConfigError, load_config, parse_config, parse_duration, parse_size

GiB = 1024**3


def error_of(text: str, source: str = "cfg.yaml") -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source)
    return str(ei.value)


def test_defaults():
    for cfg in (Config(), load_config(None), load_config(""), parse_config(""), parse_config("# only a comment\n")):
        assert cfg.size_limit == 50 * GiB
        assert cfg.tag_ttl == 300.0
        assert cfg.intercept_all is False
        assert cfg.aliases == {}
        assert "quay.io" in cfg.registries and "*.gcr.io" in cfg.registries


@pytest.mark.parametrize(
    "value,expected",
    [
        ("50GiB", 50 * GiB),
        ("50 GiB", 50 * GiB),
        ("500MB", 500 * 1000**2),
        ("500M", 500 * 1000**2),
        ("1.5g", 1_500_000_000),
        ("10KiB", 10 * 1024),
        ("2TiB", 2 * 1024**4),
        ("4096", 4096),
        ("7b", 7),
        (1073741824, GiB),
        (0, 0),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "50 parsecs", "-1GiB", "", "GiB", -5, True, None, [1], "1e9"])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    "value,expected",
    [("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), ("2d", 172800.0), ("250ms", 0.25), ("1.5m", 90.0), ("45", 45.0), (300, 300.0), (0.5, 0.5)],
)
def test_parse_duration(value, expected):
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["5 minutes", "5M", "-1s", "", "m", -1, False, None, float("nan"), float("inf")])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_full_config():
    cfg = parse_config(
        """
size_limit: 200GiB
tag_ttl: 10m
extra_registries:
  - Registry.Example.com
  - "*.azurecr.io"
intercept_all: false
aliases:
  Mirror.Corp.Example: docker.io
upstream_timeout: 5s
upstream_backoff: 1m
fastpath: false
fastpath_port: 6000
fastpath_host: 10.0.0.1
"""
    )
    assert cfg.size_limit == 200 * GiB
    assert cfg.tag_ttl == 600
    assert cfg.registries[-2:] == ["registry.example.com", "*.azurecr.io"]
    assert "quay.io" in cfg.registries  # extra_ adds to the built-in list
    assert cfg.aliases == {"mirror.corp.example": "docker.io"}
    assert (cfg.upstream_timeout, cfg.upstream_backoff) == (5.0, 60.0)
    assert (cfg.fastpath, cfg.fastpath_port, cfg.fastpath_host) == ("off", 6000, "10.0.0.1")


def test_registries_replaces_the_builtin_list():
    cfg = parse_config("registries: [registry.example.com]\n")
    assert cfg.registries == ["registry.example.com"]
    assert not cfg.is_registry_host("quay.io")
    assert cfg.is_registry_host("registry.example.com")


def test_unknown_key_names_key_and_location():
    msg = error_of("size_limit: 1GiB\ntag_ttl: 5m\n  \nsize_limt: 2GiB\n")
    assert msg.startswith("cfg.yaml:4:1: ")
    assert "size_limt" in msg
    assert "size_limit" in msg  # the known keys are listed


def test_unknown_nested_key_column():
    msg = error_of("{tag_ttl: 5m, colour: blue}\n")
    assert msg.startswith("cfg.yaml:1:15: ") and "colour" in msg


@pytest.mark.parametrize(
    "text,where,key",
    [
        ("tag_ttl: 5m\nsize_limit: lots\n", "cfg.yaml:2:13", "size_limit"),
        ("tag_ttl: forever\n", "cfg.yaml:1:10", "tag_ttl"),
        ("size_limit: 1GiB\nregistries:\n  - quay.io\n  - 5\n", "cfg.yaml:3:3", "registries"),
        ("aliases: [a, b]\n", "cfg.yaml:1:10", "aliases"),
        ("intercept_all: 'yes'\n", "cfg.yaml:1:16", "intercept_all"),
        ("fastpath_port: 70000\n", "cfg.yaml:1:16", "fastpath_port"),
        ("fastpath_port: true\n", "cfg.yaml:1:16", "fastpath_port"),
        ("fastpath_host: [1]\n", "cfg.yaml:1:16", "fastpath_host"),
        ("upstream_timeout: .inf\n", "cfg.yaml:1:19", "upstream_timeout"),
        ("tag_ttl: .nan\n", "cfg.yaml:1:10", "tag_ttl"),
        ("size_limit:\n", "cfg.yaml:1:12", "size_limit"),
    ],
)
def test_bad_value_names_key_and_value_line(text, where, key):
    msg = error_of(text)
    assert msg.startswith(where + ": "), msg
    assert key in msg


@pytest.mark.parametrize(
    "text,where",
    [
        ("size_limit: 2024-13-01\n", "cfg.yaml:1:13"),  # a YAML timestamp that is no date
        ("tag_ttl: !!python/object:os.system x\n", "cfg.yaml:1:10"),  # a tag SafeLoader refuses
        ("tag_ttl: !!int abc\n", "cfg.yaml:1:10"),
    ],
)
def test_value_yaml_cannot_construct_is_a_located_config_error(text, where):
    assert error_of(text).startswith(where + ": ")


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "1: x\n", "null: x\n"])
def test_non_string_keys_are_config_errors(text):
    assert error_of(text).startswith("cfg.yaml:1:")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text):
    msg = error_of(text)
    assert msg.startswith("cfg.yaml:1") and "mapping" in msg


@pytest.mark.parametrize("text,line", [("tag_ttl: [5m\n", 2), ("a: b: c\n", 1), ("tag_ttl: 5m\n\tsize_limit: 1\n", 2), ("a: 1\n---\nb: 2\n", 2)])
def test_invalid_yaml(text, line):
    msg = error_of(text)
    assert "invalid YAML" in msg
    assert re.match(rf"cfg\.yaml:{line}:\d+: ", msg), msg


def test_load_config_file(tmp_path):
    path = tmp_path / "regcache.yaml"
    path.write_text("tag_ttl: 1m\n")
    assert load_config(str(path)).tag_ttl == 60.0
    path.write_text("tag_ttl: 1m\nbogus: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2:1: ")):
        load_config(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))


# --- which hosts are registries ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "quay.io",
        "QUAY.IO",
        "quay.io.",
        "docker.io",
        "registry-1.docker.io",
        "gcr.io",
        "us.gcr.io",
        "europe-west1-docker.pkg.dev",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        "ghcr.io",
    ],
)
def test_default_registry_hosts(host):
    assert Config().is_registry_host(host)


@pytest.mark.parametrize("host", ["example.com", "auth.docker.io", "production.cloudflare.docker.com", "notgcr.io", "gcr.io.evil.com", "storage.googleapis.com", ""])
def test_non_registry_hosts(host):
    assert not Config().is_registry_host(host)


def test_aliases_and_registry_for_host():
    cfg = parse_config("aliases:\n  Mirror.Corp.Example: docker.io\n  q.corp.example: quay.io\n")
    assert cfg.is_registry_host("mirror.corp.example")
    assert cfg.is_registry_host("MIRROR.corp.example.")
    assert cfg.registry_for_host("Mirror.Corp.Example") == "docker.io"
    assert cfg.registry_for_host("q.corp.example") == "quay.io"
    assert cfg.registry_for_host("index.docker.io") == "docker.io"
    assert cfg.registry_for_host("registry-1.docker.io") == "docker.io"
    assert cfg.registry_for_host("quay.io") == "quay.io"
    assert not cfg.is_registry_host("other.corp.example")


def test_intercept_all():
    cfg = parse_config("intercept_all: true\n")
    assert cfg.is_registry_host("example.com")
    assert cfg.is_registry_host("anything.at.all")


def test_default_list_is_not_shared_between_configs():
    a = parse_config("extra_registries: [one.example]\n")
    b = Config()
    assert "one.example" in a.registries and "one.example" not in b.registries
    assert "one.example" not in config.DEFAULT_REGISTRIES


def test_redirect_allow_networks():
    import ipaddress

    assert Config().redirect_allow == []
    cfg = parse_config("redirect_allow: [10.77.1.0/24, 192.168.1.5, 'fd00::/8', 172.16.3.4/12]\n")
    networks = ("10.77.1.0/24", "192.168.1.5/32", "fd00::/8", "172.16.0.0/12")
    assert cfg.redirect_allow == [ipaddress.ip_network(n) for n in networks]


@pytest.mark.parametrize("value", ["10.0.0.0/8", "[10.0.0.0/33]", "[cdn.example]", "[[1]]", "[8]"])
def test_redirect_allow_rejects(value):
    msg = error_of(f"redirect_allow: {value}\n")
    assert msg.startswith("cfg.yaml:1:17: redirect_allow: "), msg


def test_clients_name_only_listed_registries_even_with_intercept_all():
    cfg = parse_config("intercept_all: true\naliases: {mirror.corp: quay.io}\n")
    assert cfg.is_registry_host("evil.example")  # the proxy intercepts every host's TLS
    assert not cfg.is_listed_registry("evil.example")  # but no client may name it as a registry
    assert not cfg.is_listed_registry("127.0.0.1:9090")
    assert all(cfg.is_listed_registry(h) for h in ("quay.io", "eu.gcr.io", "Mirror.Corp."))


@pytest.mark.parametrize("text, expected", [("", 64 * 1024), ("fastpath_inline_max: 0\n", 0),
                                            ("fastpath_inline_max: 16KiB\n", 16 * 1024)])
def test_fastpath_inline_max(text, expected):
    assert parse_config(text).fastpath_inline_max == expected


def test_fastpath_inline_max_is_at_most_64kib():
    # an inline body is held whole in memory: larger blobs must stream
    with pytest.raises(ConfigError, match="fastpath_inline_max: at most 64KiB"):
        parse_config("fastpath_inline_max: 1MiB\n")

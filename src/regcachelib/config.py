"""The regcache_config YAML file: parsed, validated, every error reported with its location."""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from . import oci
from .egress import EgressProxy, parse_no_proxy, parse_proxy_auth, parse_proxy_url

# Registries and the hosts clients reach them by, intercepted unless the config says otherwise.
# Blob CDNs are not listed: blob redirects are followed by regcache itself, so clients never
# see them and their TLS is left alone.
DEFAULT_REGISTRIES = (
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "quay.io",
    "gcr.io",
    "*.gcr.io",
    "registry.k8s.io",
    "k8s.gcr.io",
    "*.pkg.dev",
    "ghcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
    "*.dkr.ecr.*.amazonaws.com",
    "nvcr.io",
    "registry.gitlab.com",
    "docker.elastic.co",
    "registry.redhat.io",
    "registry.access.redhat.com",
    "registry.opensuse.org",
)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class AllowedDestination:
    """One proxy_allow entry: a network (by address) or a host name pattern, on one port or all."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    host: str | None = None  # lower-case; fnmatch pattern such as *.corp.example
    port: int | None = None

    def allows_name(self, host: str, port: int) -> bool:
        if self.host is None or self.port not in (None, port):
            return False
        return fnmatch.fnmatchcase(host.lower().rstrip("."), self.host)

    def allows_address(self, address, port: int) -> bool:
        return self.network is not None and self.port in (None, port) and address in self.network


class CredentialError(ValueError):
    """A configured credential whose secret cannot be read (file gone, variable unset)."""


@dataclass(frozen=True)
class Credential:
    """regcache's own account at one registry. Holds where the secret is, never the secret:
    the config, its repr and anything that prints them carry no secret, and a rotated file
    is read afresh each time a token is fetched."""

    registry: str  # canonical registry name (docker.io for Docker Hub)
    username: str
    secret_file: str | None = None
    secret_env: str | None = None

    @property
    def source(self) -> str:
        return f"file {self.secret_file}" if self.secret_file else f"environment variable {self.secret_env}"

    def secret(self) -> str:
        """The password or access token. Raises CredentialError."""
        if self.secret_file:
            try:
                with open(self.secret_file, encoding="utf-8") as f:
                    value = f.read().strip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise CredentialError(f"credentials for {self.registry}: cannot read {self.secret_file}: "
                                      f"{getattr(e, 'strerror', None) or e}") from None
        else:
            value = os.environ.get(self.secret_env or "", "")
        if not value:
            raise CredentialError(f"credentials for {self.registry}: {self.source} is empty")
        return value


@dataclass
class Config:
    size_limit: int = 50 * 1024**3
    tag_ttl: float = 300.0
    registries: list[str] = field(default_factory=lambda: list(DEFAULT_REGISTRIES))
    intercept_all: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    upstream_timeout: float = 30.0
    upstream_backoff: float = 15.0
    # auto (= always): blob GETs of every client, HTTPS_PROXY ones included, get a 307 to the fast
    # path; a proxied client goes there directly unless its HTTP_PROXY takes the redirect, which
    # then comes back to us (served in-band) or, through another proxy, is sent back in-band. off: never
    fastpath: str = "auto"
    # true: also repositories not known to be public; their bytes would leave TLS, so not by default
    fastpath_private: bool = False
    # Stored blobs up to this size are answered inline (inside TLS, from the request hook) even
    # when the fast path is open: one request instead of a 307 and a second one on another
    # connection (bench `rates`, 16 KiB hits: 1,045-1,067 req/s inline, 1,011-1,024 by the 307).
    # 0: every blob GET of a fast-path client gets the 307. At most INLINE_MAX: an inline body
    # is held in memory.
    fastpath_inline_max: int = 64 * 1024
    fastpath_port: int = 5080
    fastpath_host: str | None = None  # address clients reach the fast path on; default: the one they reached us on
    fastpath_bind: str = "0.0.0.0"
    auth_ttl: float = 60.0  # how long upstream's "yes" to a client's credentials is remembered
    public_ttl: float = 3600.0  # how long a repository's public/private status is trusted
    trust_clients_offline: bool = False  # serve private cached content unverified when upstream is unreachable
    # registries whose own endpoint is plain HTTP; every other registry is cached only from HTTPS :443
    plain_http_registries: list[str] = field(default_factory=list)
    status_show_private: bool = False  # name repositories not known to be public on the status page
    # destinations the proxy may reach although they are the cache host's own or loopback/link-local
    proxy_allow: list[AllowedDestination] = field(default_factory=list)
    # Networks an upstream redirect (a blob CDN) may lead to besides public addresses: on-premise
    # registries whose storage sits on a private network. Loopback, link-local and private
    # ranges are refused otherwise, so a registry cannot point regcache at the cache host's
    # own services or its LAN.
    redirect_allow: list = field(default_factory=list)
    # Networks whose clients may use the cache at all (every listener); empty: everyone.
    client_networks: list = field(default_factory=list)
    # regcache's own accounts for its upstream fetches, by canonical registry name
    credentials: dict[str, Credential] = field(default_factory=dict)
    # The egress proxy every upstream connection goes through (None: direct), built from
    # upstream_proxy, upstream_proxy_auth and upstream_no_proxy (egress.py).
    upstream_proxy: EgressProxy | None = None
    # A cache tier (tier.TierConfig): S3 + Redis shared with other nodes; None: a single node.
    tier: object = None
    # the settings the file named: what the operator asked for, as opposed to a default
    explicit: set[str] = field(default_factory=set)

    def is_registry_host(self, host: str) -> bool:
        if self.intercept_all:
            return True
        return self.is_listed_registry(host)

    def is_listed_registry(self, host: str) -> bool:
        """Whether host is a registry by the registries list and aliases alone.

        What a client may name a registry by (a mirror's ?ns=, path prefix, Host or SNI):
        intercept_all only widens which TLS the proxy intercepts; it must not let a client
        send regcache to any host it likes.
        """
        host = host.lower().rstrip(".")
        if host in self.aliases:
            return True
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.registries)

    def is_plain_http(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.plain_http_registries)

    def check_credentials(self) -> None:
        """Every configured secret is readable now (the proxy checks at start-up; commands that
        read the config for other settings do not need them). Raises CredentialError."""
        for credential in self.credentials.values():
            credential.secret()

    def registry_for_host(self, host: str) -> str:
        host = host.lower().rstrip(".")
        return oci.canonical_registry(self.aliases.get(host, host))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {None: 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value) -> int:
    """'50GiB', '500MB', '1.5g', 1073741824 -> bytes (binary units for 'i' forms)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 50GiB, got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if "i" in unit:
        multiplier = 1024 ** ("bkmgt".index(unit[0]))
    else:
        multiplier = _UNITS[unit.rstrip("b") if unit != "b" else "b"]
    return int(number * multiplier)


INLINE_MAX = 64 * 1024


def _inline_max(value) -> int:
    size = parse_size(value)
    if size > INLINE_MAX:
        raise ValueError(f"at most 64KiB (inline bodies are held in memory), got {value!r}")
    return size


def parse_duration(value) -> float:
    """'5m', '30s', '1h', 300 -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5m")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite duration such as 5m, got {value!r}")
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration such as 5m or 30s, got {value!r}")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _hosts(value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("expected a list of host names (patterns like *.gcr.io allowed)")
    return [v.strip().lower() for v in value]


def _aliases(value) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("expected a mapping of host name -> registry name")
    return {k.lower(): v.lower() for k, v in value.items()}


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _fastpath_mode(value) -> str:
    if value is True:
        return "auto"
    if value is False:
        return "off"
    if value in ("auto", "always", "off"):
        return value
    raise ValueError("expected auto, always or off")


def _networks(value) -> list:
    """['10.0.0.0/8', '192.168.1.5'] -> ip_network objects (a bare address is one host)."""
    if not isinstance(value, list):
        raise ValueError("expected a list of networks such as [10.1.0.0/16, 192.168.1.5]")
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a network such as 10.1.0.0/16, got {item!r}")
        try:
            # strict=False: 10.1.2.3/16 means the /16 it lies in, as most people who write it mean.
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"expected a network such as 10.1.0.0/16, got {item!r}") from None
    return networks


def _port(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("expected a port number 0-65535")
    return value


def _opt_str(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def _allowed_destination(entry) -> AllowedDestination:
    """'10.1.0.0/16', '127.0.0.1:5000', '[::1]:5000', '::1', 'registry.corp', '*.corp:5000'."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"expected an address, network (CIDR) or host name, optionally with :port, got {entry!r}")
    text = entry.strip().lower()
    port = None
    if text.startswith("["):
        inner, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r}: expected [address]:port")
        text, port_text = inner, rest[1:] if rest else None
    elif text.count(":") == 1:  # host:port; two or more colons are an IPv6 address without port
        text, port_text = text.split(":")
    else:
        port_text = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{entry!r}: expected a port number 1-65535")
        port = int(port_text)
    try:
        return AllowedDestination(network=ipaddress.ip_network(text), port=port)
    except ValueError as e:
        # a CIDR, an IPv6 form or a dotted name ending in a number was meant as an address
        if "/" in text or ":" in text or text.rstrip(".").rsplit(".", 1)[-1].isdigit():
            raise ValueError(f"{entry!r}: {e}") from None
    if not _HOST_PATTERN.match(text.rstrip(".")):
        raise ValueError(f"{entry!r}: not an address, network (CIDR) or host name")
    return AllowedDestination(host=text.rstrip("."), port=port)


def _allowed_destinations(value) -> list[AllowedDestination]:
    if not isinstance(value, list):
        raise ValueError("expected a list of addresses, networks (CIDR) or host names, e.g. [127.0.0.1:5000, reg.corp]")
    return [_allowed_destination(v) for v in value]


_SECRET_SOURCES = ("password_file", "password_env", "token_file", "token_env")
_INLINE_SECRETS = ("password", "token", "secret", "auth")


def _credentials(value) -> dict[str, Credential]:
    """{registry: {username, password_file | password_env | token_file | token_env}}.

    Inline secrets are refused, not merely kept out of logs: a config file is copied into
    ConfigMaps, backups and bug reports, and is often world-readable; a secret file can be
    0600 and an environment variable comes from the service manager's secret store.
    """
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of registry -> {username, password_file | password_env | "
                         "token_file | token_env}")
    credentials: dict[str, Credential] = {}
    for registry, entry in value.items():
        if not isinstance(registry, str) or not registry.strip():
            raise ValueError(f"expected a registry name, got {registry!r}")
        name = oci.canonical_registry(registry)
        if not isinstance(entry, dict):
            raise ValueError(f"{registry}: expected a mapping with username and password_file, password_env, "
                             "token_file or token_env")
        inline = [k for k in entry if k in _INLINE_SECRETS]
        if inline:
            raise ValueError(f"{registry}: inline {inline[0]} refused: a secret in the config file ends up in every "
                             "copy of it; name a file only regcache can read (password_file, token_file) or an "
                             "environment variable (password_env, token_env)")
        unknown = sorted(set(entry) - {"username", *_SECRET_SOURCES})
        if unknown:
            raise ValueError(f"{registry}: unknown key {unknown[0]!r} (known: username, {', '.join(_SECRET_SOURCES)})")
        username = entry.get("username")
        if not isinstance(username, str) or not username.strip() or ":" in username:
            raise ValueError(f"{registry}: username must be a non-empty name without ':'")
        sources = [k for k in _SECRET_SOURCES if k in entry]
        if len(sources) != 1:
            raise ValueError(f"{registry}: expected exactly one of {', '.join(_SECRET_SOURCES)}")
        where = entry[sources[0]]
        if not isinstance(where, str) or not where.strip():
            raise ValueError(f"{registry}: {sources[0]} must name a file or a variable")
        if name in credentials:
            raise ValueError(f"{registry}: credentials for {name} given twice")
        is_file = sources[0].endswith("_file")
        credentials[name] = Credential(name, username.strip(), secret_file=where if is_file else None,
                                       secret_env=None if is_file else where.strip())
    return credentials
def _tier(value):
    from .tier import parse_tier

    return parse_tier(value)


# key -> (attribute, converter)
_KEYS = {
    "size_limit": ("size_limit", parse_size),
    "tag_ttl": ("tag_ttl", parse_duration),
    "registries": ("registries", _hosts),
    "extra_registries": (None, _hosts),
    "intercept_all": ("intercept_all", _bool),
    "aliases": ("aliases", _aliases),
    "upstream_timeout": ("upstream_timeout", parse_duration),
    "upstream_backoff": ("upstream_backoff", parse_duration),
    "fastpath": ("fastpath", _fastpath_mode),
    "fastpath_private": ("fastpath_private", _bool),
    "fastpath_inline_max": ("fastpath_inline_max", _inline_max),
    "fastpath_port": ("fastpath_port", _port),
    "fastpath_host": ("fastpath_host", _opt_str),
    "fastpath_bind": ("fastpath_bind", _opt_str),
    "auth_ttl": ("auth_ttl", parse_duration),
    "public_ttl": ("public_ttl", parse_duration),
    "trust_clients_offline": ("trust_clients_offline", _bool),
    "plain_http_registries": ("plain_http_registries", _hosts),
    "status_show_private": ("status_show_private", _bool),
    "proxy_allow": ("proxy_allow", _allowed_destinations),
    "redirect_allow": ("redirect_allow", _networks),
    "client_networks": ("client_networks", _networks),
    "credentials": ("credentials", _credentials),
    # combined into Config.upstream_proxy once the whole file is read
    "upstream_proxy": (None, parse_proxy_url),
    "upstream_proxy_auth": (None, parse_proxy_auth),
    "upstream_no_proxy": (None, parse_no_proxy),
    "tier": ("tier", _tier),
}


def load_config(path: str | None) -> Config:
    config = Config()
    if not path:
        return config
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, path)


def parse_config(text: str, source: str = "<config>") -> Config:
    config = Config()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    if root is None:
        return config
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{source}:{root.start_mark.line + 1}: the top level must be a mapping of settings")
    loader = yaml.SafeLoader("")
    egress: dict[str, object] = {}
    for key_node, value_node in root.value:
        where = f"{source}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
        vwhere = f"{source}:{value_node.start_mark.line + 1}:{value_node.start_mark.column + 1}"
        try:
            key = loader.construct_object(key_node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: invalid setting name: {e}") from None
        # A YAML key may be a list or a mapping (unhashable): judge it before the lookup.
        if not isinstance(key, str) or key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {known})")
        attribute, convert = _KEYS[key]
        try:
            # Construction fails on e.g. "2024-13-01" (a timestamp) or an unknown !!tag.
            value = loader.construct_object(value_node, deep=True)
            converted = convert(value)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            raise ConfigError(f"{vwhere}: {key}: {e}") from None
        config.explicit.add(key)
        if key == "extra_registries":
            config.registries.extend(converted)
        elif key.startswith("upstream_proxy") or key == "upstream_no_proxy":
            egress[key] = converted
        else:
            setattr(config, attribute, converted)
    if "upstream_proxy" in egress:
        host, port = egress["upstream_proxy"]
        config.upstream_proxy = EgressProxy(host, port, egress.get("upstream_proxy_auth"),
                                            egress.get("upstream_no_proxy", ()))
    elif egress:
        raise ConfigError(f"{source}: {' and '.join(sorted(egress))} without upstream_proxy")
    return config

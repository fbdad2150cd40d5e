"""What a registry request asks, as data: built once by routing, read by everyone after it.

`RegistryRequest` is what the services see instead of a flow; `Outcome` is what the blob and
manifest addons record of their answer, for the monitoring addon to log and count once the
flow has really ended. Both live in `flow.metadata` under the keys below.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import oci
from .upstream import Target

REQUEST = "regcache.request"
OUTCOME = "regcache.outcome"

# Client headers regcache forwards on its own upstream fetches.
FORWARDED = ("authorization", "accept", "user-agent", "range")


@dataclass(frozen=True)
class RegistryRequest:
    """One /v2 request of a client, for a registry regcache serves."""

    registry: str  # canonical registry name: docker.io, quay.io...
    target: Target  # where regcache fetches from for it
    path: str  # the /v2 path without a mirror's registry prefix or query
    method: str
    route: oci.Route | None  # the blob or manifest asked for; None for the /v2/ ping
    # The client's Authorization, Accept, User-Agent and Range, in order. Without a client's
    # Authorization when it must not travel (a path-prefix mirror's token is for another registry).
    headers: tuple[tuple[str, str], ...]
    client: str  # the client's address (fast-path URLs are bound to it)
    offline: bool  # regcache_offline: answer from the cache only
    direct: bool  # the client reaches regcache directly (mirror or transparent), not as HTTPS_PROXY
    # False when the client's Authorization is for another registry (a path-prefix mirror)
    forward_credentials: bool = True
    plain_http: bool = False  # the client's own connection is plain HTTP (a mirror on http://)

    @property
    def is_ping(self) -> bool:
        return self.route is None

    @property
    def repository(self) -> str:
        assert self.route is not None
        return self.route.name

    @property
    def kind(self) -> str | None:
        return self.route.kind if self.route else None

    @property
    def reference(self) -> str:
        assert self.route is not None
        return self.route.reference

    @property
    def digest(self) -> oci.Digest | None:
        return self.route.digest if self.route else None

    @property
    def endpoint(self) -> tuple:
        return (self.target.host, self.target.port, self.target.connect_address)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def header_list(self, names=FORWARDED) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.headers if k.lower() in names]

    @property
    def authorization(self) -> str | None:
        return self.header("authorization")

    @property
    def anonymous(self) -> bool:
        return self.authorization is None

    @property
    def accepted(self) -> set[str] | None:
        return oci.accepted_media_types([v for k, v in self.headers if k.lower() == "accept"])

    def upstream_path(self, reference: str | None = None) -> str:
        """/v2/<repo>/{blobs,manifests}/<reference> upstream."""
        assert self.route is not None
        kind = "blobs" if self.route.kind == oci.BLOB else "manifests"
        return f"/v2/{self.route.name}/{kind}/{reference or self.route.reference}"


@dataclass(frozen=True)
class Outcome:
    """How regcache answered a request: HIT, MISS, REVALIDATED, STALE, UNKNOWN, UNCACHED,
    UNAVAILABLE or UPSTREAM_<status>; the bytes of a manifest body; fastpath/inband for blobs."""

    outcome: str
    size: int | None = None
    via: str | None = None

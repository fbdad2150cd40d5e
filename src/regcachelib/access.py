"""Who may be served cached content: private-repository isolation.

A repository is public when an anonymous client may pull it (upstream answers without auth,
or its token service hands an anonymous caller a token the registry accepts). Cached content
of a public repository is served to anyone. Anything else is served from the cache only to a
client whose own credentials upstream accepts for that repository right now; a positive
answer is remembered briefly per (token hash, registry, repository), in memory only.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from .oci import MANIFEST_MEDIA_TYPES
from .upstream import Target, Upstream, UpstreamUnavailable, fetch_bearer_token

log = logging.getLogger(__name__)

# Registries answer a manifest HEAD only for media types the client accepts (distribution
# answers 404 to an OCI manifest asked for without Accept), so a probe accepts them all.
_PROBE_HEADERS = [("Accept", ", ".join(MANIFEST_MEDIA_TYPES)), ("Accept", "*/*")]


@dataclass
class Verdict:
    allow: bool
    # when denied: what to answer (upstream's own answer where there is one)
    status: int = 0
    headers: list[tuple[str, str]] | None = None
    reason: str = ""


def token_hash(authorization: str) -> str:
    # Only a hash of a credential is ever kept, and only in memory.
    return hashlib.sha256(authorization.encode()).hexdigest()


class Access:
    def __init__(self, upstream: Upstream, tags_store, auth_ttl: float = 60.0, public_ttl: float = 3600.0, trust_clients_offline: bool = False):
        self.upstream = upstream
        self.tags_store = tags_store  # a diskcache Cache; publicness is kept with the tags
        self.auth_ttl = auth_ttl
        self.public_ttl = public_ttl
        self.trust_clients_offline = trust_clients_offline
        self._granted: dict[tuple[str, str, str], float] = {}

    # --- publicness ------------------------------------------------------------------------

    def known_public(self, registry: str, repo: str) -> tuple[bool | None, float]:
        value = self.tags_store.get(("public", registry, repo))
        if value is None:
            return None, 0.0
        return bool(value[0]), float(value[1])

    def remember_public(self, registry: str, repo: str, public: bool) -> None:
        self.tags_store.set(("public", registry, repo), (public, time.time()))

    def probe_public(self, target: Target, registry: str, repo: str, path: str) -> bool:
        """Blocking: can an anonymous client HEAD this resource? Raises UpstreamUnavailable."""
        resp = self.upstream.request("HEAD", target, path, _PROBE_HEADERS)
        resp.close()
        if resp.status == 200:
            public = True
        elif resp.status == 401:
            public = self._anonymous_token_works(target, repo, path, resp.header("www-authenticate"))
        else:
            public = False
        self.remember_public(registry, repo, public)
        return public

    def _anonymous_token_works(self, target: Target, repo: str, path: str, challenge: str | None) -> bool:
        # No credentials of anyone go to the realm: this asks as an anonymous client.
        token = fetch_bearer_token(self.upstream, challenge, repo)
        if not token:
            return False
        check = self.upstream.request("HEAD", target, path, [("Authorization", f"Bearer {token}"), *_PROBE_HEADERS])
        check.close()
        return check.status == 200

    # --- the decision --------------------------------------------------------------------------

    def decide(self, target: Target, registry: str, repo: str, path: str, method_headers: list[tuple[str, str]], offline: bool) -> Verdict:
        """Blocking: may this client be served cached content of registry/repo?"""
        public, checked = self.known_public(registry, repo)
        fresh = public is not None and time.time() - checked < self.public_ttl
        if not offline and not fresh:
            try:
                public = self.probe_public(target, registry, repo, path)
            except UpstreamUnavailable as e:
                log.info("regcache: cannot check whether %s/%s is public: %s", registry, repo, e)
        if public:
            return Verdict(True)
        if offline:
            return self._unverifiable(registry, repo, "regcache is offline")
        authorization = next((v for k, v in method_headers if k.lower() == "authorization"), None)
        if authorization:
            key = (token_hash(authorization), registry, repo)
            if self._granted.get(key, 0) > time.monotonic():
                return Verdict(True)
        try:
            resp = self.upstream.request("HEAD", target, path, method_headers)
            resp.close()
        except UpstreamUnavailable as e:
            return self._unverifiable(registry, repo, f"upstream unreachable: {e}")
        if resp.status == 200:
            if authorization:
                self._granted[(token_hash(authorization), registry, repo)] = time.monotonic() + self.auth_ttl
            return Verdict(True)
        if resp.status >= 500 or resp.status == 429:
            return self._unverifiable(registry, repo, f"upstream answered {resp.status}")
        keep = [(k, v) for k, v in resp.headers if k.lower() in ("www-authenticate", "docker-distribution-api-version")]
        return Verdict(False, resp.status, keep, f"upstream refused the client's credentials ({resp.status})")

    def _unverifiable(self, registry: str, repo: str, why: str) -> Verdict:
        if self.trust_clients_offline:
            return Verdict(True)
        return Verdict(False, 401, [], f"{registry}/{repo} is not known to be public and credentials cannot be checked: {why}")

"""Who may be served cached content: the one access rule, for every path that serves a byte.

Cached bytes of a digest go to a client only when upstream would give this client these bytes
under this repository and registry name right now:

1. membership: the named repository is known to hold the digest (the store's membership
   index: learnt from upstream 200s under that repository and from manifests served there).
   Unknown membership is settled by asking upstream under that repository as this client
   (its own Authorization, anonymous when it sent none): a 200 teaches membership, anything
   else is the answer. Offline or upstream down, unknown membership is a 404, never the bytes.
2. readability: the repository is public (an anonymous client may pull from it), or upstream
   accepts this client's own credentials for it; a "yes" for a credential is remembered for
   auth_ttl, in memory, by a hash of the credential.

A repository is public only by answers that say so: an anonymous 200 (with an anonymous token
where the registry asks for one) for a digest the repository is known to hold. A 401/403 to
that question makes it private. A 404 or an error says nothing about publicness.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from . import oci
from .concurrency import Flights, Workers
from .oci import MANIFEST_MEDIA_TYPES
from .request import RegistryRequest
from .upstream import Target, Upstream, UpstreamUnavailable, fetch_bearer_token

log = logging.getLogger(__name__)

# Registries answer a manifest HEAD only for media types the client accepts (distribution
# answers 404 to an OCI manifest asked for without Accept), so a probe accepts them all.
_PROBE_HEADERS = [("Accept", ", ".join(MANIFEST_MEDIA_TYPES)), ("Accept", "*/*")]
# Credentials are client-chosen: the memory of upstream's "yes" is bounded.
MAX_GRANTS = 10_000
_KEPT_HEADERS = ("www-authenticate", "docker-distribution-api-version")


@dataclass
class Verdict:
    allow: bool
    # when denied: what to answer (upstream's own answer where there is one)
    status: int = 0
    headers: list[tuple[str, str]] | None = None
    reason: str = ""


@dataclass(frozen=True)
class Question:
    """May this client be served this digest, cached, under this repository?"""

    target: Target
    registry: str
    repo: str
    digest: str
    path: str  # the upstream path that asks for it: /v2/<repo>/{blobs,manifests}/<digest>
    headers: tuple[tuple[str, str], ...]  # the client's Authorization (if any) and Accept

    @property
    def authorization(self) -> str | None:
        return next((v for k, v in self.headers if k.lower() == "authorization"), None)


def token_hash(authorization: str) -> str:
    # Only a hash of a credential is ever kept, and only in memory.
    return hashlib.sha256(authorization.encode()).hexdigest()


class Access:
    def __init__(self, upstream: Upstream, store, auth_ttl: float = 60.0, public_ttl: float = 3600.0,
                 trust_clients_offline: bool = False, workers: Workers | None = None):
        self.workers = workers  # where blocking decisions and probes run (the async interface)
        self._probes: Flights = Flights()  # one publicness probe per repository at a time
        self.upstream = upstream
        self.store = store
        self.auth_ttl = auth_ttl
        self.public_ttl = public_ttl
        self.trust_clients_offline = trust_clients_offline
        self._granted: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    # --- publicness ------------------------------------------------------------------------

    def known_public(self, registry: str, repo: str) -> tuple[bool | None, float]:
        return self.store.get_public(registry, repo)

    def fresh_public(self, registry: str, repo: str, offline: bool = False) -> bool | None:
        """The remembered verdict while it is trusted (always, offline); else None."""
        public, checked = self.known_public(registry, repo)
        if public is None or (not offline and time.time() - checked >= self.public_ttl):
            return None
        return public

    def remember_public(self, registry: str, repo: str, public: bool) -> None:
        self.store.set_public(registry, repo, public)

    def probe_public(self, target: Target, registry: str, repo: str, path: str) -> bool | None:
        """Blocking: may an anonymous client HEAD this resource, which repo is known to hold?

        Records and returns True/False on a definitive answer, None otherwise (404, 5xx...).
        Raises UpstreamUnavailable.
        """
        resp = self.upstream.request("HEAD", target, path, _PROBE_HEADERS)
        resp.close()
        status = resp.status
        if status == 401:
            status = self._status_with_anonymous_token(target, repo, path, resp.header("www-authenticate"))
        if status == 200:
            public = True
        elif status in (401, 403):
            public = False
        else:
            log.info("publicness of %s/%s not decided: upstream answered %s", registry, repo, status)
            return None
        self.remember_public(registry, repo, public)
        return public

    def _status_with_anonymous_token(self, target: Target, repo: str, path: str, challenge: str | None) -> int:
        # No credentials of anyone go to the realm: this asks as an anonymous client.
        token = fetch_bearer_token(self.upstream, challenge, repo)
        if not token:
            return 401
        check = self.upstream.request("HEAD", target, path, [("Authorization", f"Bearer {token}"), *_PROBE_HEADERS])
        check.close()
        return check.status

    # --- the decision --------------------------------------------------------------------------

    def decide_cached(self, q: Question, offline: bool) -> Verdict | None:
        """The decision from what is known, without I/O; None when upstream must be asked.

        This is the hit path: it stays a few index lookups.
        """
        if not self.store.holds(q.registry, q.repo, q.digest):
            if offline:
                return self._unknown_member(q, "regcache is offline")
            return None
        public = self.fresh_public(q.registry, q.repo, offline)
        if public:
            return Verdict(True)
        authorization = q.authorization
        if authorization and self._granted_now(authorization, q.registry, q.repo):
            return Verdict(True)
        if offline:
            return self._unverifiable(q, "regcache is offline")
        return None

    def decide(self, q: Question, offline: bool) -> Verdict:
        """Blocking: the whole decision, asking upstream where what is known does not settle it."""
        verdict = self.decide_cached(q, offline)
        if verdict is not None:
            return verdict
        if not self.store.holds(q.registry, q.repo, q.digest):
            return self._ask_as_client(q, membership=True)
        if self.fresh_public(q.registry, q.repo) is None:
            try:
                public = self.probe_public(q.target, q.registry, q.repo, q.path)
            except UpstreamUnavailable as e:
                log.info("cannot check whether %s/%s is public: %s", q.registry, q.repo, e)
                public = None
            if public is None:
                # No definitive answer now: the last one stands (a public image stays pullable
                # while upstream is down; a 404 never turns a repository private).
                public = self.known_public(q.registry, q.repo)[0]
            if public:
                return Verdict(True)
        return self._ask_as_client(q, membership=False)

    def _ask_as_client(self, q: Question, membership: bool) -> Verdict:
        """HEAD the digest under q.repo upstream with the client's own headers."""
        try:
            resp = self.upstream.request("HEAD", q.target, q.path, list(q.headers))
            resp.close()
        except UpstreamUnavailable as e:
            if membership:
                return self._unknown_member(q, f"upstream unreachable: {e}")
            return self._unverifiable(q, f"upstream unreachable: {e}")
        if resp.status == 200:
            self.store.add_members(q.registry, q.repo, [q.digest])
            if q.authorization:
                self._grant(q.authorization, q.registry, q.repo)
            return Verdict(True)
        if resp.status >= 500 or resp.status == 429:
            if membership:
                return self._unknown_member(q, f"upstream answered {resp.status}")
            return self._unverifiable(q, f"upstream answered {resp.status}")
        keep = [(k, v) for k, v in resp.headers if k.lower() in _KEPT_HEADERS]
        return Verdict(False, resp.status, keep, f"upstream answered {resp.status} for this client")

    # --- remembered grants ----------------------------------------------------------------------

    def _granted_now(self, authorization: str, registry: str, repo: str) -> bool:
        key = (token_hash(authorization), registry, repo)
        with self._lock:
            until = self._granted.get(key)
            if until is None:
                return False
            if until <= time.monotonic():
                del self._granted[key]
                return False
            return True

    def _grant(self, authorization: str, registry: str, repo: str) -> None:
        key = (token_hash(authorization), registry, repo)
        with self._lock:
            self._granted[key] = time.monotonic() + self.auth_ttl
            self._granted.move_to_end(key)
            while len(self._granted) > MAX_GRANTS:
                self._granted.popitem(last=False)

    # --- as the services ask: without blocking the event loop ------------------------------------

    async def require(self, req: RegistryRequest, digest: str) -> None:
        """The one access rule for every answer built from cached or shared bytes. Raises
        RegistryError with what upstream would answer this client when it may not have them."""
        question = Question(req.target, req.registry, req.repository, digest, req.upstream_path(digest),
                            tuple(req.header_list(("authorization", "accept"))))
        # Known answers (a public repository that holds the digest, a remembered grant) cost no
        # thread hop: a hit never waits behind upstream I/O.
        verdict = self.decide_cached(question, req.offline)
        if verdict is None:
            assert self.workers is not None
            verdict = await self.workers.upstream_call(req.endpoint, self.decide, question, req.offline)
        if verdict.allow:
            return
        log.warning("not serving cached %s/%s %s to this client: %s",
                    req.registry, req.repository, digest, verdict.reason)
        code = oci.refusal_code(verdict.status, req.kind or oci.MANIFEST)
        raise oci.RegistryError(verdict.status, code, verdict.reason, {"digest": digest}, verdict.headers or [])

    def probe_later(self, req: RegistryRequest) -> None:
        """Learn whether a repository is public while it is being cached, so later hits (and
        hits while upstream is down) need no upstream request to decide."""
        public, checked = self.known_public(req.registry, req.repository)
        if public is not None and time.time() - checked < self.public_ttl:
            return
        assert self.workers is not None
        key = (req.registry, req.repository)
        path = req.upstream_path()

        def probe():
            try:
                self.probe_public(req.target, req.registry, req.repository, path)
            except Exception as e:  # noqa: BLE001 - best effort; decide() probes again if needed
                log.debug("public probe of %s/%s failed: %s", req.registry, req.repository, e)

        def start():
            future = self.workers.upstream_background(probe)
            future.add_done_callback(lambda _f: self._probes.forget(key, future))
            return future

        # one probe per repository at a time, however many blobs miss at once
        self._probes.join(key, start)

    # --- refusals ---------------------------------------------------------------------------------

    def _unknown_member(self, q: Question, why: str) -> Verdict:
        return Verdict(False, 404, [], f"{q.registry}/{q.repo} is not known to hold {q.digest} ({why})")

    def _unverifiable(self, q: Question, why: str) -> Verdict:
        if self.trust_clients_offline:
            return Verdict(True)
        return Verdict(False, 401, [], f"{q.registry}/{q.repo} is not known to be public and credentials "
                                       f"cannot be checked: {why}")

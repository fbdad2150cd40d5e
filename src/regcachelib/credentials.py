"""regcache's own upstream accounts (the config's `credentials:`), for its own fetches.

Docker Hub limits anonymous pulls per source IP, and a whole cluster shares one; a configured
account (a personal access token) raises the limit. regcache uses its account upstream only
where that changes nothing about who may read what:

* the client brought no credentials of its own: no Authorization, or an anonymous token (a
  JWT whose subject is empty, what Docker Hub and distribution's token servers issue to
  anonymous callers) -- a client that authenticated is served with its own credentials;
* the repository is public, decided anonymously (access.py: an anonymous 200, remembered for
  public_ttl). Content an anonymous client could pull anyway is all the account ever fetches
  for such a client; for any other repository the request goes upstream as the client's own,
  and a private repository stays refused to a client that upstream refuses.

The token's subject is read without checking its signature: a client that forges an
"anonymous" token gains nothing, it only gets public content fetched with regcache's account.

Secrets are read from their file or variable when a token is fetched and are never logged,
stored, or shown; only tokens live in memory, for TOKEN_TTL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time

from .config import Credential, CredentialError
from .request import RegistryRequest
from .upstream import Target, Upstream, UpstreamError, fetch, fetch_bearer_token, parse_bearer_challenge

log = logging.getLogger(__name__)

# Docker Hub's tokens live 300 s; a shorter life here means a token is never used expired.
TOKEN_TTL = 60.0
# After the token service refused the account (or the secret could not be read), fetches go
# as the client for this long before the account is tried again: no login storm.
FAILURE_PAUSE = 60.0
ANONYMOUS = "anonymous"


def is_anonymous(authorization: str | None) -> bool:
    """Whether a client's Authorization carries no identity: none at all, or a Bearer JWT whose
    subject is empty (an anonymous pull token)."""
    if authorization is None:
        return True
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    parts = token.strip().split(".")
    if len(parts) != 3 or len(parts[1]) > 64 * 1024:
        return False
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return False
    return isinstance(claims, dict) and claims.get("sub") == ""


def _digest(authorization: str) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest()


class UpstreamCredentials:
    """The configured accounts and the pull tokens fetched with them."""

    def __init__(self, upstream: Upstream, credentials: dict[str, Credential]):
        self.upstream = upstream
        self.credentials = dict(credentials)
        self._lock = threading.Lock()
        self._login_lock = threading.Lock()
        # (registry, repository) -> (Authorization value, monotonic time it expires)
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        # registry -> its challenge: Bearer parameters, {} for Basic, None for an open registry
        self._challenges: dict[str, dict | None] = {}
        self._paused_until: dict[str, float] = {}
        # hash of an Authorization regcache made -> (the account it is for, when it expires), for
        # the rate-limit figures
        self._issued: dict[str, tuple[str, float]] = {}

    def account(self, registry: str) -> Credential | None:
        return self.credentials.get(registry)

    def whose(self, authorization: str | None) -> str | None:
        """The configured username an Authorization value belongs to; None: not regcache's."""
        if not authorization or not self._issued:
            return None
        with self._lock:
            issued = self._issued.get(_digest(authorization))
        return issued[0] if issued else None

    def wanted(self, req: RegistryRequest) -> bool:
        """Whether req could be fetched with regcache's account (without I/O): an account for
        its registry, and a client without credentials of its own."""
        return (req.route is not None and req.registry in self.credentials and not req.offline
                and is_anonymous(req.authorization))

    def authorization_for(self, req: RegistryRequest, access) -> str | None:
        """Blocking: the Authorization to fetch req upstream with regcache's account, or None
        (fetch as the client). Only for a repository access.py knows, or now finds, public."""
        if not self.wanted(req):
            return None
        public = access.fresh_public(req.registry, req.repository)
        if public is None:
            try:
                public = access.probe_public(req.target, req.registry, req.repository, req.upstream_path())
            except UpstreamError as e:
                log.info("not using the %s account for %s: publicness unknown (%s)", req.registry, req.repository, e)
                return None
        if not public:
            return None
        return self.authorization(req.target, req.registry, req.repository)

    def authorization(self, target: Target, registry: str, repo: str) -> str | None:
        """Blocking: an Authorization value for pulling registry/repo as the configured account."""
        credential = self.credentials.get(registry)
        if credential is None:
            return None
        known, value = self._kept(registry, repo)
        if known:
            return value
        with self._login_lock:  # the layers of one pull need one login, not one each
            known, value = self._kept(registry, repo)
            if known:
                return value
            return self._log_in(target, registry, repo, credential)

    def _kept(self, registry: str, repo: str) -> tuple[bool, str | None]:
        """(True, token) while a token is kept; (True, None) while the account rests."""
        now = time.monotonic()
        with self._lock:
            kept = self._tokens.get((registry, repo))
            if kept is not None and kept[1] > now:
                return True, kept[0]
            return self._paused_until.get(registry, 0) > now, None

    def _log_in(self, target: Target, registry: str, repo: str, credential: Credential) -> str | None:
        now = time.monotonic()
        try:
            value = self._login(target, registry, repo, credential)
        except (CredentialError, UpstreamError) as e:
            value = None
            log.warning("cannot use the %s account %s: %s; fetching as the client for %ds",
                        registry, credential.username, e, FAILURE_PAUSE)
        with self._lock:
            if value is None:
                self._paused_until[registry] = now + FAILURE_PAUSE
                return None
            # Expired tokens go (a login per repository per TOKEN_TTL at most: the scan is cheap);
            # one is still told apart for a while, for answers to requests made just before.
            self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
            self._issued = {k: v for k, v in self._issued.items() if v[1] > now - TOKEN_TTL}
            self._tokens[(registry, repo)] = (value, now + TOKEN_TTL)
            self._issued[_digest(value)] = (credential.username, now + TOKEN_TTL)
        return value

    def refused(self, registry: str, status: int) -> None:
        """Upstream refused a request made with the account's token: forget its tokens, and let
        the account rest for FAILURE_PAUSE (requests go as the client meanwhile)."""
        credential = self.credentials.get(registry)
        log.warning("%s refused the %s account %s (upstream answered %d); fetching as the client for %ds",
                    registry, registry, credential.username if credential else "?", status, FAILURE_PAUSE)
        with self._lock:
            self._tokens = {k: v for k, v in self._tokens.items() if k[0] != registry}
            self._paused_until[registry] = time.monotonic() + FAILURE_PAUSE

    def _challenge(self, target: Target, registry: str) -> dict | None:
        with self._lock:
            if registry in self._challenges:
                return self._challenges[registry]
        status, headers, _ = fetch(self.upstream, "GET", target, "/v2/", [])
        header = next((v for k, v in headers if k.lower() == "www-authenticate"), None)
        if status == 401 and header:
            params = parse_bearer_challenge(header)
            challenge = params if params and params.get("realm") else ({} if header.lower().startswith("basic")
                                                                         else None)
        elif status == 200:
            challenge = None  # an open registry: nothing to log in to
        else:
            raise UpstreamError(f"{target.host}/v2/ answered {status}")
        with self._lock:
            self._challenges[registry] = challenge
        return challenge

    def _login(self, target: Target, registry: str, repo: str, credential: Credential) -> str | None:
        challenge = self._challenge(target, registry)
        if challenge is None:
            return None
        secret = credential.secret()
        if not challenge:
            return "Basic " + base64.b64encode(f"{credential.username}:{secret}".encode()).decode()
        parts = [f'realm="{challenge["realm"]}"', f'scope="repository:{repo}:pull"']
        if "service" in challenge:
            parts.append(f'service="{challenge["service"]}"')
        token = fetch_bearer_token(self.upstream, "Bearer " + ",".join(parts), repo, (credential.username, secret))
        if not token:
            raise UpstreamError(f"the token service {challenge['realm']} refused it")
        log.debug("pull token for %s/%s fetched as %s", registry, repo, credential.username)
        return f"Bearer {token}"

    async def headers(self, req: RegistryRequest, headers: list[tuple[str, str]], access, workers
                      ) -> list[tuple[str, str]]:
        """The headers to fetch req upstream with: the client's, its Authorization replaced by
        regcache's account where authorization_for allows it."""
        if not self.wanted(req):
            return headers
        own = await workers.upstream_call(req.endpoint, self.authorization_for, req, access)
        if own is None:
            return headers
        return [(k, v) for k, v in headers if k.lower() != "authorization"] + [("Authorization", own)]

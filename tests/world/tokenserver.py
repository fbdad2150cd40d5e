"""A Docker-Hub-like token service (auth.docker.io) for the test world.

Standalone script (no package imports), started by ``World`` inside the
upstream namespace::

    python tokenserver.py --listen 127.0.0.1:5100 --key token-signing.key \
        --kid ABCD:... --issuer ... --log auth.jsonl

It implements distribution's token spec:

* ``GET /token?service=...&scope=repository:NAME:pull[,push]&scope=...``
* ``POST /token`` (OAuth2 form: grant_type=password|refresh_token), as
  containerd uses when it has credentials.

Policy: anonymous callers get ``pull`` on every repository whose name does not
start with ``private/``; every ``--user`` (``testuser``/``testpass``, and
``hubuser``, the account a cache is configured with) gets ``pull,push`` on
everything; a wrong password (or unknown user) gets 401.  The JWT is RS256
signed with ``kid`` set to the libtrust key id of the signing key.

Docker Hub's pull limit: ``GET /ratelimit`` is nginx's ``auth_request`` for
registry-1.docker.io's manifest requests.  It reads the subject of the
request's Bearer token (``anonymous`` when empty), counts its manifest GETs
and answers ``ratelimit-limit``/``ratelimit-remaining`` (``N;w=21600``) and
``docker-ratelimit-source`` (the caller's address for anonymous, else the
subject) for nginx to add to the answer; limits per subject come from
``--ratelimit NAME=N`` (``*``: any user).  Nothing is refused for being over
the limit -- other tests pull as much as they like -- except while the file
``--ratelimit-file`` exists: then manifest GETs get 403 here, which nginx
turns into Docker Hub's 429 TOOMANYREQUESTS (HEADs are never limited, as on
Docker Hub).  These calls are not written to the token log.

Plain HTTP by default (nginx terminates TLS in front of it); pass
``--tls-cert/--tls-key`` to serve TLS directly.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class TokenIssuer:
    def __init__(self, key, kid: str, issuer: str, ttl: int = 300):
        self.key = key
        self.kid = kid
        self.issuer = issuer
        self.ttl = ttl
        if isinstance(key, rsa.RSAPrivateKey):
            self.alg = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            self.alg = "ES256"
        else:  # pragma: no cover
            raise ValueError("unsupported key type")

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": self.alg, "kid": self.kid}
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        ).encode()
        if self.alg == "RS256":
            sig = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            der = self.key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input.decode() + "." + b64url(sig)

    def issue(self, subject: str, audience: str, access: list[dict]) -> tuple[str, int, str]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + self.ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        issued_at = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        return self.sign(claims), self.ttl, issued_at


class Policy:
    def __init__(self, users: dict[str, str], private_prefixes: list[str]):
        self.users = users
        self.private_prefixes = private_prefixes

    def authenticate(self, user: str | None, password: str | None) -> str | None:
        """Return the subject ('' for anonymous) or None for bad credentials."""
        if user is None:
            return ""
        if self.users.get(user) == password and password is not None:
            return user
        return None

    def allowed(self, subject: str, rtype: str, name: str) -> set[str]:
        if rtype != "repository":
            return set()
        if subject:
            return {"pull", "push"}
        if any(name.startswith(p) for p in self.private_prefixes):
            return set()
        return {"pull"}

    def grant(self, subject: str, scopes: list[str]) -> list[dict]:
        access: list[dict] = []
        for scope in scopes:
            for one in scope.split(" "):
                if not one:
                    continue
                # type:name:actions; name may contain ':' (port) -> split at ends
                parts = one.split(":")
                if len(parts) < 3:
                    continue
                rtype, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
                wanted = [a for a in actions.split(",") if a]
                if "*" in wanted:
                    wanted = ["pull", "push"]
                ok = self.allowed(subject, rtype, name)
                got = [a for a in wanted if a in ok]
                access.append({"type": rtype, "name": name, "actions": got})
        return access


class Handler(BaseHTTPRequestHandler):
    server_version = "regcache-world-auth/1.0"
    protocol_version = "HTTP/1.1"

    # set on the class by main()
    issuer: TokenIssuer
    policy: Policy
    default_service: str
    log_path: str | None
    log_lock = threading.Lock()
    limits: dict[str, int] = {}
    pulls: dict[str, int] = {}  # subject ('anonymous') -> manifest GETs counted
    ratelimit_file: str | None = None

    def log_message(self, fmt, *args):  # quiet stderr
        pass

    def _log(self, status: int, subject, access) -> None:
        if not self.log_path:
            return
        rec = {
            "time": time.time(),
            "method": self.command,
            "path": self.path,
            "auth": "Authorization" in self.headers,
            "status": status,
            "subject": subject,
            "access": access,
        }
        line = json.dumps(rec) + "\n"
        with self.log_lock:
            with open(self.log_path, "a") as f:
                f.write(line)

    def _send_json(self, status: int, obj: dict, extra_headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _basic(self) -> tuple[str | None, str | None]:
        h = self.headers.get("Authorization")
        if not h:
            return None, None
        scheme, _, rest = h.partition(" ")
        if scheme.lower() != "basic":
            return None, None
        try:
            user, _, pw = base64.b64decode(rest.strip()).decode().partition(":")
        except Exception:
            return "", ""
        return user, pw

    def _unauthorized(self, subject=None) -> None:
        self._log(401, subject, None)
        self._send_json(
            401,
            {"details": "incorrect username or password"},
            {"WWW-Authenticate": 'Basic realm="regcache test world"'},
        )

    def _issue(self, subject: str, service: str, scopes: list[str], extra: dict | None = None):
        access = self.policy.grant(subject, scopes)
        token, ttl, issued_at = self.issuer.issue(subject, service, access)
        body = {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued_at}
        body.update(extra or {})
        self._log(200, subject, access)
        self._send_json(200, body)

    def _bearer_subject(self) -> str | None:
        """The subject of the request's Bearer token, unverified ('' anonymous); None without one."""
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        parts = token.strip().split(".")
        if scheme.lower() != "bearer" or len(parts) != 3:
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except ValueError:
            return None
        return claims.get("sub", "") if isinstance(claims, dict) else None

    def _ratelimit(self) -> None:
        """nginx's auth_request for a manifest request: count it, report the figures."""
        subject = self._bearer_subject()
        if subject is None:
            self._send_json(200, {})
            return
        name = subject or "anonymous"
        limit = self.limits.get(name) or self.limits.get("anonymous" if not subject else "*") or 100
        method = self.headers.get("X-Original-Method", "GET")
        with self.log_lock:
            if method == "GET":
                self.pulls[name] = self.pulls.get(name, 0) + 1
            remaining = max(0, limit - self.pulls.get(name, 0))
        source = (self.headers.get("X-Real-IP") or "") if not subject else subject
        limited = method == "GET" and self.ratelimit_file and os.path.exists(self.ratelimit_file)
        headers = {"ratelimit-limit": f"{limit};w=21600",
                   "ratelimit-remaining": f"{0 if limited else remaining};w=21600",
                   "docker-ratelimit-source": source}
        self._send_json(403 if limited else 200, {}, headers)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/ratelimit":
            self._ratelimit()
            return
        if url.path == "/healthz":
            self._send_json(200, {"ok": True})
            return
        if url.path != "/token":
            self._log(404, None, None)
            self._send_json(404, {"error": "not found"})
            return
        q = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        user, pw = self._basic()
        subject = self.policy.authenticate(user, pw)
        if subject is None:
            self._unauthorized(user)
            return
        service = (q.get("service") or [self.default_service])[0]
        extra = {}
        if subject and (q.get("offline_token") or [""])[0] == "true":
            extra["refresh_token"] = "refresh-" + subject
        self._issue(subject, service, q.get("scope", []), extra)

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self._log(404, None, None)
            self._send_json(404, {"error": "not found"})
            return
        n = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(n).decode(), keep_blank_values=True)
        grant = (form.get("grant_type") or [""])[0]
        service = (form.get("service") or [self.default_service])[0]
        scopes = []
        for s in form.get("scope", []):
            scopes.extend(s.split(" "))
        if grant == "password":
            subject = self.policy.authenticate(
                (form.get("username") or [None])[0], (form.get("password") or [None])[0]
            )
            if not subject:
                self._unauthorized((form.get("username") or [None])[0])
                return
        elif grant == "refresh_token":
            rt = (form.get("refresh_token") or [""])[0]
            subject = rt[len("refresh-") :] if rt.startswith("refresh-") else None
            if not subject or subject not in self.policy.users:
                self._unauthorized(None)
                return
        else:
            self._log(400, None, None)
            self._send_json(400, {"error": "unsupported_grant_type"})
            return
        extra = {"refresh_token": "refresh-" + subject, "scope": " ".join(scopes)}
        self._issue(subject, service, scopes, extra)

    do_HEAD = do_GET


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:5100")
    ap.add_argument("--key", required=True, help="PEM private key (RSA or P-256)")
    ap.add_argument("--kid", required=True)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--service", default="registry.docker.io")
    ap.add_argument("--user", action="append", default=[], help="name:password")
    ap.add_argument("--private-prefix", action="append", default=[])
    ap.add_argument("--ttl", type=int, default=300)
    ap.add_argument("--log")
    ap.add_argument("--ratelimit", action="append", default=[], help="NAME=N pulls per window (anonymous, *)")
    ap.add_argument("--ratelimit-file", help="while this file exists, manifest GETs are over the limit (429)")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    a = ap.parse_args(argv)

    with open(a.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    Handler.issuer = TokenIssuer(key, a.kid, a.issuer, a.ttl)
    Handler.policy = Policy(
        dict(u.split(":", 1) for u in a.user), a.private_prefix or ["private/"]
    )
    Handler.default_service = a.service
    Handler.log_path = a.log
    Handler.limits = {k: int(v) for k, v in (r.split("=", 1) for r in a.ratelimit)}
    Handler.ratelimit_file = a.ratelimit_file

    host, _, port = a.listen.rpartition(":")
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    if a.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"token service listening on {a.listen}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

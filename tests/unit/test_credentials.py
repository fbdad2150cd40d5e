"""credentials.py and the config's `credentials:`: regcache's own upstream account is used only
for clients without credentials of their own, only for repositories known public, and its
secret is never held in the config."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from regcachelib import oci
from regcachelib.config import ConfigError, CredentialError, parse_config
from regcachelib.credentials import UpstreamCredentials, is_anonymous
from regcachelib.request import RegistryRequest
from regcachelib.upstream import Target

SECRET = "dckr_pat_not-a-real-one"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "cfg.yaml")
    return str(ei.value)


def test_credentials_from_a_file_or_an_environment_variable(tmp_path, monkeypatch):
    secret_file = tmp_path / "hub"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("QUAY_TOKEN", "quay-secret")
    config = parse_config(f"credentials:\n  registry-1.docker.io: {{username: me, password_file: {secret_file}}}\n"
                          "  quay.io: {username: robot, token_env: QUAY_TOKEN}\n")
    hub, quay = config.credentials["docker.io"], config.credentials["quay.io"]  # Hub aliases folded
    assert (hub.username, hub.secret()) == ("me", SECRET)  # the file's trailing newline is not part of it
    assert (quay.username, quay.secret()) == ("robot", "quay-secret")
    config.check_credentials()
    # the config holds where the secret is, never the secret
    assert SECRET not in repr(config) and "quay-secret" not in repr(config)


def test_inline_secrets_and_malformed_entries_are_refused_without_echoing_the_secret():
    message = error_of(f"credentials:\n  docker.io:\n    username: me\n    password: {SECRET}\n")
    assert "cfg.yaml:2" in message and "inline password refused" in message and "password_file" in message
    assert SECRET not in message
    assert "inline token refused" in error_of(f"credentials: {{quay.io: {{username: r, token: {SECRET}}}}}\n")
    assert "exactly one of" in error_of("credentials: {quay.io: {username: r}}\n")
    assert "exactly one of" in error_of("credentials: {quay.io: {username: r, token_env: A, password_env: B}}\n")
    assert "username" in error_of("credentials: {quay.io: {password_env: A}}\n")
    assert "unknown key 'realm'" in error_of("credentials: {quay.io: {username: r, token_env: A, realm: x}}\n")
    assert "given twice" in error_of("credentials: {docker.io: {username: a, token_env: A}, "
                                     "index.docker.io: {username: b, token_env: B}}\n")


def test_an_unreadable_secret_is_reported_at_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    for entry in (f"password_file: {tmp_path / 'missing'}", "token_env: NO_SUCH_TOKEN"):
        config = parse_config(f"credentials:\n  quay.io: {{username: r, {entry}}}\n")
        with pytest.raises(CredentialError, match="credentials for quay.io"):
            config.check_credentials()


def _jwt(claims: dict) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2ln"


def test_anonymous_is_no_authorization_or_a_token_without_subject():
    assert is_anonymous(None)
    assert is_anonymous("Bearer " + _jwt({"sub": "", "access": []}))
    assert not is_anonymous("Bearer " + _jwt({"sub": "testuser"}))
    assert not is_anonymous("Bearer " + _jwt({"access": []}))  # no subject claim: not known to be anonymous
    assert not is_anonymous("Basic " + base64.b64encode(b"u:p").decode())
    assert not is_anonymous("Bearer opaque-token")
    assert not is_anonymous("Bearer a.!!!.c")


class FakeAccess:
    def __init__(self, public):
        self.public = public  # None: not known; probe answers probed
        self.probed = True
        self.probes = 0

    def fresh_public(self, registry, repo, offline=False):
        return self.public

    def probe_public(self, target, registry, repo, path):
        self.probes += 1
        return self.probed


class CountingCredentials(UpstreamCredentials):
    def __init__(self, credentials):
        super().__init__(None, credentials)
        self.logins = []

    def _login(self, target, registry, repo, credential):
        self.logins.append((registry, repo))
        return f"Bearer token-for-{repo}"


def request(authorization=None, registry="docker.io", repo="library/small") -> RegistryRequest:
    path = f"/v2/{repo}/manifests/1"
    headers = (("Authorization", authorization),) if authorization else ()
    return RegistryRequest(registry, Target("registry-1.docker.io"), path, "GET", oci.parse_route(registry, path),
                           headers, "10.0.0.1", False, False)


@pytest.fixture
def credentials(tmp_path):
    secret = tmp_path / "hub"
    secret.write_text(SECRET)
    config = parse_config(f"credentials: {{docker.io: {{username: hubuser, password_file: {secret}}}}}\n")
    return CountingCredentials(config.credentials)


def test_the_account_is_used_for_anonymous_clients_on_public_repositories_only(credentials):
    public = FakeAccess(True)
    assert credentials.authorization_for(request(), public) == "Bearer token-for-library/small"
    anonymous_token = "Bearer " + _jwt({"sub": ""})
    assert credentials.authorization_for(request(anonymous_token), public) == "Bearer token-for-library/small"
    assert credentials.logins == [("docker.io", "library/small")]  # the token is kept
    assert credentials.whose("Bearer token-for-library/small") == "hubuser"
    assert credentials.whose(anonymous_token) is None

    # a client with credentials of its own is served with them
    assert credentials.authorization_for(request("Bearer " + _jwt({"sub": "testuser"})), public) is None
    # no account for this registry
    assert credentials.authorization_for(request(registry="quay.io"), public) is None
    # a repository known private, or one an anonymous probe does not find public: as the client
    assert credentials.authorization_for(request(repo="private/secret"), FakeAccess(False)) is None
    unknown = FakeAccess(None)
    unknown.probed = None
    assert credentials.authorization_for(request(repo="private/other"), unknown) is None
    assert unknown.probes == 1
    unknown.probed = True
    assert credentials.authorization_for(request(repo="library/new"), unknown) == "Bearer token-for-library/new"
    assert credentials.logins == [("docker.io", "library/small"), ("docker.io", "library/new")]


def test_the_proxy_refuses_to_start_with_a_secret_it_cannot_read(tmp_path, monkeypatch):
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    from regcachelib.addon import RegistryCache

    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    cfg = tmp_path / "regcache.yaml"
    cfg.write_text("credentials: {docker.io: {username: hubuser, token_env: NO_SUCH_TOKEN}}\n")
    rc = RegistryCache()
    with taddons.context(rc) as tctx:
        with pytest.raises(exceptions.OptionsError, match="credentials for docker.io: environment variable "
                                                          "NO_SUCH_TOKEN is empty"):
            tctx.configure(rc, regcache_dir=str(tmp_path / "cache"), regcache_config=str(cfg))
        monkeypatch.setenv("NO_SUCH_TOKEN", SECRET)
        tctx.configure(rc, regcache_dir=str(tmp_path / "cache"), regcache_config=str(cfg))
        try:
            assert rc.services.credentials.account("docker.io").username == "hubuser"
        finally:
            asyncio.run(rc.done())

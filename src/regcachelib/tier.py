"""A cache tier: several regcache nodes sharing one S3 bucket (content) and one Redis (knowledge).

With a `tier:` section in the config a node keeps its local store as the hot layer and, on a
local miss, looks in the shared layer before it asks upstream:

    S3      blobs/sha256/<hex>, manifests/sha256/<hex> (Content-Type kept as object metadata).
            Immutable by digest. A blob is uploaded only from a local file whose digest was
            verified; a PUT (or a multipart complete) is atomic, a failed upload is aborted:
            nothing partial is ever visible under a key.
    Redis   what nodes learn that others need: membership (registry, repo) -> digests,
            publicness verdicts with their time, tag -> {media type: (digest, checked)}, and
            leases (SET NX PX, renewed) so one node of the tier fetches a blob from upstream.
            A lease names the node and its peer listener: the other nodes stream the fill in
            progress from there (URLs signed with regcache:peer-key, made once with SET NX).
    peers   GET /_regcache/peer/<digest> on a node's peer_port: its fill in progress (or its
            stored blob), for a URL signed with the tier's key; a follower whose stream breaks
            goes on from that byte with whoever takes over (PeerBlobResponse).

Redis because these are small per-request reads on the hit path that need an atomic
set-if-absent (a lease); S3 has neither cheap small reads nor conditional writes on every
implementation. Either backend down: the node serves its local layer and passes misses through
to upstream, with one log line per outage; when it answers again sharing resumes.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from . import oci

log = logging.getLogger(__name__)

# How long a lease lives without renewal: a dead leader's followers take over within this.
LEASE_MS = 5000
# A backend that failed is not asked again for this long (every request would wait on it).
RETRY_AFTER = 2.0
# Followers look for the leader's object this often.
POLL_SECONDS = 0.25
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
KEY_PREFIX = "regcache:"
# Peer streaming: a follower reads the leader's fill in progress from the leader's peer listener.
PEER_PORT = 5081
PEER_PREFIX = "/_regcache/peer/"
PEER_KEY = f"{KEY_PREFIX}peer-key"
PEER_KEY_TTL = 60.0  # a node re-reads the tier's peer key this often (a flushed Redis gets a new one)
PEER_URL_TTL = 60  # a signed peer URL is good this long after it was made (it is used at once)
PEER_CONNECT_TIMEOUT = 2.0
# No byte from the leader for this long: the stream is taken for broken and the follower takes over
# (longer than the default upstream_timeout, so a live leader ends a stalled fill first). A leader
# killed on a live host is noticed at once (its kernel resets the connection).
PEER_READ_TIMEOUT = 45.0


@dataclass(frozen=True)
class TierConfig:
    endpoint: str | None
    bucket: str
    region: str | None
    access_key_env: str | None
    secret_key_env: str | None
    redis_url: str
    node: str
    redirect: bool = False  # answer a blob the bucket holds with a presigned URL (bytes bypass the node)
    redirect_ttl: float = 60.0
    # where other nodes stream a fill in progress from: this node's peer listener (0: none, followers
    # wait for the object) and the address they reach it on (None: the one this node reaches Redis from)
    peer_port: int = PEER_PORT
    peer_address: str | None = None


def parse_tier(value) -> TierConfig:
    """The `tier:` config section (config.py calls this; errors name the key)."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping with s3:, redis: and optionally node:")
    known = {"s3", "redis", "node", "redirect", "peer_port", "peer_address"}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(known))})")
    peer_port = value.get("peer_port", PEER_PORT)
    if not isinstance(peer_port, int) or isinstance(peer_port, bool) or not 0 <= peer_port <= 65535:
        raise ValueError("peer_port: expected a port number (0: no peer streaming)")
    peer_address = value.get("peer_address")
    if peer_address is not None and (not isinstance(peer_address, str) or not peer_address
                                     or any(c.isspace() or c in "/?#@" for c in peer_address)):
        raise ValueError("peer_address: expected a host name or IP address")
    redirect = value.get("redirect", False)
    if not isinstance(redirect, bool):
        raise ValueError("redirect: expected true or false")
    s3 = value.get("s3")
    if not isinstance(s3, dict) or not isinstance(s3.get("bucket"), str) or not s3["bucket"]:
        raise ValueError("s3: expected a mapping with at least bucket:")
    s3_unknown = set(s3) - {"endpoint", "bucket", "region", "access_key_env", "secret_key_env"}
    if s3_unknown:
        raise ValueError(f"s3: unknown key(s) {sorted(s3_unknown)}")
    for k in ("endpoint", "region", "access_key_env", "secret_key_env"):
        if s3.get(k) is not None and not isinstance(s3[k], str):
            raise ValueError(f"s3.{k}: expected a string")
    redis = value.get("redis")
    if not isinstance(redis, dict) or not isinstance(redis.get("url"), str) or not redis["url"]:
        raise ValueError("redis: expected a mapping with url: (redis://host:6379/0)")
    node = value.get("node") or f"{socket.gethostname()}-{os.getpid()}"
    if not isinstance(node, str) or any(c.isspace() for c in node):
        raise ValueError("node: expected a string without spaces")
    return TierConfig(s3.get("endpoint"), s3["bucket"], s3.get("region"), s3.get("access_key_env"),
                      s3.get("secret_key_env"), redis["url"], node, redirect, peer_port=peer_port,
                      peer_address=peer_address)


def blob_object(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def manifest_object(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"manifests/{algorithm}/{hexpart}"


class Backend:
    """Health of one shared backend: one log line and one counted outage per outage, and no
    request waits on a backend that just failed (it is retried after RETRY_AFTER)."""

    def __init__(self, name: str, what: str):
        self.name = name
        self.what = what
        self.down_since: float | None = None
        self._retry_at = 0.0
        self.outages = 0
        self._lock = threading.Lock()

    @property
    def usable(self) -> bool:
        return self.down_since is None or time.monotonic() >= self._retry_at

    def failed(self, error: Exception) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + RETRY_AFTER
            if self.down_since is not None:
                return
            self.down_since = time.time()
            self.outages += 1
        log.warning("tier %s unreachable (%s: %s): serving the local layer, misses go upstream",
                    self.what, error.__class__.__name__, str(error)[:200])

    def ok(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            log.info("tier %s reachable again after %.0f s: sharing resumes", self.what, time.time() - since)


class Lease:
    """A held Redis lease on one digest, renewed in the background until released."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, tier: "Tier", key: str, token: str):
        self.tier = tier
        self.key = key
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="regcache-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_MS / 3000):
            self.tier._redis_call(lambda r: r.eval(self._RENEW, 1, self.key, self.token, LEASE_MS), None)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.tier._redis_call(lambda r: r.eval(self._RELEASE, 1, self.key, self.token), None)


@dataclass(frozen=True)
class LeaseInfo:
    token: str  # the whole lease value: a new one means a new leader (or the same node again)
    node: str
    peer_base: str | None  # http://address:port of the leader's peer listener

    @classmethod
    def parse(cls, value: str) -> "LeaseInfo":
        head, _, base = value.partition(" ")
        return cls(value, head.rsplit(":", 1)[0], base or None)


def _peer_mac(key: bytes, digest: str, expires: int) -> str:
    return hmac.new(key, f"{digest}\n{expires}".encode(), hashlib.sha256).hexdigest()


def local_address_towards(url: str) -> str:
    """The local address this host reaches the host of url from (no packet is sent): the
    address other members, which reach the same Redis, most likely reach this node on."""
    parts = urlsplit(url)
    try:
        with socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET,
                           socket.SOCK_DGRAM) as s:
            s.connect((parts.hostname or "127.0.0.1", parts.port or 6379))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class NoLease:
    """Redis is down: no coordination, this node fetches on its own."""

    def release(self) -> None:
        pass


class Tier:
    def __init__(self, config: TierConfig, s3=None, redis_client=None):
        self.config = config
        self.s3_health = Backend("s3", f"object store {config.endpoint or 'S3'} bucket {config.bucket}")
        self.redis_health = Backend("redis", "knowledge store (Redis)")
        self.s3 = s3 if s3 is not None else self._make_s3(config)
        self.redis = redis_client if redis_client is not None else self._make_redis(config)
        # bytes this node read from the shared store and uploaded to it
        self.bytes_read = 0
        self.bytes_uploaded = 0
        self._bucket_checked = False
        # http://address:port of this node's peer listener once it serves peers (named in its leases)
        self.peer_base: str | None = None
        self._peer_key: bytes | None = None
        self._peer_key_read = float("-inf")
        self._peer_key_lock = threading.Lock()

    # --- clients ---------------------------------------------------------------------------

    @staticmethod
    def _make_s3(config: TierConfig):
        import boto3
        from botocore.config import Config as BotoConfig

        kwargs = {}
        if config.access_key_env or config.secret_key_env:
            # Named variables; never logged. Unset ones fall back to boto3's own chain.
            key, secret = os.environ.get(config.access_key_env or ""), os.environ.get(config.secret_key_env or "")
            if key and secret:
                kwargs.update(aws_access_key_id=key, aws_secret_access_key=secret)
        boto = BotoConfig(
            s3={"addressing_style": "path"}, signature_version="s3v4",
            retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=30,
            max_pool_connections=32,
            # boto3 >= 1.36 sends aws-chunked bodies with CRC trailers by default; Ceph RGW (and
            # other S3-compatible stores) do not all understand them
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        return boto3.client("s3", endpoint_url=config.endpoint, region_name=config.region, config=boto, **kwargs)

    @staticmethod
    def _make_redis(config: TierConfig):
        import redis

        return redis.Redis.from_url(config.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def _s3_call(self, fn, default, missing=None):
        """fn(s3) guarded: a 404 gives missing, an outage gives default (and is logged once)."""
        if not self.s3_health.usable:
            return default
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result = fn(self.s3)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                self.s3_health.ok()
                return missing
            if status is not None and status < 500:
                log.warning("tier object store refused a request: %s %s", status, code)
                return default
            self.s3_health.failed(e)
            return default
        except (BotoCoreError, OSError) as e:
            self.s3_health.failed(e)
            return default
        self.s3_health.ok()
        return result

    def _redis_call(self, fn, default):
        if not self.redis_health.usable:
            return default
        import redis

        try:
            result = fn(self.redis)
        except (redis.RedisError, OSError) as e:
            self.redis_health.failed(e)
            return default
        self.redis_health.ok()
        return result

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (a fresh tier); other errors are outages."""
        def create(s3):
            try:
                s3.head_bucket(Bucket=self.config.bucket)
            except Exception:  # noqa: BLE001 - missing or unreachable: create tells which
                s3.create_bucket(Bucket=self.config.bucket)
            return True

        self._bucket_checked = bool(self._s3_call(create, False))

    # --- content -----------------------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        """Size of a shared blob; None when the tier does not have it (or is down)."""
        head = self._s3_call(lambda s3: s3.head_object(Bucket=self.config.bucket, Key=blob_object(digest)), None)
        return int(head["ContentLength"]) if head else None

    def has_blob(self, digest: str) -> bool:
        return self.blob_size(digest) is not None

    def open_blob(self, digest: str, start: int = 0):
        """(body stream, size, content type) of a shared blob from byte start on (size counts
        from there), or None (missing or store down)."""
        ranged = {"Range": f"bytes={start}-"} if start else {}
        got = self._s3_call(lambda s3: s3.get_object(Bucket=self.config.bucket, Key=blob_object(digest), **ranged),
                            None)
        if not got:
            return None
        # when a blob was last read: the shared store's gc removes the least recently read first
        self._redis_call(lambda r: r.hset(f"{KEY_PREFIX}read", digest, time.time()), None)
        return got["Body"], int(got["ContentLength"]), got.get("ContentType") or "application/octet-stream"

    def upload_blob(self, digest: str, fileobj, size: int, content_type: str) -> bool:
        """Upload a verified local blob unless the tier has it. Multipart above 64 MiB: boto3
        aborts a multipart upload that fails, and until its complete nothing is visible."""
        if self.has_blob(digest) or not self.s3_health.usable:
            return False
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                                  max_concurrency=2)

        def put(s3):
            s3.upload_fileobj(fileobj, self.config.bucket, blob_object(digest),
                              ExtraArgs={"ContentType": content_type}, Config=transfer)
            return True

        try:
            done = self._s3_call(put, False)
        except Exception as e:  # noqa: BLE001 - boto3's transfer wraps errors (S3UploadFailedError)
            self.s3_health.failed(e)
            done = False
        if done:
            self.bytes_uploaded += size
            log.info("tier: uploaded blob %s (%d bytes)", digest, size)
        return bool(done)

    def presigned_blob_url(self, digest: str) -> str | None:
        """A short-lived GET URL of a shared blob, or None when the bucket does not hold it."""
        if self.blob_size(digest) is None:
            return None
        url = self._s3_call(lambda s3: s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": blob_object(digest)},
            ExpiresIn=int(self.config.redirect_ttl)), None)
        if url:
            self._redis_call(lambda r: r.hset(f"{KEY_PREFIX}read", digest, time.time()), None)
        return url

    def remove_blob(self, digest: str) -> None:
        self._s3_call(lambda s3: s3.delete_object(Bucket=self.config.bucket, Key=blob_object(digest)), None)

    def get_manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, body) of a shared manifest whose body hashes to its digest, or None."""
        def get(s3):
            got = s3.get_object(Bucket=self.config.bucket, Key=manifest_object(digest))
            return got.get("ContentType") or "", got["Body"].read()

        found = self._s3_call(get, None)
        if not found:
            return None
        media_type, body = found
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            log.warning("tier: shared manifest %s does not match its digest; ignored", digest)
            return None
        return oci.manifest_media_type(body, media_type), body

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        self._s3_call(lambda s3: s3.put_object(Bucket=self.config.bucket, Key=manifest_object(digest), Body=body,
                                               ContentType=media_type), None)

    def abort_stale_uploads(self) -> int:
        """Abort multipart uploads nobody holds a lease for (debris of a node killed mid-upload)."""
        listing = self._s3_call(lambda s3: s3.list_multipart_uploads(Bucket=self.config.bucket), None) or {}
        aborted = 0
        for upload in listing.get("Uploads", []):
            key = upload["Key"]
            parts = key.split("/")
            if len(parts) == 3 and self._redis_call(lambda r: r.exists(self._lease_key(f"{parts[1]}:{parts[2]}")), 1):
                continue  # someone is uploading it right now
            self._s3_call(lambda s3: s3.abort_multipart_upload(Bucket=self.config.bucket, Key=key,
                                                               UploadId=upload["UploadId"]), None)
            aborted += 1
        if aborted:
            log.info("tier: aborted %d unfinished multipart upload(s) of dead nodes", aborted)
        return aborted

    # --- leases --------------------------------------------------------------------------------

    @staticmethod
    def _lease_key(digest: str) -> str:
        return f"{KEY_PREFIX}lease:{digest}"

    def try_lease(self, digest: str):
        """A Lease when this node may fetch the digest (NoLease when Redis is down), None when
        another node holds it."""
        if not self.redis_health.usable:
            return NoLease()
        # "node:nonce", and where followers stream the fill from while it runs
        token = f"{self.config.node}:{os.urandom(6).hex()}"
        if self.peer_base and self.peer_key() is not None:
            token += f" {self.peer_base}"
        key = self._lease_key(digest)
        got = self._redis_call(lambda r: r.set(key, token, nx=True, px=LEASE_MS), "down")
        if got == "down":
            return NoLease()
        return Lease(self, key, token) if got else None

    def lease_info(self, digest: str) -> "LeaseInfo | None":
        """Who holds the digest's lease and where its fill streams from; None: nobody."""
        value = self._redis_call(lambda r: r.get(self._lease_key(digest)), None)
        return LeaseInfo.parse(value.decode(errors="replace")) if value else None

    def lease_holder(self, digest: str) -> str | None:
        info = self.lease_info(digest)
        return info.node if info else None

    # --- peer streaming -----------------------------------------------------------------------------

    def serve_peers(self, port: int) -> str:
        """This node's peer listener is up on port: its leases name it from now on."""
        address = self.config.peer_address or local_address_towards(self.config.redis_url)
        host = f"[{address}]" if ":" in address else address
        self.peer_base = f"http://{host}:{port}"
        return self.peer_base

    def peer_key(self, refresh: bool = False) -> bytes | None:
        """The tier's shared key for peer URLs: created once by whichever node needs it first
        (SET NX), read by every other; re-read after PEER_KEY_TTL. None while Redis is down."""
        with self._peer_key_lock:
            if not refresh and self._peer_key is not None and time.monotonic() - self._peer_key_read < PEER_KEY_TTL:
                return self._peer_key

            def get(r):
                r.set(PEER_KEY, os.urandom(32).hex(), nx=True)
                return r.get(PEER_KEY)

            value = self._redis_call(get, None)
            if value:
                self._peer_key, self._peer_key_read = bytes(value), time.monotonic()
            return self._peer_key

    def peer_url(self, base: str, digest: str, now: float | None = None) -> str | None:
        """The signed URL of a leader's fill in progress (base from its lease), or None (no key)."""
        key = self.peer_key()
        if key is None:
            return None
        expires = int((now if now is not None else time.time()) + PEER_URL_TTL)
        return f"{base}{PEER_PREFIX}{digest}?exp={expires}&sig={_peer_mac(key, digest, expires)}"

    def verify_peer(self, target: str, now: float | None = None) -> tuple[str | None, str]:
        """(digest, "") when a request on the peer listener carries a good signature, else
        (None, why not). Runs on the event loop: only the key read earlier is used; a mismatch
        has it re-read in the background (Redis was flushed and another node made a new one)."""
        parts = urlsplit(target)
        if not parts.path.startswith(PEER_PREFIX):
            return None, "not a peer URL"
        digest = oci.valid_digest(parts.path[len(PEER_PREFIX):])
        query = parse_qs(parts.query)
        try:
            expires, sig = int(query["exp"][0]), query["sig"][0]
        except (KeyError, ValueError, IndexError):
            return None, "unsigned peer URL"
        key = self._peer_key
        if digest is None or key is None or not sig.isascii() or not hmac.compare_digest(
                sig, _peer_mac(key, digest, expires)):
            if time.monotonic() - self._peer_key_read > 5.0:
                self._peer_key_read = time.monotonic()
                threading.Thread(target=self.peer_key, args=(True,), name="regcache-peer-key", daemon=True).start()
            return None, "peer URL not signed with the tier's key"
        if expires < (now if now is not None else time.time()):
            return None, "peer URL expired"
        return digest, ""

    # --- shared knowledge ------------------------------------------------------------------------

    @staticmethod
    def _repo_key(kind: str, registry: str, repo: str) -> str:
        return f"{KEY_PREFIX}{kind}:{registry}/{repo}"

    def holds(self, registry: str, repo: str, digest: str) -> bool:
        return bool(self._redis_call(lambda r: r.sismember(self._repo_key("member", registry, repo), digest), False))

    def add_members(self, registry: str, repo: str, digests: list[str]) -> None:
        if digests:
            self._redis_call(lambda r: r.sadd(self._repo_key("member", registry, repo), *digests), None)

    def get_public(self, registry: str, repo: str) -> tuple[bool | None, float]:
        value = self._redis_call(lambda r: r.get(self._repo_key("public", registry, repo)), None)
        if not value:
            return None, 0.0
        try:
            public, checked = json.loads(value)
            return bool(public), float(checked)
        except (ValueError, TypeError):
            return None, 0.0

    def set_public(self, registry: str, repo: str, public: bool, checked: float) -> None:
        self._redis_call(lambda r: r.set(self._repo_key("public", registry, repo), json.dumps([public, checked])),
                         None)

    def tag_entries(self, registry: str, repo: str, tag: str) -> dict[str, tuple[str, float]]:
        """{media type: (digest, checked)} as the tier knows the tag."""
        raw = self._redis_call(lambda r: r.hgetall(self._repo_key("tag", registry, f"{repo}:{tag}")), None) or {}
        entries = {}
        for media_type, value in raw.items():
            try:
                digest, checked = json.loads(value)
                entries[media_type.decode()] = (str(digest), float(checked))
            except (ValueError, TypeError, UnicodeDecodeError):
                continue
        return entries

    def set_tag(self, registry: str, repo: str, tag: str, media_type: str, digest: str, checked: float) -> None:
        self._redis_call(lambda r: r.hset(self._repo_key("tag", registry, f"{repo}:{tag}"), media_type,
                                          json.dumps([digest, checked])), None)

    def status(self) -> dict:
        return {"node": self.config.node,
                "s3": {"up": self.s3_health.down_since is None, "outages": self.s3_health.outages},
                "redis": {"up": self.redis_health.down_since is None, "outages": self.redis_health.outages},
                "bytes_read": self.bytes_read, "bytes_uploaded": self.bytes_uploaded}


# --- the fills' source: the tier first, one upstream fetch per blob across the tier ---------------

class SharedBlobResponse:
    """A blob read from the object store, as a Fill reads an upstream response. The Fill hashes
    and verifies it like any download: a wrong byte in the bucket never reaches a client whole."""

    status = 200
    reason = "OK"
    from_tier = True

    def __init__(self, tier: Tier, body, length: int, content_type: str, digest: str | None = None,
                 size: int | None = None):
        self.tier = tier
        self._body = body
        self._digest = digest
        self._hasher = hashlib.sha256() if digest and digest.startswith("sha256:") else None
        self.headers = [("Content-Type", content_type), ("Content-Length", str(length))]
        self.size = size if size is not None else length  # of the whole blob (a take-over reads a range)
        self.url = ""

    def end_deadline(self) -> None:
        pass

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def content_length(self) -> int | None:
        return int(self.header("content-length"))

    def read1(self, n: int) -> bytes:
        data = self._body.read(n)
        self.tier.bytes_read += len(data)
        if self._hasher is not None:
            self._hasher.update(data)
            if not data and "sha256:" + self._hasher.hexdigest() != self._digest:
                # The fill refuses these bytes too; without the object the next request goes upstream.
                log.warning("tier: shared blob %s does not match its digest; removing it", self._digest)
                self.tier.remove_blob(self._digest)
                self._hasher = None
        return data

    read = read1

    def more_ready(self) -> bool:
        return False

    def read_all(self, limit: int) -> bytes:
        return self._body.read(limit)

    def close(self) -> None:
        self._body.close()

    def discard(self) -> None:
        self._body.close()


class LeadingResponse:
    """An upstream response this node fetches for the whole tier, under a lease. When the Fill
    is done with it (close, after the client was served), a verified blob is uploaded from the
    local store and the lease released; followers on other nodes then read the object."""

    def __init__(self, resp, tier: Tier, store, digest: str, lease):
        self._resp = resp
        self._tier = tier
        self._store = store
        self._digest = digest
        self._lease = lease

    def __getattr__(self, name):
        return getattr(self._resp, name)

    def close(self) -> None:
        try:
            self._resp.close()
            self._share()
        finally:
            self._lease.release()

    def discard(self) -> None:
        try:
            self._resp.discard()
        finally:
            self._lease.release()

    def _share(self) -> None:
        if self._resp.status != 200:
            return
        f = self._store.open_blob(self._digest)  # stored only once verified (fill.py)
        if f is None:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            content_type = self._resp.header("content-type") or "application/octet-stream"
            try:
                self._tier.upload_blob(self._digest, f, size, content_type)
            except Exception as e:  # noqa: BLE001 - sharing is best effort; the pull is served
                log.warning("tier: blob %s not uploaded: %s", self._digest, e)


class PeerStream:
    """The body of a leader's fill in progress, read from its peer listener (a plain HTTP GET
    of its signed peer URL), from byte start on."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, size: int, node: str):
        self._conn = conn
        self._resp = resp
        self.size = size  # of the whole blob
        self.node = node

    @classmethod
    def open(cls, url: str, node: str, start: int = 0) -> "PeerStream":
        """Raises OSError / http.client.HTTPException / PeerRefused when the leader does not stream it."""
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=PEER_CONNECT_TIMEOUT)
        try:
            conn.connect()
            conn.sock.settimeout(PEER_READ_TIMEOUT)  # the leader answers once its upstream did
            conn.request("GET", f"{parts.path}?{parts.query}", headers={"Range": f"bytes={start}-"} if start else {})
            resp = conn.getresponse()
            size = _peer_size(resp, start)
            if size is None:
                detail = resp.read(1024).decode(errors="replace") if resp.status >= 400 else ""
                raise PeerRefused(resp.status, f"{resp.status} {resp.reason} {detail}".strip())
        except BaseException:
            conn.close()
            raise
        return cls(conn, resp, size, node)

    def read1(self, n: int) -> bytes:
        return self._resp.read1(n)

    def more_ready(self) -> bool:
        sock = self._conn.sock
        try:
            return sock is not None and bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self._conn.close()

    discard = close


class PeerRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _peer_size(resp: http.client.HTTPResponse, start: int) -> int | None:
    """The whole blob's size a peer's answer promises from byte start on, or None (not that)."""
    if start == 0 and resp.status == 200:
        length = resp.getheader("Content-Length") or ""
        return int(length) if length.isdigit() else None
    content_range = resp.getheader("Content-Range") or ""
    if resp.status == 206 and content_range.startswith(f"bytes {start}-") and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    return None


class PeerBlobResponse:
    """A blob streamed from the node fetching it for the tier, as a Fill reads an upstream
    response. The Fill hashes and verifies it like any download. If the stream breaks (the
    leader died), the rest comes from whoever takes over, from the byte where it broke: the
    object store once the blob is there, another leader's stream, or upstream under this
    node's own lease (the bytes before that point are skipped). The Fill's hash covers every
    byte either way, so a wrong or short stream never becomes a cache entry."""

    status = 200
    reason = "OK"
    url = ""

    def __init__(self, source: "TierSource", digest: str, stream: PeerStream, fetch, tried: set[str]):
        self._source = source
        self._digest = digest
        self._current = stream  # what the bytes come from now: read1, more_ready, close, discard
        self._fetch = fetch  # the upstream request, for a take-over
        self._tried = tried  # lease tokens whose streams were tried
        self.size = stream.size
        self._offset = 0
        self.headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(self.size))]

    @property
    def from_tier(self) -> bool:
        """Whether the bytes came from the tier, not from upstream (stats count upstream bytes)."""
        return getattr(self._current, "from_tier", isinstance(self._current, PeerStream))

    def end_deadline(self) -> None:
        pass

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def content_length(self) -> int:
        return self.size

    def read1(self, n: int) -> bytes:
        while True:
            try:
                data = self._current.read1(n)
                why = "connection closed"
            except (OSError, http.client.HTTPException) as e:
                data, why = b"", f"{e.__class__.__name__}: {e}"
            if data or self._offset >= self.size:
                self._offset += len(data)
                return data
            self._take_over(why)

    read = read1

    def _take_over(self, why: str) -> None:
        log.warning("tier: stream of blob %s from node %s broke at %d of %d bytes (%s); continuing from "
                    "whoever takes over", self._digest, getattr(self._current, "node", "?"), self._offset,
                    self.size, why)
        self._current.discard()
        self._current = self._source.resume(self._digest, self._offset, self.size, self._fetch, self._tried)

    def more_ready(self) -> bool:
        more_ready = getattr(self._current, "more_ready", None)
        return bool(more_ready and more_ready())

    def read_all(self, limit: int) -> bytes:
        return self.read1(limit)

    def close(self) -> None:
        self._current.close()

    def discard(self) -> None:
        self._current.discard()


class TierSource:
    """What the Fills download blobs from on a tier node: the shared object store when it holds
    the blob; else upstream, fetched by one node of the tier (a Redis lease per digest) while
    the others stream its fill in progress from it (its peer listener, named in the lease), or
    wait for its object when they cannot. Object store down: straight upstream."""

    def __init__(self, upstream, tier: Tier, store, max_wait: float = 600.0):
        self.upstream = upstream
        self.tier = tier
        self.store = store
        self.max_wait = max_wait

    def __getattr__(self, name):
        return getattr(self.upstream, name)

    def request(self, method, target, path, headers, *args, **kwargs):
        digest = _blob_digest(path)
        if method != "GET" or digest is None:
            return self.upstream.request(method, target, path, headers, *args, **kwargs)

        def fetch():
            return self.upstream.request(method, target, path, headers, *args, **kwargs)

        tried: set[str] = set()
        resp = self._acquire(digest, fetch, tried)
        if isinstance(resp, PeerStream):
            return PeerBlobResponse(self, digest, resp, fetch, tried)
        return resp

    def resume(self, digest: str, offset: int, size: int, fetch, tried: set[str]):
        """The rest of a blob whose leader's stream broke at offset: a source of its bytes from
        there on (read1, close, discard). Raises when there is none (the Fill then fails)."""
        resp = self._acquire(digest, fetch, tried, start=offset)
        if isinstance(resp, (PeerStream, SharedBlobResponse)):
            if resp.size != size:
                resp.discard()
                raise OSError(f"blob {digest} is {resp.size} bytes there, not {size}")
            return resp  # starts at offset
        try:
            if resp.status != 200 or resp.content_length not in (None, size):
                raise OSError(f"upstream answered {resp.status} ({resp.content_length} bytes) for blob {digest}")
            resp.end_deadline()
            skip = offset
            while skip:
                got = resp.read1(min(skip, 1024 * 1024))
                if not got:
                    raise OSError(f"upstream ended blob {digest} at {offset - skip} bytes")
                skip -= len(got)
        except BaseException:
            resp.discard()
            raise
        log.info("tier: blob %s continues from upstream at byte %d", digest, offset)
        return resp

    def _acquire(self, digest: str, fetch, tried: set[str], start: int = 0):
        """A SharedBlobResponse or a PeerStream from byte start on, or an upstream response
        (LeadingResponse under this node's lease) of the whole blob."""
        deadline = time.monotonic() + self.max_wait
        waited = False
        while True:
            shared = self.tier.open_blob(digest, start)
            if shared is not None:
                log.info("tier: blob %s from the object store%s", digest, " (after waiting for its leader)"
                         if waited else "")
                # a range cannot be checked against the digest here; the Fill checks the whole
                return SharedBlobResponse(self.tier, *shared, digest=None if start else digest,
                                          size=shared[1] + start)
            if not self.tier.s3_health.usable:
                return fetch()
            lease = self.tier.try_lease(digest)
            if lease is not None:
                # The leader may have finished between the look and the lease.
                shared = self.tier.open_blob(digest, start) if waited else None
                if shared is not None:
                    lease.release()
                    return SharedBlobResponse(self.tier, *shared, digest=None if start else digest,
                                              size=shared[1] + start)
                try:
                    resp = fetch()
                except BaseException:
                    lease.release()
                    raise
                return LeadingResponse(resp, self.tier, self.store, digest, lease)
            leader = self.tier.lease_info(digest)
            if self._streamable(leader, tried):
                tried.add(leader.token)
                stream = self._open_peer(digest, leader, start)
                if stream is not None:
                    return stream
            if not waited:
                log.info("tier: blob %s is being fetched by node %s; waiting for its object", digest,
                         leader.node if leader else None)
                waited = True
            # Wait on the lease (a cheap Redis read), not on the bucket: the object store sees
            # one look per follower when the leader is done, not four a second while it works.
            while (leader := self.tier.lease_info(digest)) is not None:
                if self._streamable(leader, tried):
                    break  # a new leader (the last one died): its stream
                if time.monotonic() > deadline:
                    log.warning("tier: waited %.0f s for blob %s; fetching it from upstream", self.max_wait,
                                digest)
                    return fetch()
                time.sleep(POLL_SECONDS)

    def _streamable(self, leader: LeaseInfo | None, tried: set[str]) -> bool:
        """Whether to ask the lease holder for its stream: it has a peer listener, is not this
        node (a fill of a replaced service set, after a reload), and was not tried already."""
        return (leader is not None and bool(leader.peer_base) and leader.node != self.tier.config.node
                and leader.token not in tried)

    def _open_peer(self, digest: str, leader: LeaseInfo, start: int) -> PeerStream | None:
        for attempt in (1, 2):
            url = self.tier.peer_url(leader.peer_base, digest)
            if url is None:
                return None
            try:
                stream = PeerStream.open(url, leader.node, start)
            except PeerRefused as e:
                if e.status == 403 and attempt == 1:
                    self.tier.peer_key(refresh=True)  # Redis lost the key and a node made a new one
                    continue
                why = str(e)
            except (OSError, http.client.HTTPException) as e:
                why = f"{e.__class__.__name__}: {e}"
            else:
                log.info("tier: blob %s streams from node %s while it fetches it%s", digest, leader.node,
                         f" (from byte {start})" if start else "")
                return stream
            log.info("tier: blob %s cannot stream from node %s (%s)", digest, leader.node, why[:200])
            return None
        return None


def _blob_digest(path: str) -> str | None:
    if "/blobs/" not in path:
        return None
    return oci.valid_digest(path.rsplit("/blobs/", 1)[1].split("?", 1)[0])


# --- export / import across sites (the CLI, blocking) --------------------------------------------------

def hydrate(tier: Tier, store, images: list[str]) -> tuple[int, int]:
    """Bring the named images (tags resolved through the tier) from the object store into the
    local store, verified, so `regcache export` finds them whole. (manifests, blobs) fetched."""
    from .inventory import parse_image

    fetched_manifests = fetched_blobs = 0
    for text in images:
        ref = parse_image(text)
        pending = [ref.digest] if ref.digest else [e.digest for e in store.tag_entries(ref.registry, ref.repo,
                                                                                      ref.tag)]
        seen: set[str] = set()
        while pending:
            digest = pending.pop()
            if digest in seen:
                continue
            seen.add(digest)
            manifest = store.get_manifest(digest)
            if manifest is None:
                shared = tier.get_manifest(digest)
                if shared is None:
                    continue
                store.put_manifest(digest, shared[0], shared[1], share=False)
                fetched_manifests += 1
                manifest = store.get_manifest(digest)
            store.learn_manifest(ref.registry, ref.repo, digest, manifest.body)
            for child in oci.referenced_digests(manifest.body):
                if store.get_manifest(child) is not None or tier.get_manifest(child) is not None:
                    pending.append(child)  # an index's platform manifest
                elif not store.has_blob(child) and _fetch_blob(tier, store, child):
                    fetched_blobs += 1
    return fetched_manifests, fetched_blobs


def _fetch_blob(tier: Tier, store, digest: str) -> bool:
    shared = tier.open_blob(digest)
    if shared is None:
        return False
    body, size, _content_type = shared
    hasher = hashlib.sha256()
    staging, out = store.new_staging_file(digest)
    try:
        with out, body:
            n = 0
            while chunk := body.read(1024 * 1024):
                hasher.update(chunk)
                out.write(chunk)
                n += len(chunk)
            if n != size or "sha256:" + hasher.hexdigest() != digest:
                log.warning("tier: shared blob %s does not match its digest; not taken", digest)
                return False
            out.flush()
            os.fsync(out.fileno())
            store.commit_blob(digest, staging, n)
            staging = None
            return True
    finally:
        if staging is not None:
            os.unlink(staging)


def publish_bundle(tier: Tier, store, bundle: str) -> int:
    """Upload the blobs of an imported OCI layout from the local store (verified there) to the
    tier; manifests, tags and membership reached it through the store already. How many."""
    uploaded = 0
    blob_dir = os.path.join(bundle, "blobs", "sha256")
    for name in sorted(os.listdir(blob_dir)) if os.path.isdir(blob_dir) else []:
        digest = oci.valid_digest(f"sha256:{name}")
        f = store.open_blob(digest) if digest else None
        if f is None:
            continue  # a manifest, or not imported
        lease = tier.try_lease(digest)  # a node starting meanwhile must not abort this upload as debris
        if lease is None:
            f.close()
            continue  # a node is fetching it right now
        try:
            with f:
                if tier.upload_blob(digest, f, os.fstat(f.fileno()).st_size, "application/octet-stream"):
                    uploaded += 1
        finally:
            lease.release()
    return uploaded


# --- the shared store's gc (the CLI, blocking) -------------------------------------------------------------

@dataclass
class SharedGcReport:
    objects: int = 0
    bytes: int = 0
    deleted: list = None  # object keys
    deleted_bytes: int = 0
    kept_in_flight: int = 0  # a lease held on it, or uploaded or read within the grace period


def shared_gc(tier: Tier, size_limit: int | None = None, grace: float = 3600.0, dry_run: bool = False,
              now: float | None = None) -> SharedGcReport:
    """Manifest-aware gc of the bucket, safe against fills in flight on any node.

    Kept: everything a tag in the tier reaches (manifests, their children, configs and layers).
    Removed: the rest; then, above size_limit, the least recently read (`regcache:read` in
    Redis, else upload time). Never removed: an object whose digest a node holds a lease on (being
    fetched or uploaded), or that was uploaded or read within `grace` seconds (a fill that has
    stored a manifest but not yet its tag or blobs, a node streaming it right now)."""
    now = time.time() if now is None else now
    report = SharedGcReport(deleted=[])
    objects: dict[str, tuple[int, float]] = {}
    paginator = tier.s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=tier.config.bucket):
        for o in page.get("Contents", []):
            objects[o["Key"]] = (int(o["Size"]), o["LastModified"].timestamp())
    report.objects, report.bytes = len(objects), sum(size for size, _ in objects.values())

    def digest_of(key: str) -> str | None:
        parts = key.split("/")
        return f"{parts[1]}:{parts[2]}" if len(parts) == 3 and parts[0] in ("blobs", "manifests") else None

    # roots: every tag of the tier
    pending = []
    for key in tier.redis.scan_iter(match=f"{KEY_PREFIX}tag:*", count=1000):
        for value in tier.redis.hvals(key):
            try:
                pending.append(str(json.loads(value)[0]))
            except (ValueError, TypeError, IndexError):
                continue
    reachable: set[str] = set()
    while pending:
        digest = pending.pop()
        if digest in reachable:
            continue
        reachable.add(digest)
        if manifest_object(digest) in objects:
            manifest = tier.get_manifest(digest)
            if manifest is not None:
                pending.extend(oci.referenced_digests(manifest[1]))
    reads = {k.decode(): float(v) for k, v in (tier.redis.hgetall(f"{KEY_PREFIX}read") or {}).items()}

    def protected(key: str) -> bool:
        digest = digest_of(key)
        last = max(objects[key][1], reads.get(digest or "", 0.0))
        return now - last < grace or bool(digest and tier.redis.exists(Tier._lease_key(digest)))

    def delete(key: str) -> None:
        if not dry_run:
            tier.s3.delete_object(Bucket=tier.config.bucket, Key=key)
            if key.startswith("blobs/"):
                tier.redis.hdel(f"{KEY_PREFIX}read", digest_of(key))
        report.deleted.append(key)
        report.deleted_bytes += objects[key][0]

    volume = report.bytes
    for key in sorted(objects):
        if digest_of(key) in reachable:
            continue
        if protected(key):
            report.kept_in_flight += 1
            continue
        delete(key)
        volume -= objects[key][0]
    if size_limit is not None and volume > size_limit:
        order = sorted((k for k in objects if k not in report.deleted and k.startswith("blobs/")),
                       key=lambda k: max(objects[k][1], reads.get(digest_of(k) or "", 0.0)))
        for key in order:
            if volume <= size_limit:
                break
            if protected(key):
                report.kept_in_flight += 1
                continue
            delete(key)
            volume -= objects[key][0]
    return report

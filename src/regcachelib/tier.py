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

Redis because these are small per-request reads on the hit path that need an atomic
set-if-absent (a lease); S3 has neither cheap small reads nor conditional writes on every
implementation. Either backend down: the node serves its local layer and passes misses through
to upstream, with one log line per outage; when it answers again sharing resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

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


def parse_tier(value) -> TierConfig:
    """The `tier:` config section (config.py calls this; errors name the key)."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping with s3:, redis: and optionally node:")
    unknown = set(value) - {"s3", "redis", "node", "redirect"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} (known: s3, redis, node, redirect)")
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
    if not isinstance(node, str):
        raise ValueError("node: expected a string")
    return TierConfig(s3.get("endpoint"), s3["bucket"], s3.get("region"), s3.get("access_key_env"),
                      s3.get("secret_key_env"), redis["url"], node, redirect)


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

    def open_blob(self, digest: str):
        """(body stream, size, content type) of a shared blob, or None (missing or store down)."""
        got = self._s3_call(lambda s3: s3.get_object(Bucket=self.config.bucket, Key=blob_object(digest)), None)
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
        key, token = self._lease_key(digest), f"{self.config.node}:{os.urandom(6).hex()}"
        got = self._redis_call(lambda r: r.set(key, token, nx=True, px=LEASE_MS), "down")
        if got == "down":
            return NoLease()
        return Lease(self, key, token) if got else None

    def lease_holder(self, digest: str) -> str | None:
        value = self._redis_call(lambda r: r.get(self._lease_key(digest)), None)
        return value.decode(errors="replace").rsplit(":", 1)[0] if value else None

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

    def __init__(self, tier: Tier, body, size: int, content_type: str, digest: str | None = None):
        self.tier = tier
        self._body = body
        self._digest = digest
        self._hasher = hashlib.sha256() if digest and digest.startswith("sha256:") else None
        self.headers = [("Content-Type", content_type), ("Content-Length", str(size))]
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


class TierSource:
    """What the Fills download blobs from on a tier node: the shared object store when it holds
    the blob; else upstream, fetched by one node of the tier (a Redis lease per digest) while
    the others wait for its object. Object store down: straight upstream."""

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
        deadline = time.monotonic() + self.max_wait
        waited = False
        while True:
            shared = self.tier.open_blob(digest)
            if shared is not None:
                log.info("tier: blob %s from the object store%s", digest, " (after waiting for its leader)"
                         if waited else "")
                return SharedBlobResponse(self.tier, *shared, digest=digest)
            if not self.tier.s3_health.usable:
                return self.upstream.request(method, target, path, headers, *args, **kwargs)
            lease = self.tier.try_lease(digest)
            if lease is not None:
                # The leader may have finished between the look and the lease.
                shared = self.tier.open_blob(digest) if waited else None
                if shared is not None:
                    lease.release()
                    return SharedBlobResponse(self.tier, *shared, digest=digest)
                try:
                    resp = self.upstream.request(method, target, path, headers, *args, **kwargs)
                except BaseException:
                    lease.release()
                    raise
                return LeadingResponse(resp, self.tier, self.store, digest, lease)
            if not waited:
                log.info("tier: blob %s is being fetched by node %s; waiting for its object", digest,
                         self.tier.lease_holder(digest))
                waited = True
            # Wait on the lease (a cheap Redis read), not on the bucket: the object store sees
            # one look per follower when the leader is done, not four a second while it works.
            while self.tier.lease_holder(digest) is not None:
                if time.monotonic() > deadline:
                    log.warning("tier: waited %.0f s for blob %s; fetching it from upstream", self.max_wait,
                                digest)
                    return self.upstream.request(method, target, path, headers, *args, **kwargs)
                time.sleep(POLL_SECONDS)


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

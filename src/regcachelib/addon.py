"""mitmproxy glue: the RegistryCache addon and its children, one concern each.

    RegistryCache    options and lifecycle; builds the services (services.py) on configure and
                     hands the whole set to its children
      Interception   which TLS is intercepted, streaming, a mirror client's Host (interception.py)
      DestinationPolicy  no proxying into the cache host (destinations.py)
      Routing        which registry request a flow is: flow.metadata[REQUEST] (routing.py)
      Blobs          blob requests: BlobService's answer -> a response (or the blob server)
      Manifests      manifest requests and the /v2/ ping: ManifestService's answer -> a response
      Monitor        observes: logs and counts the outcome each flow ended with (metrics.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import tempfile

from mitmproxy import ctx, exceptions, http, optmanager
from mitmproxy.proxy import mode_specs

from . import oci
from .blobs import Follow, Hit, Redirect, Relay, Uncached
from .blobserver import FASTPATH_PREFIX, BlobServer, Signer, Ticket, raise_listen_backlogs
from .clients import ClientNetworks, ClientPolicy
from .concurrency import Workers
from .config import INLINE_MAX, Config, ConfigError, CredentialError, load_config
from .destinations import DestinationPolicy
from .manifests import Answer
from .metrics import Monitor
from .request import OUTCOME, REQUEST, Outcome, RegistryRequest
from .interception import Interception
from .routing import Routing, answer, answer_error, pass_through
from .services import Services, build_services
from .store import Store
from .egressroute import EgressRoute, EgressTunnel
from .upstream import Upstream, make_ssl_context

log = logging.getLogger(__name__)

DEFAULT_DIR = os.path.join(os.getcwd(), "regcache-cache")
# Stored blobs up to this size are answered in-band from the request hook itself (read whole,
# like a manifest): the loopback hop through the blob server cost more than the bytes. Larger
# ones stream from the blob server with bounded memory.
INLINE_BLOB_MAX = INLINE_MAX
_HOP = ("content-length", "transfer-encoding", "connection", "content-encoding")
_SSL_OPTIONS = {"ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir"}


def _refuse_repeated_options(options) -> None:
    """A regcache option given twice (``--set regcache_dir=a --set regcache_dir=b``) makes
    mitmproxy refuse it only after regcache has loaded, in a task whose error nobody sees:
    mitmdump then runs as a plain proxy that caches nothing. Say so while it can still stop
    the start (an error logged during start-up makes mitmdump exit 1)."""
    for name, value in getattr(options, "deferred", {}).items():
        values = getattr(value, "val", None)  # still the --set strings: not yet parsed
        if name.startswith("regcache_") and isinstance(values, list) and len(values) > 1:
            log.error("%s is set %d times (%s): give it once", name, len(values), ", ".join(map(repr, values)))


def _offer_http1_unless_told(options) -> None:
    """TLS clients get HTTP/1.1 from mitmproxy unless `http2` is set explicitly (--set http2=true,
    config.yaml). Blob bodies cross mitmproxy in 64 KiB reads; over HTTP/2 each is cut into 16 KiB
    DATA frames by the h2 library in Python besides: the same 1 GiB hit takes about a quarter more
    CPU and is about a quarter slower than over HTTP/1.1 (bench/README.md, hits). Registry clients
    (Go's net/http in docker, containerd, skopeo, podman; curl) speak HTTP/1.1 when h2 is not
    offered and open a connection per concurrent download instead of multiplexing."""
    http2 = getattr(options, "_options", {}).get("http2")
    # mitmproxy keeps `unset` for an option nobody set: only then is the choice regcache's
    if http2 is None or getattr(http2, "value", None) is not getattr(optmanager, "unset", None):
        return
    log.info("offering HTTP/1.1 to TLS clients (blobs stream faster through mitmproxy); --set http2=true offers HTTP/2")
    options.update(http2=False)


def _check_writable(directory: str) -> None:
    """Raise OSError unless files can be created in directory: an existing store the process
    may only read opens fine, and would then fail every blob download."""
    with tempfile.TemporaryFile(dir=directory):
        pass


def relay(flow: http.HTTPFlow, result: Relay) -> None:
    """Answer as upstream did (401 with its WWW-Authenticate, 404, 429...)."""
    keep = [(k, v) for k, v in result.headers if k.lower() not in _HOP]
    answer(flow, result.status, result.body, keep, result.cache_status)
    if result.length is not None:
        flow.response.headers["content-length"] = result.length


def record(flow: http.HTTPFlow, outcome: str, size: int | None = None, via: str | None = None) -> None:
    """What the monitoring addon logs and counts when the flow ends."""
    flow.metadata[OUTCOME] = Outcome(outcome, size, via)


@contextlib.contextmanager
def answering(flow: http.HTTPFlow, req: RegistryRequest):
    """Translate what a service raises into the flow's answer, in one place.

    A RegistryError is the client's answer. Anything else is a bug of regcache's: the request
    passes through to upstream (the pull still works) and the traceback is logged.
    """
    try:
        yield
    except oci.RegistryError as e:
        answer_error(flow, e)
        if e.outcome:
            record(flow, e.outcome)
    except Exception:  # noqa: BLE001 - never let a cache bug break a pull
        log.exception("internal error on %s %s; passing it through to upstream",
                      flow.request.method, flow.request.pretty_url[:200])
        flow.response = None
        flow.metadata.pop(OUTCOME, None)
        pass_through(flow, req, req.forward_credentials, req.offline)


class _ServiceChild:
    """A child addon that answers from the service set RegistryCache hands it on configure."""

    services: Services | None = None

    def use(self, services: Services) -> None:
        self.services = services


class Blobs(_ServiceChild):
    """Child addon of RegistryCache: a blob request gets BlobService's answer."""

    def __init__(self, cache) -> None:
        self.cache = cache  # the parent: its blob server and fast-path signer live as long as it

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if self.cache.is_fastpath_request(flow):
            self._fastpath_came_back(flow)
            return
        req = flow.metadata.get(REQUEST)
        if req is None or req.kind != oci.BLOB or self.services is None:
            return
        with answering(flow, req):
            result = await self.services.blobs.get(req)
            if isinstance(result, Hit) and req.method == "HEAD":
                headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", result.digest),
                           ("Accept-Ranges", "bytes")]
                answer(flow, 200, b"", headers, "HIT")
                flow.response.headers["content-length"] = str(result.size)
                record(flow, "HIT", 0)
            elif isinstance(result, (Hit, Follow)):
                status = "HIT" if isinstance(result, Hit) else "MISS"
                self._serve(flow, req, status, result.fastpath)
            elif isinstance(result, Relay):
                relay(flow, result)
                if result.outcome:
                    record(flow, result.outcome)
            elif isinstance(result, Redirect):
                # bytes flow from the tier's object store to the client (never logged: the URL is signed)
                answer(flow, 307, b"", [("Location", result.location), ("Docker-Content-Digest", result.digest)],
                       "HIT")
                record(flow, "HIT", None, "tier-redirect")
            elif isinstance(result, Uncached):
                shared = await self._shared_copy(req, result)
                if shared is not None:
                    # a tier node with a full disk: the bucket's copy streams through, not upstream's
                    flow.request.url = shared
                    flow.request.headers.pop("authorization", None)
                    record(flow, "UNCACHED", None, "tier")
                else:
                    pass_through(flow, req, req.forward_credentials, req.offline)
                    record(flow, "UNCACHED")

    async def _shared_copy(self, req: RegistryRequest, result: Uncached) -> str | None:
        """A presigned URL of the tier's copy of a blob this node cannot store (its disk is
        full), once this client passed the access rule; None: the request goes upstream."""
        tier = self.services.tier
        if tier is None or req.method != "GET" or result.reason != "cache disk full":
            return None
        digest = str(req.digest)
        url = await self.cache.workers.store_write(tier.presigned_blob_url, digest)
        if url is not None:
            await self.services.access.require(req, digest)  # before any byte of the bucket's
            log.info("blob %s streams from the tier's object store uncached (cache disk full)", digest)
        return url

    def _serve(self, flow: http.HTTPFlow, req: RegistryRequest, cache_status: str, fastpath: bool) -> None:
        digest = str(req.digest)
        blobserver = self.cache.blobserver
        signer = self.cache.signer
        if fastpath and not req.direct and signer.sent_back(req.client):
            fastpath = False  # this proxied client's redirects reach the fast path through another proxy
        range_header = flow.request.headers.get("range")
        if cache_status == "HIT" and range_header is None:
            # small stored blobs inline: in-band always, on the fast path up to fastpath_inline_max
            limit = self.services.config.fastpath_inline_max if fastpath else INLINE_BLOB_MAX  # config caps it
            body = self._small_stored_blob(digest, limit) if limit > 0 else None
            if body is not None:
                headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", digest),
                           ("Accept-Ranges", "bytes")]
                answer(flow, 200, body, headers, "HIT")
                record(flow, "HIT", len(body), "inband")  # its bytes are counted when the flow ends
                return
        if fastpath:
            host = self.services.config.fastpath_host or _local_address_for(flow)
            netloc = f"[{host}]" if ":" in host else host
            # good for this client only; a proxied client's URL knows its way back to the proxy
            signed = signer.sign(digest, req.client, way_back=None if req.direct else flow.request.url)
            location = f"http://{netloc}:{blobserver.fastpath_port}{signed}"
            answer(flow, 307, b"", [("Location", location), ("Docker-Content-Digest", digest)], cache_status)
            record(flow, cache_status, None, "fastpath")
        else:
            self.cache.route_to_blobserver(flow, Ticket(digest, cache_status, range_header))
            record(flow, cache_status, None, "inband")

    def _small_stored_blob(self, digest: str, limit: int) -> bytes | None:
        """A stored blob's bytes if it is at most limit bytes, else None."""
        f = self.services.store.open_blob(digest)
        if f is None:
            return None  # evicted meanwhile: the blob server answers (404)
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                return None
            body = f.read(size + 1)
        return body if len(body) == size else None

    def _fastpath_came_back(self, flow: http.HTTPFlow) -> None:
        """A fast-path redirect that came back through the proxy (client without NO_PROXY).

        The blob server would see our loopback address, not the client's: check the URL against
        the client it was issued to here and hand over a one-use ticket instead."""
        client = flow.client_conn.peername[0]
        digest, why = self.cache.signer.verify(flow.request.path, client)
        if digest is None:
            log.warning("refused fast-path request from %s through the proxy: %s", client, why)
            answer_error(flow, oci.RegistryError.of("DENIED", why))
            return
        log.info("fast-path URL for %s came back through the proxy from %s; served in-band",
                 digest, client)
        self.cache.route_to_blobserver(flow, Ticket(digest, "HIT", flow.request.headers.get("range")))


def _local_address_for(flow: http.HTTPFlow) -> str:
    """The address of ours the client reaches us by.

    In transparent mode the socket's own address is the original destination (the registry's),
    so ask the routing table which local address faces the client.
    """
    if not isinstance(flow.client_conn.proxy_mode, mode_specs.TransparentMode):
        return flow.client_conn.sockname[0]
    peer = flow.client_conn.peername[0]
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


class Manifests(_ServiceChild):
    """Child addon of RegistryCache: a manifest request (or the /v2/ ping) gets
    ManifestService's answer."""

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.metadata.get(REQUEST)
        if req is None or req.kind == oci.BLOB or self.services is None:
            return
        with answering(flow, req):
            if req.is_ping:
                relay(flow, await self.services.manifests.ping(req))
                return
            result = await self.services.manifests.get(req)
            if isinstance(result, Answer):
                manifest = result.manifest
                headers = [("Content-Type", manifest.media_type), ("Docker-Content-Digest", manifest.digest)]
                head = req.method == "HEAD"
                answer(flow, 200, b"" if head else manifest.body, headers, result.outcome)
                if head:
                    flow.response.headers["content-length"] = str(len(manifest.body))
                if result.warning:
                    flow.response.headers["Warning"] = result.warning
                record(flow, result.outcome, len(manifest.body))
            else:
                relay(flow, result)
                if result.outcome:
                    record(flow, result.outcome, len(result.body) if req.method == "GET" else None)


class RegistryCache:
    """The parent addon: options, lifecycle, and the one set of services its children use."""

    def __init__(self) -> None:
        self.config = Config()
        self.services: Services | None = None
        self.workers = Workers()
        self.signer = Signer(os.urandom(32))
        self.blobserver: BlobServer | None = None
        self._store: Store | None = None
        self._client_networks = ClientNetworks()
        # statistics, /metrics and the status page: observes every flow's outcome
        self.monitor = Monitor(self)
        self.routing = Routing(self)
        self.addons = [
            ClientPolicy(self),  # first: a client outside client_networks gets nothing at all
            Interception(),
            DestinationPolicy(self),  # no proxying into this host, checked before anything is fetched
            self.routing,
            Blobs(self),
            Manifests(),
            EgressRoute(),  # after every child that may answer a flow or change where it goes
            EgressTunnel(),
            self.monitor,
        ]

    @property
    def client_networks(self) -> ClientNetworks:
        """The allowlist of client networks in force (every listener asks it)."""
        if self._client_networks.networks != tuple(self.config.client_networks):
            self._client_networks = ClientNetworks(self.config.client_networks)
        return self._client_networks

    def client_allowed(self, peer: str | None, listener: str) -> bool:
        allowlist = self.client_networks
        if allowlist.allows(peer):
            return True
        allowlist.refused(peer, listener)
        return False

    # The current services, by name (the status page, the tests).
    @property
    def store(self) -> Store | None:
        return self._store

    @property
    def upstream(self):
        return self.services.upstream if self.services else None

    @property
    def access(self):
        return self.services.access if self.services else None

    @property
    def fills(self):
        return self.services.fills if self.services else None

    # --- options ----------------------------------------------------------------------

    def load(self, loader):
        loader.add_option("regcache_dir", str, DEFAULT_DIR,
                          "Cache directory: the whole state of the cache; copy it to migrate.")
        loader.add_option("regcache_config", str, "",
                          "Optional YAML file with registries, aliases, tag TTL, size limit, fast path.")
        loader.add_option("regcache_offline", bool, False,
                          "Answer only from the cache; never contact an upstream registry.")
        _refuse_repeated_options(loader.master.options)
        _offer_http1_unless_told(loader.master.options)

    def configure(self, updated):
        config = self.config
        if "regcache_config" in updated:
            try:
                config = load_config(ctx.options.regcache_config or None)
                config.check_credentials()
            except (ConfigError, CredentialError) as e:
                raise exceptions.OptionsError(f"regcache_config: {e}") from None
        store = self._store
        if "regcache_dir" in updated or "regcache_config" in updated:
            store = self._open_store(ctx.options.regcache_dir, config)
        self.config = config
        if store is not self._store:
            # Only a usable new store replaces the old one: a refused value is rolled back by
            # mitmproxy, and the cache must go on with the store it had.
            if self._store is not None:
                self._store.close()
            self._store = store
        if updated & ({"regcache_dir", "regcache_config"} | _SSL_OPTIONS):
            self._rebuild()
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Eager connections would reach upstream for every hit (and fail when it is down).
            log.info("setting connection_strategy=lazy so cache hits open no upstream connection")
            ctx.options.update(connection_strategy="lazy")
        if "keep_host_header" in updated and not ctx.options.keep_host_header:
            # Otherwise mitmproxy replaces a mirror client's Host before any hook sees it, and the
            # DNS way in (quay.io pointed at the cache) could not tell quay.io from Docker Hub.
            # Interception.requestheaders puts back the Host mitmproxy would have sent.
            log.info("setting keep_host_header=true so mirror listeners see the registry a client names in Host")
            ctx.options.update(keep_host_header=True)

    def _open_store(self, directory: str, config: Config) -> Store:
        if not directory:
            raise exceptions.OptionsError("regcache_dir must not be empty")
        try:
            if self._store is not None and self._store.directory == os.path.abspath(directory):
                self._store.set_size_limit(config.size_limit)
                return self._store
            store = Store(directory, config.size_limit)
            try:
                swept = store.sweep_staging()
                _check_writable(store.staging_dir)
            except BaseException:
                store.close()
                raise
            if swept:
                log.info("removed %d leftover staging file(s) from an earlier run", swept)
            return store
        except (OSError, sqlite3.Error) as e:
            # At start-up mitmproxy logs this as an error and exits 1 (its errorcheck addon):
            # never a proxy that forwards everything uncached.
            raise exceptions.OptionsError(f"regcache_dir {directory!r} is not usable: {e}") from None

    def _rebuild(self) -> None:
        """A new set of services from the current options, handed whole to every child."""
        ssl_context = make_ssl_context(
            ctx.options.ssl_insecure,
            ctx.options.ssl_verify_upstream_trusted_ca,
            ctx.options.ssl_verify_upstream_trusted_confdir,
        )
        upstream = Upstream(ssl_context, self.config.upstream_timeout, self.config.upstream_backoff,
                            self.config.redirect_allow, observe=self.monitor.observe_upstream,
                            proxy=self.config.upstream_proxy)
        previous = self.services.upstream if self.services is not None else None
        self.services = build_services(self.config, self._store, upstream, self.workers, self._fastpath_port)
        if previous is not None:
            previous.close()  # its idle keep-alive connections; exchanges under way finish on their own
        if self.blobserver is not None:
            # blob bodies must come from the store the addon now answers from
            self.blobserver.use(self.services.store, self.services.fills)
            if self.services.tier is not None and self.blobserver.peer_port:
                self.services.tier.serve_peers(self.blobserver.peer_port)
        for child in self.addons:
            use = getattr(child, "use", None)
            if use is not None:
                use(self.services)

    def _fastpath_port(self) -> int:
        return self.blobserver.fastpath_port if self.blobserver is not None else 0

    async def running(self):
        if self.services is None:
            return  # configure refused regcache_dir and logged it: mitmdump is exiting
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        if "keep_host_header" in ctx.options and not ctx.options.keep_host_header:
            ctx.options.update(keep_host_header=True)
        self.blobserver = BlobServer(self.services.store, self.services.fills, self.signer)
        self.blobserver.client_allowed = lambda peer: self.client_allowed(peer, "fast path")
        self.monitor.use(self.services)  # the blob server counts the bytes it sends
        fast_port = self.config.fastpath_port if self.config.fastpath != "off" else None
        try:
            await self.blobserver.start(self.config.fastpath_bind, fast_port)
        except OSError as e:
            where = f"{self.config.fastpath_bind or '*'}:{fast_port}"
            if self.config.explicit & {"fastpath_port", "fastpath_bind"}:
                # Asked for by name: an error during start-up makes mitmdump exit 1 (errorcheck).
                log.error("cannot listen on the fast path %s (fastpath_port/fastpath_bind in %s): %s",
                          where, ctx.options.regcache_config, e)
            else:
                log.warning("fast path disabled, cannot listen on its default port %s: %s", where, e)
            await self.blobserver.start(None, None)
        await self._serve_peers()
        # mitmproxy's listeners are up by now (master starts them before `running`)
        raise_listen_backlogs()
        log.info(
            "cache %s, %s, in-band blob server 127.0.0.1:%d%s",
            self._store.directory,
            "OFFLINE (cache only)" if ctx.options.regcache_offline else "online",
            self.blobserver.inband_port,
            f", fast path port {self.blobserver.fastpath_port}" if self.blobserver.fastpath_port else "",
        )

    async def _serve_peers(self) -> None:
        """A cache tier node streams the fills it leads to the other nodes (tier.py)."""
        tier = self.services.tier
        if tier is None or not tier.config.peer_port or self.blobserver.peer_port:
            return
        try:
            await self.blobserver.start_peer(tier.config.peer_port, self._verify_peer)
        except OSError as e:
            log.warning("tier: cannot listen for peers on port %d (tier.peer_port): %s; other nodes wait for "
                        "this node's uploads instead of streaming its fills", tier.config.peer_port, e)
            return
        log.info("tier: other nodes stream fills in progress from %s", tier.serve_peers(self.blobserver.peer_port))
        await asyncio.to_thread(tier.peer_key)

    def _verify_peer(self, target: str) -> tuple[str | None, str]:
        tier = self.services.tier if self.services is not None else None
        return tier.verify_peer(target) if tier is not None else (None, "not a tier node")

    async def done(self):
        if self.blobserver:
            await self.blobserver.stop()
        self.workers.shutdown()
        if self.services is not None:
            self.services.upstream.close()
        if self._store:
            self._store.close()

    # --- the blob server's doors --------------------------------------------------------

    def is_fastpath_request(self, flow: http.HTTPFlow) -> bool:
        """A fast-path redirect that came back through the proxy (client without NO_PROXY)."""
        return bool(
            self.blobserver
            and self.blobserver.fastpath_port
            and flow.request.scheme == "http"
            and flow.request.port == self.blobserver.fastpath_port
            and flow.request.path.startswith(FASTPATH_PREFIX)
        )

    def route_to_blobserver(self, flow: http.HTTPFlow, ticket: Ticket) -> None:
        """Let the in-band blob server answer the flow, as the ticket says."""
        flow.request.path = self.blobserver.issue(ticket)
        flow.request.scheme = "http"
        flow.request.host = "127.0.0.1"
        flow.request.port = self.blobserver.inband_port
        flow.request.headers.pop("authorization", None)
        flow.metadata["regcache.blobserver"] = True
        if flow.server_conn.via is not None:
            flow.server_conn.via = None  # the loopback hop never goes through an upstream proxy

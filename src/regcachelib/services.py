"""The one set of services the addons answer with, built whole on every configure.

Nothing in it sees a flow. RegistryCache builds a new set when an option it depends on changes
and hands the whole set to every child addon, so no part keeps using a store, an upstream
client or a config the others have left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .access import Access
from .blobs import BlobService, learn_from_download
from .concurrency import Workers
from .config import Config
from .credentials import UpstreamCredentials
from .fill import Fills
from .manifests import ManifestService
from .store import Store
from .tier import Tier, TierSource
from .upstream import Upstream


@dataclass(frozen=True)
class Services:
    config: Config
    store: Store
    upstream: Upstream
    access: Access
    fills: Fills
    blobs: BlobService
    manifests: ManifestService
    credentials: UpstreamCredentials
    tier: Tier | None = None


_tiers: dict = {}


def _tier_for(config: Config) -> Tier | None:
    """The tier client for this config: kept across rebuilds (an S3 client costs ~55 MiB)."""
    if config.tier is None:
        return None
    tier = _tiers.get(config.tier)
    if tier is None:
        _tiers.clear()
        tier = _tiers[config.tier] = Tier(config.tier)
        tier.ensure_bucket()
        tier.abort_stale_uploads()
    return tier


def build_services(config: Config, store: Store, upstream: Upstream, workers: Workers,
                   fastpath_port: Callable[[], int]) -> Services:
    tier = _tier_for(config)
    store.shared = tier  # shared knowledge, or none
    access = Access(upstream, store, config.auth_ttl, config.public_ttl, config.trust_clients_offline, workers)
    source = TierSource(upstream, tier, store) if tier is not None else upstream
    fills = Fills(store, source, executor=workers.fills, on_found=learn_from_download(store))
    credentials = UpstreamCredentials(upstream, config.credentials)
    return Services(
        config=config,
        store=store,
        upstream=upstream,
        access=access,
        fills=fills,
        blobs=BlobService(config, store, upstream, fills, access, workers, fastpath_port, credentials, tier),
        manifests=ManifestService(config, store, upstream, access, workers, credentials, tier),
        credentials=credentials,
        tier=tier,
    )

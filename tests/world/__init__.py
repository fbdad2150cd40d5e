"""End-to-end test world for regcache: real registries, TLS and clients in
Linux network namespaces.  See ``tests/world/world.py`` for the topology.

    from tests.world import World
    with World() as w:
        w.run(w.ns_client, ["skopeo", "inspect", "--raw",
                            "docker://registry-1.docker.io/library/small:1"],
              env=w.client_env())
"""

from .images import Image, ChildManifest, ImageSpec, LayerSpec, DEFAULT_SPECS
from .pki import PKI, libtrust_key_id
from .world import (
    AUTH_HOST,
    CDN_HOST,
    DOCKER_HOST,
    HOSTS,
    PASSWORD,
    USERNAME,
    World,
    WorldError,
    cleanup_prefix,
    cleanup_stale,
)

__all__ = [
    "World", "WorldError", "Image", "ChildManifest", "ImageSpec", "LayerSpec", "DEFAULT_SPECS",
    "PKI", "libtrust_key_id", "cleanup_prefix", "cleanup_stale",
    "HOSTS", "DOCKER_HOST", "AUTH_HOST", "CDN_HOST", "USERNAME", "PASSWORD",
]

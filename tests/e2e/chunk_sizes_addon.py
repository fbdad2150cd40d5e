"""Test-only mitmproxy addon: logs the sizes of the pieces mitmproxy streams of each body the
blob server sends in-band (loaded beside regcache with a second -s)."""

import logging
from collections import Counter


class ChunkSizes:
    def responseheaders(self, flow):
        if not flow.metadata.get("regcache.blobserver"):
            return
        sizes = Counter()
        inner = flow.response.stream

        def stream(data: bytes) -> bytes:
            sizes[len(data)] += 1
            return inner(data) if callable(inner) else data

        flow.response.stream = stream
        flow.metadata["chunk_sizes"] = sizes

    def response(self, flow):
        sizes = flow.metadata.get("chunk_sizes")
        if sizes is not None:
            logging.warning("CHUNK-SIZES %s %s", flow.response.headers.get("docker-content-digest", "?"),
                            ",".join(f"{size}x{n}" for size, n in sorted(sizes.items())))


addons = [ChunkSizes()]

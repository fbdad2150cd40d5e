"""mitmdump -s bench/bare_addon.py — the reference of the request-rate section (bench/rates.py).

Answers every request from its ``request`` hook with one fixed small response (a 512-byte JSON
body, the size of a small image manifest) and does nothing else: no store, no upstream, no
per-request logging of its own. Run with the same listeners and options as regcache, its request
rate is what mitmproxy itself allows any addon on this machine (TLS to the client, HTTP/1 parsing,
the hook chain, the flow line mitmdump prints): the ceiling regcache's hit path is measured against.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http

log = logging.getLogger(__name__)

BODY = b'{"schemaVersion":2,"bench":"' + b"x" * 482 + b'"}'  # 512 bytes
HEADERS = {
    "Content-Type": "application/vnd.oci.image.manifest.v1+json",
    "Docker-Distribution-Api-Version": "registry/2.0",
}


class BareAnswer:
    """Answers each request at once, in the request hook, with BODY."""

    def running(self) -> None:
        # As regcache does: a CONNECT must not open an upstream connection the answer never uses.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        log.info("bare addon: answering every request with %d bytes", len(BODY))

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.request.method == "HEAD":
            # the length of what a GET would get, and no body: mitmproxy sends whatever content a HEAD
            # response holds, which would break the connection's framing
            flow.response = http.Response.make(200, b"", HEADERS)
            flow.response.headers["Content-Length"] = str(len(BODY))
        else:
            flow.response = http.Response.make(200, BODY, HEADERS)


addons = [BareAnswer()]

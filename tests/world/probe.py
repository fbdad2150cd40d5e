"""Small probes that ``World`` runs *inside* a namespace (standalone script).

    python probe.py wait [--timeout S] HOST:PORT ...
        exit 0 once every address accepts TCP connections, 1 on timeout.

    python probe.py manifests --ca FILE [--creds USER:PASS] < refs.json
        refs.json: [[host, repository, tag], ...]; HEADs each manifest
        (following the registry's Bearer challenge) and prints
        [{"host","repository","tag","status","digest","media_type","size"}].
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def wait(addrs: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    pending = list(addrs)
    while pending:
        host, _, port = pending[0].rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            print("not ready: " + " ".join(pending), file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _parse_challenge(h: str) -> dict:
    scheme, _, rest = h.partition(" ")
    out = {"scheme": scheme.lower()}
    for part in rest.split(","):
        k, _, v = part.strip().partition("=")
        out[k.strip()] = v.strip().strip('"')
    return out


def head_manifest(ctx, host, repo, tag, creds):
    url = f"https://{host}/v2/{repo}/manifests/{tag}"
    headers = {"Accept": ACCEPT}
    for _ in range(2):
        req = urllib.request.Request(url, method="HEAD", headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
                return {
                    "status": r.status,
                    "digest": r.headers.get("Docker-Content-Digest"),
                    "media_type": r.headers.get("Content-Type"),
                    "size": int(r.headers.get("Content-Length") or 0),
                }
        except urllib.error.HTTPError as e:
            if e.code != 401 or "Authorization" in headers:
                return {"status": e.code, "digest": None, "media_type": None, "size": 0}
            ch = _parse_challenge(e.headers.get("WWW-Authenticate", ""))
            q = {"service": ch.get("service", ""), "scope": f"repository:{repo}:pull"}
            treq = urllib.request.Request(ch["realm"] + "?" + urllib.parse.urlencode(q))
            if creds:
                treq.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
            with urllib.request.urlopen(treq, context=ctx, timeout=20) as tr:
                tok = json.load(tr)["token"]
            headers["Authorization"] = "Bearer " + tok
    return {"status": 0, "digest": None, "media_type": None, "size": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--timeout", type=float, default=20)
    w.add_argument("addrs", nargs="+")
    m = sub.add_parser("manifests")
    m.add_argument("--ca", required=True)
    m.add_argument("--creds")
    a = ap.parse_args(argv)
    if a.cmd == "wait":
        return wait(a.addrs, a.timeout)
    ctx = ssl.create_default_context(cafile=a.ca)
    out = []
    for host, repo, tag in json.load(sys.stdin):
        r = head_manifest(ctx, host, repo, tag, a.creds)
        r.update(host=host, repository=repo, tag=tag)
        out.append(r)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Developer entry point.

    python -m tests.world up --prefix rcdev     # stays up until Ctrl-C
    python -m tests.world down --prefix rcdev   # clean leftovers of a crashed run
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from .world import World, cleanup_prefix


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.world")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="bring a world up and keep it until Ctrl-C")
    u.add_argument("--prefix", default="rcdev")
    u.add_argument("--workdir")
    u.add_argument("--no-http2", action="store_true")
    d = sub.add_parser("down", help="remove a world's namespaces, processes and files")
    d.add_argument("--prefix", default="rcdev")
    a = ap.parse_args(argv)

    if a.cmd == "down":
        cleanup_prefix(a.prefix)
        print(f"world {a.prefix} removed")
        return 0

    w = World(prefix=a.prefix, workdir=a.workdir, http2=not a.no_http2)
    # Ctrl-C and SIGTERM -> KeyboardInterrupt so down() runs (SIGINT may be
    # ignored when started in the background by a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        w.up()
        print(w.describe())
        print(f"\nup in {w.timings['total']:.1f}s. Try:\n"
              f"  ip netns exec {w.ns_client} env SSL_CERT_FILE={w.ca_bundle_path} "
              f"REGISTRY_AUTH_FILE={w.auth_file} skopeo inspect docker://registry-1.docker.io/library/small:1\n"
              "Ctrl-C to tear down.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        w.down()
        print("\nworld down", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

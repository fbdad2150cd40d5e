"""Functions run in other processes by the store tests (importable by multiprocessing spawn)."""

from __future__ import annotations

import fcntl
import sys
import time

from regcachelib.store import Store

from .helpers import stage_and_commit


def commit_and_tag(directory: str, data: bytes, tag: str, media_type: str) -> str:
    store = Store(directory)
    try:
        digest = stage_and_commit(store, data)
        store.put_manifest(digest, media_type, data)
        store.set_tag("quay.io", "org/img", tag, media_type, digest)
        store.log_miss({"digest": digest, "pid": __import__("os").getpid()})
        return digest
    finally:
        store.close()


def hold_flock(path: str) -> None:
    """Lock a file and keep the lock until stdin closes (run with python -c)."""
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
        time.sleep(0)

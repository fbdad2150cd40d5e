"""The cache tier's shared backends in the test world: a real S3 (Ceph radosgw) and redis-server,
in a "store" namespace of their own, reachable from the router namespace where the regcache
nodes run.

::

    router ns (<p>-rt) 10.77.3.1  <-- veth -->  10.77.3.2 store ns (<p>-st)
                                                radosgw :7480 (1 mon + 1 osd, ceph-s3.sh)
                                                redis-server :6379

Bring-up takes ~5-10 s (the Ceph cluster). `World.down()` removes the namespace and kills what
runs in it (its prefix's cleanup knows the "st" suffix).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .world import World, WorldError, _sh

HERE = Path(__file__).resolve().parent
CEPH_SCRIPT = HERE / "ceph-s3.sh"
STORE_NET = "10.77.3"
RGW_PORT = 7480
REDIS_PORT = 6379


def tier_available() -> str | None:
    """Why the tier's backends cannot run here, or None."""
    for binary in ("redis-server", "ceph-mon", "ceph-osd", "radosgw"):
        if shutil.which(binary) is None:
            return f"{binary} missing (apt-get install redis-server ceph-mon ceph-osd radosgw)"
    try:
        import boto3  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        return "boto3/redis missing (pip install -e '.[test]')"
    return None


class StoreHost:
    def __init__(self, world: World):
        self.world = world
        self.ns = f"{world.prefix}-st"
        self.router_ip = f"{STORE_NET}.1"
        self.ip = f"{STORE_NET}.2"
        self.dir = world.workdir / "store"
        self.ceph_dir = self.dir / "ceph"
        self.endpoint = f"http://{self.ip}:{RGW_PORT}"
        self.redis_url = f"redis://{self.ip}:{REDIS_PORT}/0"
        self.access_key = "REGCACHETIERTEST0001"
        self.secret_key = os.urandom(20).hex()
        self._redis: subprocess.Popen | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def up(self) -> "StoreHost":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._network()
        self.start_redis()
        self._ceph("up", timeout=180)
        return self

    def down(self) -> None:
        self._ceph("down", check=False)
        self.stop_redis()
        _sh(["ip", "netns", "del", self.ns], check=False)

    def _network(self) -> None:
        p = self.world.prefix
        s0, r2 = f"{p}-s0", f"{p}-r2"
        _sh(["ip", "netns", "add", self.ns])
        _sh(["ip", "-batch", "-"], input=f"link add {s0} type veth peer name {r2}\n"
            f"link set {s0} netns {self.ns}\nlink set {r2} netns {self.world.ns_router}\n")
        # a default route back through the router: clients follow presigned URLs straight here
        _sh(["ip", "-n", self.ns, "-batch", "-"], input=f"link set lo up\nlink set {s0} up\n"
            f"addr add {self.ip}/24 dev {s0}\nroute add default via {self.router_ip}\n")
        _sh(["ip", "-n", self.world.ns_router, "-batch", "-"], input=f"addr add {self.router_ip}/24 dev {r2}\n"
            f"link set {r2} up\n")

    def _env(self) -> dict:
        return {"S3LAB_DIR": str(self.ceph_dir), "S3LAB_BIND": self.ip, "S3LAB_RGW_PORT": str(RGW_PORT),
                "S3LAB_ACCESS_KEY": self.access_key, "S3LAB_SECRET_KEY": self.secret_key,
                "S3LAB_OSD_SIZE": str(4 * 1024**3), "S3LAB_TIMEOUT": "90"}

    def _ceph(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        p = self.world.run(self.ns, ["bash", str(CEPH_SCRIPT), command], env=self._env(), check=False,
                           timeout=timeout)
        if check and p.returncode != 0:
            steps = "\n".join(line for line in p.stderr.splitlines() if line.startswith("[ceph-s3"))
            raise WorldError(f"ceph-s3.sh {command} failed:\n{steps}\n...\n{p.stderr[-2500:]}")
        return p

    # --- faults -------------------------------------------------------------------------------

    def stop_s3(self) -> None:
        self._ceph("rgw-stop")

    def start_s3(self) -> None:
        self._ceph("rgw-start")

    def start_redis(self) -> None:
        log = open(self.dir / "redis.log", "ab")
        self._redis = self.world.popen(self.ns, ["redis-server", "--bind", self.ip, "--port", str(REDIS_PORT),
                                                 "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                                 "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT,
                                       group="store")
        deadline = time.monotonic() + 15
        while self.world.run(self.ns, ["redis-cli", "-h", self.ip, "ping"], check=False).stdout.strip() != "PONG":
            if time.monotonic() > deadline or self._redis.poll() is not None:
                raise WorldError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop_redis(self) -> None:
        if self._redis is not None and self._redis.poll() is None:
            self.world._kill([self._redis])
        self._redis = None

    # --- what a test looks at ------------------------------------------------------------------

    def bucket(self, bucket: str) -> dict:
        """{"objects": {key: size}, "uploads": [unfinished multipart keys]}, asked from inside the
        store namespace (the test process cannot reach it) with boto3."""
        script = (
            "import boto3, json, sys\n"
            "from botocore.config import Config\n"
            "s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],"
            " aws_secret_access_key=sys.argv[3], region_name='us-east-1',"
            " config=Config(s3={'addressing_style': 'path'}, request_checksum_calculation='when_required'))\n"
            "objs = {}\n"
            "for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[4]):\n"
            "    objs.update({o['Key']: o['Size'] for o in page.get('Contents', [])})\n"
            "ups = [u['Key'] for u in s3.list_multipart_uploads(Bucket=sys.argv[4]).get('Uploads', [])]\n"
            "print(json.dumps({'objects': objs, 'uploads': ups}))\n")
        p = self.world.run(self.ns, [sys.executable, "-c", script, self.endpoint, self.access_key, self.secret_key,
                                     bucket], timeout=60)
        return json.loads(p.stdout)

    def tier_config(self, bucket: str, node: str, redirect: bool = False, peer_port: int | None = None) -> str:
        """The `tier:` section of a node's regcache config (credentials by environment name)."""
        return (f"tier:\n  node: {node}\n  s3:\n    endpoint: {self.endpoint}\n    bucket: {bucket}\n"
                f"    region: us-east-1\n    access_key_env: TIER_TEST_KEY\n    secret_key_env: TIER_TEST_SECRET\n"
                f"  redis:\n    url: {self.redis_url}\n" + ("  redirect: true\n" if redirect else "")
                + (f"  peer_port: {peer_port}\n" if peer_port is not None else ""))

    def node_env(self) -> dict:
        return {"TIER_TEST_KEY": self.access_key, "TIER_TEST_SECRET": self.secret_key,
                "NO_PROXY": self.ip, "no_proxy": self.ip}

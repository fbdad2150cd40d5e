"""Cache tier figures (issue 14): what a tier node pays for sharing, measured against the real
backends of the test world (radosgw + redis-server in the store namespace), from the router
namespace where the nodes run.

    python -m bench.tier [--mib 30] [--rounds 300]    (root; ~30 s, most of it the Ceph bring-up)

Prints per-operation latencies (median, p95) of what a node does on top of a single node:
the Redis reads of a hit (publicness verdict, tag), a lease, the S3 HEAD/GET a local miss
makes before upstream, and the S3 read and upload throughput of one blob.
"""

from __future__ import annotations

import argparse
import json
import sys

from tests.world import World
from tests.world.tier import StoreHost

PROBE = r"""
import json, os, statistics, sys, time
import boto3, redis
from botocore.config import Config
from boto3.s3.transfer import TransferConfig
endpoint, key, secret, redis_url, mib, rounds = sys.argv[1:7]
mib, rounds = int(mib), int(rounds)
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                  region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                  request_checksum_calculation="when_required", response_checksum_validation="when_required"))
r = redis.Redis.from_url(redis_url)
s3.create_bucket(Bucket="bench")
r.set("regcache:public:docker.io/library/x", json.dumps([True, time.time()]))
r.sadd("regcache:member:docker.io/library/x", "sha256:" + "a" * 64)
r.hset("regcache:tag:docker.io/library/x:1", "application/vnd.oci.image.manifest.v1+json", json.dumps(["d", 1.0]))
s3.put_object(Bucket="bench", Key="manifests/sha256/m", Body=b"x" * 2000)
out = {}
def timed(name, fn):
    fn()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter(); fn(); samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p95 = samples[int(len(samples) * .95)]
    out[name] = {"median_ms": round(statistics.median(samples), 3), "p95_ms": round(p95, 3)}
timed("redis GET publicness (every hit)", lambda: r.get("regcache:public:docker.io/library/x"))
member = "sha256:" + "a" * 64
timed("redis SISMEMBER membership (local miss)", lambda: r.sismember("regcache:member:docker.io/library/x", member))
timed("redis HGETALL tag (every tag request)", lambda: r.hgetall("regcache:tag:docker.io/library/x:1"))
def lease():
    r.set("regcache:lease:x", "n", nx=True, px=5000); r.delete("regcache:lease:x")
timed("redis lease SET NX PX + DEL", lease)
def head_missing():
    try: s3.head_object(Bucket="bench", Key="blobs/sha256/missing")
    except Exception: pass
timed("S3 HEAD missing blob (a cold miss looks first)", head_missing)
timed("S3 GET 2 KB manifest", lambda: s3.get_object(Bucket="bench", Key="manifests/sha256/m")["Body"].read())
path = "/tmp/bench-tier-blob"
with open(path, "wb") as f:
    f.write(os.urandom(mib << 20))
tc = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=2)
t = time.perf_counter()
with open(path, "rb") as f:
    s3.upload_fileobj(f, "bench", "blobs/sha256/big", Config=tc)
up = time.perf_counter() - t
t = time.perf_counter()
body = s3.get_object(Bucket="bench", Key="blobs/sha256/big")["Body"]
n = 0
while True:
    chunk = body.read(1 << 20)
    if not chunk: break
    n += len(chunk)
down = time.perf_counter() - t
os.unlink(path)
out[f"S3 upload {mib} MiB"] = {"seconds": round(up, 2), "MiB/s": round(mib / up)}
out[f"S3 read {mib} MiB (1 MiB reads, as a fill)"] = {"seconds": round(down, 2), "MiB/s": round(mib / down)}
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args(argv)
    with World(specs=()) as world:
        host = StoreHost(world).up()
        try:
            p = world.run(world.ns_router, [sys.executable, "-c", PROBE, host.endpoint, host.access_key,
                                            host.secret_key, host.redis_url, args.mib, args.rounds], timeout=600)
        finally:
            host.down()
    for name, figures in json.loads(p.stdout).items():
        print(f"{name:50s} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

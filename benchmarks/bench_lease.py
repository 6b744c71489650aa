"""What the S3 cache lock costs: `engine embed` into an S3 cache with the lease vs without
(`ENGINE_S3_LOCK=off`), on the same shards, in one run, against a local S3 API (moto's
server on loopback; needs the `dev` extra). Also the time of one take + release.

Loopback makes every request far cheaper than real S3 (tens of ms per request there): read
the ratio as the lock's share of the engine's own work, and the request counts (take = 1 PUT
and, once per bucket and process, 1 refused PUT; release = 1 DELETE; a heartbeat PUT every
ttl/4 while held) for what it adds on a real store.

    python benchmarks/bench_lease.py                 # 8 shards x 500 shapes images, median of 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from engine.synthetic import ShapesConfig, write_shards  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def embed(shards: list[str], url: str, env: dict) -> float:
    cmd = [sys.executable, "-m", "engine", "embed", *shards, "--cache", url, "--workers", "1", "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"embed failed:\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=50, help="take + release cycles timed")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(CREDENTIALS)
    os.environ["FSSPEC_S3_ENDPOINT_URL"] = endpoint
    import fsspec

    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fsspec.filesystem("s3").mkdir("bench")
    base_env = {**os.environ, "ENGINE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            made = write_shards(tmp, ShapesConfig(classes=20, per_shard=args.per_shard, shards=args.shards, seed=3))
            shards = made["shards"]
            walls: dict[str, list[float]] = {"lock": [], "no_lock": []}
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both
                for name, lock in (("no_lock", "off"), ("lock", "on")):
                    url = f"s3://bench/{uuid.uuid4().hex[:8]}/feats.zarr"
                    walls[name].append(embed(shards, url, {**base_env, "ENGINE_S3_LOCK": lock}))
            from engine.lease import S3Lease

            url = f"s3://bench/{uuid.uuid4().hex[:8]}/feats.zarr"
            S3Lease(url).__enter__().release()  # the once-per-bucket check, outside the timing
            cycle = []
            for _ in range(args.cycles):
                start = time.perf_counter()
                with S3Lease(url):
                    pass
                cycle.append(time.perf_counter() - start)
    finally:
        server.stop()
    images = args.shards * args.per_shard
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "images": images,
        "shards": args.shards,
        "repeats": args.repeats,
        "embed_wall_s": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "lock_over_no_lock": round(med["lock"] / med["no_lock"], 3),
        "take_release_ms_median": round(1000 * statistics.median(cycle), 2),
        "store": "moto server on 127.0.0.1",
    }
    print(f"embed {images} images ({args.shards} shards) into s3:// (moto on loopback), median of {args.repeats}:")
    print(
        f"  without lock {med['no_lock']:.2f} s   with lock {med['lock']:.2f} s   "
        f"ratio {result['lock_over_no_lock']:.3f}"
    )
    print(f"  one take + release: {result['take_release_ms_median']:.1f} ms (median of {args.cycles})")
    path = write_result("lease", result)
    print(f"wrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""`engine embed` with 1 vs N torchrun ranks on the same shards, in one run.

Each configuration is launched as a real torchrun job (`--standalone`, gloo) that embeds the
same shards into a fresh cache; wall time covers everything a user waits for (process start,
model load in every rank, embedding, the final gather and manifest). Each rank keeps its own
DataLoader workers (`--workers`). Reports images/s per configuration (median of `--repeats`)
and the ratio N ranks / 1 rank, and checks every run's cache equals the 1-rank cache.

    python benchmarks/bench_distributed.py                      # 1 vs 2 ranks, shapes-tiny, this CPU
    python benchmarks/bench_distributed.py --ranks 1 2 4 --model ViT-B-32 --pretrained random --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from engine.cache import Cache  # noqa: E402
from engine.synthetic import ShapesConfig, write_shards  # noqa: E402


def run_job(shards: list[str], cache: str, *, ranks: int, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "engine",
        "embed",
        *shards,
        "--cache",
        cache,
        "--workers",
        str(args.workers),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch),
        "--device",
        args.device,
        "--json",
    ]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    threads = max(1, args.threads // ranks) if args.device == "cpu" else args.threads
    env = {**os.environ, "ENGINE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"torchrun with {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return {
        "wall_s": wall,
        "rows": summary["rows"],
        "images_per_s": summary["rows"] / wall,
        "loop_images_per_s": summary["images_per_s"],
    }


def same_cache(a: str, b: str) -> bool:
    ca, cb = Cache(a), Cache(b)
    order_a, order_b = np.argsort(ca.keys()), np.argsort(cb.keys())
    return bool(
        (ca.keys()[order_a] == cb.keys()[order_b]).all()
        and np.array_equal(ca.load_features()[order_a], cb.load_features()[order_b])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank.")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads shared by all ranks (each rank gets threads / ranks).",
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        made = write_shards(
            work / "shards", ShapesConfig(classes=20, per_shard=args.per_shard, shards=args.shards, seed=0)
        )
        results, caches = {}, {}
        for ranks in args.ranks:
            runs = []
            for repeat in range(args.repeats):
                cache = str(work / f"r{ranks}-{repeat}.zarr")
                runs.append(run_job(made["shards"], cache, ranks=ranks, args=args))
                caches.setdefault(ranks, cache)
            results[ranks] = {
                "images_per_s_median": statistics.median(r["images_per_s"] for r in runs),
                "wall_s": [round(r["wall_s"], 2) for r in runs],
                "rows": runs[0]["rows"],
                "loop_images_per_s_median": statistics.median(r["loop_images_per_s"] for r in runs),
            }
            print(
                f"{ranks} rank(s): {results[ranks]['images_per_s_median']:.0f} img/s end to end "
                f"(embed loop {results[ranks]['loop_images_per_s_median']:.0f} img/s), walls {results[ranks]['wall_s']}"
            )
        base = args.ranks[0]
        for ranks in args.ranks[1:]:
            ratio = results[ranks]["images_per_s_median"] / results[base]["images_per_s_median"]
            equal = same_cache(caches[base], caches[ranks])
            results[ranks].update(ratio_vs_first=round(ratio, 3), same_cache_as_first=equal)
            print(f"{ranks} ranks / {base} rank(s): {ratio:.2f}x; same (key, features) set: {equal}")
        path = write_result(
            "distributed",
            {
                "config": vars(args),
                "images": args.shards * args.per_shard,
                "results": {str(k): v for k, v in results.items()},
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

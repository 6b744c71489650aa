"""Seconds per epoch of the MixFix trainer against a naive per-sample Zarr DataLoader loop.

Ours (`engine.train.train_head`): features held on the device once as float16, batches
gathered by index from a class-balanced index stream, mixup, SGD; an epoch is N // batch
iterations plus the MixFix prediction over all N rows.

Naive: the same features in a Zarr v3 array (float16, chunks of `--chunk-rows` rows, as in
the cache), a torch `Dataset` whose `__getitem__` reads one row, a shuffled `DataLoader` with
the same batch size, and the same head, mixup and SGD step. It is timed on `--naive-iters`
iterations (after one warm-up batch) and **extrapolated** to an epoch of N // batch
iterations; it does no MixFix pass, so the ratio against our full epoch is conservative.

The selection is the rows whose noisy label is right (an oracle standing in for CLIPCleaner's
selection: the cost of an epoch does not depend on it, since an epoch is N // batch steps).

    python benchmarks/bench_train.py --quick          # small, well under a minute
    python benchmarks/bench_train.py                  # N=1,000,000, D=512, C=1000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mb, timed, write_result  # noqa: E402
from benchmarks.features import clip_features  # noqa: E402
from engine.runtime import make_generator, resolve_device, set_threads, worker_init_single_thread  # noqa: E402
from engine.train import TrainConfig, build_head, draw_lams, mixup, soft_cross_entropy, train_head  # noqa: E402

_logger = logging.getLogger("bench_train")


def parse_args(argv=None) -> argparse.Namespace:
    from engine.cache import CHUNK_ROWS  # imports zarr; lazily, so bench_ours runs without it

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=20,000, D=128, C=100: well under a minute")
    parser.add_argument("--n", type=int, default=None, help="rows (default 1,000,000; 20,000 with --quick)")
    parser.add_argument("--dim", type=int, default=None, help="feature dims (default 512; 128 with --quick)")
    parser.add_argument("--classes", type=int, default=None, help="classes (default 1000; 100 with --quick)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of our trainer; epoch 1 is warm-up when >= 2")
    parser.add_argument("--naive-iters", type=int, default=None, help="timed naive iterations (50; 20 with --quick)")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="Zarr chunk rows of the naive array")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the naive loop")
    parser.add_argument("--head", default="linear", choices=["linear", "mlp"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: ENGINE_THREADS or all cores)"
    )
    parser.add_argument(
        "--device", default="all", choices=["all", "cpu", "cuda"], help="all = CPU, plus CUDA when present"
    )
    args = parser.parse_args(argv)
    quick = {"n": 20_000, "dim": 128, "classes": 100, "naive_iters": 20}
    full = {"n": 1_000_000, "dim": 512, "classes": 1000, "naive_iters": 50}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def bench_ours(features, labels, selection, *, device: str, args) -> dict:
    config = TrainConfig(head=args.head, epochs=args.epochs, device=device, seed=0)
    result, total, _ = timed(train_head, features, labels, selection, config=config, num_classes=args.classes)
    log = result.log[1:] if len(result.log) > 1 else result.log
    median = lambda key: statistics.median(r[key] for r in log)  # noqa: E731
    return {
        "epoch_seconds": median("seconds"),
        "train_seconds": median("seconds_train"),
        "update_seconds": median("seconds_update"),
        "all_epoch_seconds": [r["seconds"] for r in result.log],
        "wall_seconds": total,
        "selected_after": result.log[-1]["selected"],
    }


def write_zarr(path: Path, features: np.ndarray, chunk_rows: int):
    import zarr

    array = zarr.create_array(
        store=str(path), shape=features.shape, chunks=(chunk_rows, features.shape[1]), dtype="float16"
    )
    for start in range(0, len(features), chunk_rows * 8):
        array[start : start + chunk_rows * 8] = features[start : start + chunk_rows * 8]
    return array


class ZarrRows(torch.utils.data.Dataset):
    """The naive dataset: one Zarr row read per sample."""

    def __init__(self, path: Path, labels: np.ndarray):
        self.path, self.labels, self.array = str(path), labels, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.array is None:  # opened lazily, once per worker
            import zarr

            self.array = zarr.open_array(self.path, mode="r")
        return torch.from_numpy(self.array[i].astype(np.float32)), int(self.labels[i])


def bench_naive(path: Path, labels: np.ndarray, *, device: str, args) -> dict:
    dev = resolve_device(device)
    head = build_head(args.head, args.dim, args.classes, generator=make_generator(0)).to(dev)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        ZarrRows(path, labels),
        batch_size=128,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=make_generator(0),
        worker_init_fn=worker_init_single_thread if args.workers else None,
    )
    lams = draw_lams(np.random.default_rng(0), 1.0, args.naive_iters + 1).tolist()
    perm_gen = make_generator(1)
    start = None
    for i, (x, y) in enumerate(loader):
        if i == 1:
            start = time.perf_counter()  # batch 0 is warm-up (open the array, start workers)
        x, y = x.to(dev), y.to(dev)
        perm = torch.randperm(len(y), generator=perm_gen).to(dev)
        inputs, targets = mixup(x, y, lam=lams[i], perm=perm, num_classes=args.classes)
        loss = soft_cross_entropy(head(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == args.naive_iters:
            break
    float(loss.detach())  # wait for the device
    per_iter = (time.perf_counter() - start) / args.naive_iters
    iterations = len(labels) // 128
    return {
        "seconds_per_iteration": per_iter,
        "timed_iterations": args.naive_iters,
        "epoch_iterations": iterations,
        "epoch_seconds_extrapolated": per_iter * iterations,
    }


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    threads = set_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    start = time.perf_counter()
    features, labels, true, _, _ = clip_features(args.n, args.classes, args.dim, noise="mix", rate=0.4, seed=0)
    selection = labels == true
    made = time.perf_counter() - start
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.zarr"
        write_zarr(path, features, args.chunk_rows)
        for device in devices:
            ours = bench_ours(features, labels, selection, device=device, args=args)
            naive = bench_naive(path, labels, device=device, args=args)
            ratio = naive["epoch_seconds_extrapolated"] / ours["epoch_seconds"]
            runs[device] = {
                "ours": ours,
                "naive": naive,
                "speedup": ratio,
                "speedup_train_only": naive["epoch_seconds_extrapolated"] / ours["train_seconds"],
            }
            print(
                f"{device}: ours {ours['epoch_seconds']:.2f} s/epoch (train {ours['train_seconds']:.2f} + MixFix "
                f"{ours['update_seconds']:.2f}); naive Zarr DataLoader {naive['epoch_seconds_extrapolated']:.1f} "
                f"s/epoch (extrapolated from {args.naive_iters} iterations); ours is {ratio:.1f}x faster"
            )
    payload = {
        "params": {
            "n": args.n,
            "dim": args.dim,
            "classes": args.classes,
            "batch_size": 128,
            "epochs": args.epochs,
            "head": args.head,
            "chunk_rows": args.chunk_rows,
            "naive_iters": args.naive_iters,
            "workers": args.workers,
            "quick": args.quick,
            "threads": threads,
        },
        "data_seconds": made,
        "runs": runs,
        "peak_rss_mb": peak_rss_mb(),
        "note": "naive epoch extrapolated from a fixed number of iterations; ours includes the MixFix pass",
    }
    print(f"results: {write_result('train', payload)}")


if __name__ == "__main__":
    main()

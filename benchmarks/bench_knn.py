"""All-vs-all kNN with the auto index: build + search time, peak RSS, recall@10 against exact
search on a query sample; and exact search against scikit-learn's brute-force NearestNeighbors.

    python benchmarks/bench_knn.py            # N = 1,000,000 x 512, sklearn at N = 100,000
    python benchmarks/bench_knn.py --quick    # small sizes, well under a minute
    python benchmarks/bench_knn.py --n 200000 --sklearn-n 0

Targets (2-core CPU, N = 1M, D = 512, k = 10): build + search <= 10 minutes, recall@10 >= 0.9.
Data: `benchmarks/features.py` CLIP-like features (1000 classes, mixed label noise), float16 unit rows.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import peak_rss_mb, timed, write_result  # noqa: E402
from benchmarks.features import clip_features  # noqa: E402
from engine.index import IndexConfig, _drop_self, build_index, exact_search, knn_all, recall_at_k  # noqa: E402

TARGET_SECONDS = 600.0
TARGET_RECALL = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (well under a minute)")
    parser.add_argument("--n", type=int, default=None, help="rows for the auto-index run (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension (default 512)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--classes", type=int, default=None, help="synthetic classes (default 1000)")
    parser.add_argument("--kind", default=None, help="index kind (default auto; --quick uses ivf)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the auto rule)")
    parser.add_argument("--recall-queries", type=int, default=None, help="query sample for recall (default 10,000)")
    parser.add_argument("--sklearn-n", type=int, default=None, help="rows for the sklearn comparison (0 skips)")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results JSON")
    args = parser.parse_args(argv)
    small = {"n": 30_000, "dim": 128, "classes": 100, "kind": "ivf", "recall_queries": 2000, "sklearn_n": 5000}
    full = {"n": 1_000_000, "dim": 512, "classes": 1000, "kind": "auto", "recall_queries": 10_000, "sklearn_n": 100_000}
    for name, value in (small if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def sample_recall(features, ids: np.ndarray, *, k: int, queries: int, seed: int = 123) -> tuple[float, float]:
    """recall@k of `ids (N, k)` against exact search on `queries` seeded rows -> (recall, seconds)."""
    n = features.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    start = time.perf_counter()
    sims, exact = exact_search(features, np.asarray(features[rows], np.float32), k=k + 1)
    exact = _drop_self(sims, exact, rows)[1]
    return recall_at_k(ids[rows], exact), time.perf_counter() - start


def run_auto(features, *, kind: str, k: int, recall_queries: int, nlist: int | None = None) -> dict:
    """Build the index and run all-vs-all kNN on `features`; timings, RSS and recall."""
    index, build_s, _ = timed(build_index, features, IndexConfig(kind=kind, nlist=nlist), device="cpu")
    (sims, ids), search_s, _ = timed(knn_all, index, features, k=k)
    rss = peak_rss_mb()
    recall, exact_s = sample_recall(features, ids, k=k, queries=recall_queries)
    total = build_s + search_s
    return {
        "n": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "k": k,
        "kind": index.info.kind,
        "params": index.info.params,
        "build_s": round(build_s, 2),
        "search_s": round(search_s, 2),
        "total_s": round(total, 2),
        "peak_rss_mb": round(rss, 1),
        "recall_at_k": round(recall, 4),
        "recall_queries": min(recall_queries, int(features.shape[0])),
        "exact_recall_check_s": round(exact_s, 2),
        "missing_neighbors": int((ids < 0).sum()),
        "meets_time_target": total <= TARGET_SECONDS,
        "meets_recall_target": recall >= TARGET_RECALL,
    }


def run_sklearn(features, *, k: int) -> dict:
    """Exact all-vs-all kNN: engine flat index vs sklearn NearestNeighbors(brute, euclidean)."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(features, dtype=np.float32)

    def ours():
        return knn_all(build_index(x, IndexConfig(kind="flat"), device="cpu"), x, k=k)

    def theirs():
        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(x)
        dist, ids = nn.kneighbors(x)
        return _drop_self(-dist.astype(np.float32), ids, np.arange(x.shape[0]))

    (_, our_ids), our_s, _ = timed(ours)
    (_, their_ids), their_s, _ = timed(theirs)
    return {
        "n": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "k": k,
        "engine_flat_s": round(our_s, 2),
        "sklearn_brute_s": round(their_s, 2),
        "speedup": round(their_s / our_s, 2),
        "neighbor_overlap": round(recall_at_k(our_ids, their_ids), 4),
    }


def print_table(auto: dict, sk: dict | None) -> None:
    params = auto["params"]
    rows = [
        ("index", f"{auto['kind']} {params.get('factory', '')} nprobe={params.get('nprobe')}"),
        ("N x D, k", f"{auto['n']:,} x {auto['dim']}, {auto['k']}"),
        ("build s", f"{auto['build_s']:.1f} ({params.get('seconds')})"),
        ("search s", f"{auto['search_s']:.1f}"),
        (
            "total s",
            f"{auto['total_s']:.1f}  (target <= {TARGET_SECONDS:.0f}: {'yes' if auto['meets_time_target'] else 'NO'})",
        ),
        (
            "recall@k",
            f"{auto['recall_at_k']:.4f} on {auto['recall_queries']:,} queries (target >= "
            f"{TARGET_RECALL}: {'yes' if auto['meets_recall_target'] else 'NO'})",
        ),
        ("peak RSS MB", f"{auto['peak_rss_mb']:.0f}"),
    ]
    if sk:
        rows += [
            ("sklearn N", f"{sk['n']:,} (exact both; overlap {sk['neighbor_overlap']:.4f})"),
            ("engine flat s", f"{sk['engine_flat_s']:.1f}"),
            ("sklearn brute s", f"{sk['sklearn_brute_s']:.1f}"),
            ("speed-up", f"{sk['speedup']:.1f}x"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "no AVX2 module" note is benign
    args = parse_args(argv)
    features, *_ = clip_features(args.n, args.classes, args.dim, noise="mix", seed=0)
    auto = run_auto(features, kind=args.kind, k=args.k, recall_queries=args.recall_queries, nlist=args.nlist)
    del features
    sk = None
    if args.sklearn_n:
        x, *_ = clip_features(args.sklearn_n, args.classes, args.dim, noise="mix", seed=1)
        sk = run_sklearn(x, k=args.k)
    print_table(auto, sk)
    if not args.no_write:
        path = write_result("knn", {"quick": args.quick, "auto": auto, "sklearn": sk})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

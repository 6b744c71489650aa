"""Selection: `engine`'s streaming CLIPCleaner selection against a straightforward scikit-learn
implementation of the authors' procedure, then `engine` alone at a large size.

    python benchmarks/bench_select.py                  # N = 50,000 / C = 100 comparison, then 1,000,000 / 1000
    python benchmarks/bench_select.py --quick          # small sizes, well under a minute
    python benchmarks/bench_select.py --skip-large     # the comparison only
    python benchmarks/bench_select.py --large-only --device cuda

Comparison (D = 512): scikit-learn's LogisticRegression(class_weight='balanced', max_iter=10000)
and one GaussianMixture(n_components=2) per class, numpy zero-shot, whole N x C matrices, the
same thresholds, intersection and fill-in. Targets: engine >= 5x faster, Jaccard agreement of
the final selected sets >= 0.98. Large run (N = 1M, C = 1000, D = 512): <= 30 minutes and
<= 6 GB peak RSS on a 2-core CPU; the large run is a separate process so its peak RSS is its own.
Data: `benchmarks/features.py` (CLIP-like: zero-shot accuracy ~0.65-0.8, a linear probe better, close
class pairs), 40% label noise of `--noise` (default mix: a third each symmetric, hard, instance).
The scikit-learn reference fits with tol 1e-4 / N, which is the authors' scikit-learn 1.2.2 rule.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import peak_rss_mb, timed, write_result  # noqa: E402
from benchmarks.features import clip_features  # noqa: E402
from engine.select import SelectConfig, select_samples, selection_metrics  # noqa: E402

TARGET_SPEEDUP = 5.0
TARGET_JACCARD = 0.98
TARGET_LARGE_SECONDS = 1800.0
TARGET_LARGE_RSS_MB = 6144.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (well under a minute)")
    parser.add_argument("--skip-large", action="store_true", help="only the comparison with scikit-learn")
    parser.add_argument("--large-only", action="store_true", help="only the large engine run")
    parser.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda")
    parser.add_argument("--n", type=int, default=None, help="comparison rows (default 50,000)")
    parser.add_argument("--classes", type=int, default=None, help="comparison classes (default 100)")
    parser.add_argument("--large-n", type=int, default=None, help="large-run rows (default 1,000,000)")
    parser.add_argument("--large-classes", type=int, default=None, help="large-run classes (default 1000)")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension (default 512)")
    parser.add_argument("--noise", default="mix", help="sym, hard or mix (default)")
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="clipcleaner,robust", help="modes of the large runs")
    parser.add_argument("--mid-n", type=int, default=None, help="a second large run first (default 100,000)")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results JSON")
    args = parser.parse_args(argv)
    small = {"n": 5000, "classes": 20, "large_n": 50_000, "large_classes": 100, "dim": 64, "mid_n": 0}
    full = {"n": 50_000, "classes": 100, "large_n": 1_000_000, "large_classes": 1000, "dim": 512, "mid_n": 100_000}
    for name, value in (small if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ----------------------------------------------------------------------------- the reference


def _sk_zeroshot(x: np.ndarray, text: np.ndarray, tau: float = 0.07) -> np.ndarray:
    """P_zs (N, C) float32 with numpy, the whole matrix at once."""
    sims = np.einsum("nd,cpd->ncp", x, text) / tau
    top = sims.max(axis=(1, 2), keepdims=True)
    s = np.exp(sims - top).sum(axis=2)
    return (s / s.sum(axis=1, keepdims=True)).astype(np.float32)


def _sk_pairs(
    probs: np.ndarray, labels: np.ndarray, num_classes: int, *, theta_cons: float, theta_gmm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(consistency mask, loss mask, normalised loss) for one classifier, the authors' way."""
    from sklearn.mixture import GaussianMixture

    rows = np.arange(len(labels))
    p_label = probs[rows, labels]
    consistency = p_label / probs.max(axis=1) >= theta_cons
    loss = np.log(np.maximum(p_label, 1e-45))
    normalised = np.ones(len(labels))
    passed = np.ones(len(labels), bool)
    for k in range(num_classes):
        members = labels == k
        values = loss[members]
        if members.sum() < 2 or values.max() == values.min():
            continue
        values = (values - values.min()) / (values.max() - values.min())
        normalised[members] = values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gmm = GaussianMixture(n_components=2, random_state=0).fit(values[:, None])
        posterior = gmm.predict_proba(values[:, None])[:, np.argmax(gmm.means_[:, 0])]
        passed[members] = posterior >= theta_gmm
    return consistency, passed, normalised


def sklearn_select(features, labels, text, num_classes: int, *, theta_cons=0.8, theta_gmm=0.5) -> np.ndarray:
    """The authors' procedure with scikit-learn: zero-shot + balanced logistic regression, 4 pairs,
    intersection, fill-in of empty classes by the highest zero-shot normalised loss."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, np.float32)
    p_zs = _sk_zeroshot(x, text)
    # scikit-learn >= 1.4 divides the objective by N but keeps tol: tol / N is the authors' (1.2.2) rule
    p_lin = (
        LogisticRegression(class_weight="balanced", max_iter=10_000, tol=1e-4 / len(labels))
        .fit(x, labels)
        .predict_proba(x)
    )
    zs_cons, zs_loss, zs_norm = _sk_pairs(p_zs, labels, num_classes, theta_cons=theta_cons, theta_gmm=theta_gmm)
    li_cons, li_loss, _ = _sk_pairs(p_lin, labels, num_classes, theta_cons=theta_cons, theta_gmm=theta_gmm)
    selected = zs_cons & zs_loss & li_cons & li_loss
    counts = np.bincount(labels[selected], minlength=num_classes)
    present = np.bincount(labels, minlength=num_classes) > 0
    if ((counts == 0) & present).any():
        nonzero = counts[counts > 0]
        m = max(int(nonzero.min()) if len(nonzero) else 0, len(labels) // num_classes**2, 1)
        for k in np.flatnonzero((counts == 0) & present):
            members = np.flatnonzero(labels == k)
            selected[members[np.argsort(-zs_norm[members], kind="stable")[:m]]] = True
    return selected


# ----------------------------------------------------------------------------- runs


def _data(n, classes, dim, args):
    start = time.perf_counter()
    feats, labels, truth, text, _ = clip_features(n, classes, dim, noise=args.noise, rate=args.rate, seed=args.seed)
    return feats, labels.astype(np.int64), truth, text, time.perf_counter() - start


def compare(args) -> dict:
    feats, labels, truth, text, _ = _data(args.n, args.classes, args.dim, args)
    config = SelectConfig(device=args.device)
    result, engine_s, _ = timed(select_samples, feats, labels, text_features=text, true_labels=truth, config=config)
    reference, sklearn_s, _ = timed(sklearn_select, feats, labels, text, args.classes)
    union = (result.selected | reference).sum()
    return {
        "n": args.n,
        "classes": args.classes,
        "dim": args.dim,
        "engine_s": engine_s,
        "sklearn_s": sklearn_s,
        "speedup": sklearn_s / engine_s,
        "jaccard": float((result.selected & reference).sum() / max(union, 1)),
        "engine": result.metrics,
        "sklearn": selection_metrics(reference, labels, truth),
        "engine_timings": result.timings,
        "linear_fit": result.classifier_info["linear"]["fit"],
    }


def large(args, n=None, mode="clipcleaner") -> dict:
    n = n or args.large_n
    feats, labels, truth, text, data_s = _data(n, args.large_classes, args.dim, args)
    start = time.perf_counter()
    result = select_samples(
        feats, labels, text_features=text, true_labels=truth, config=SelectConfig(mode=mode, device=args.device)
    )
    wall = time.perf_counter() - start
    stages = {k: v for k, v in result.timings.items()}
    return {
        "mode": mode,
        "n": n,
        "classes": args.large_classes,
        "dim": args.dim,
        "data_s": data_s,
        "select_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "timings": stages,
        "dominant_stage": max(stages, key=stages.get),
        "metrics": result.metrics,
        "linear_fit": result.classifier_info.get("linear", {}).get("fit"),
        "noise": result.noise_summary,
        "selected": result.counts["final"],
        "warnings": result.warnings,
    }


def _large_child(args, n, mode, queue) -> None:
    queue.put(large(args, n, mode))


def large_in_child(args, n=None, mode="clipcleaner") -> dict:
    """A large run in a fresh process, so that its peak RSS is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_large_child, args=(args, n, mode, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def print_table(cmp: dict | None, bigs: list) -> None:
    rows = []
    if cmp:
        rows += [
            ("comparison", f"N={cmp['n']:,} C={cmp['classes']} D={cmp['dim']}"),
            ("engine / sklearn seconds", f"{cmp['engine_s']:.1f} / {cmp['sklearn_s']:.1f}"),
            ("speed-up", f"{cmp['speedup']:.1f}x (target >= {TARGET_SPEEDUP:.0f}x)"),
            ("Jaccard of selections", f"{cmp['jaccard']:.4f} (target >= {TARGET_JACCARD})"),
        ]
        for who in ("engine", "sklearn"):
            m = cmp[who]
            rows.append((f"{who} P / R / F1", f"{m['precision']:.4f} / {m['recall']:.4f} / {m['f1']:.4f}"))
    for big in bigs:
        accuracy = big["metrics"]["accuracy"]
        rows += [
            ("large", f"{big['mode']}: N={big['n']:,} C={big['classes']} D={big['dim']}"),
            ("classifier accuracy", ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())),
        ]
        if big["linear_fit"]:
            fit = big["linear_fit"][0]
            rows.append(
                ("linear fit", f"{fit['n_iter']} iterations, stop {fit['stop']}, max |grad| {fit['grad_max']:.3g}")
            )
        rows += [
            ("select wall", f"{big['select_s']:.1f} s (target <= {TARGET_LARGE_SECONDS:.0f} s)"),
            ("peak RSS", f"{big['peak_rss_mb']:.0f} MB (target <= {TARGET_LARGE_RSS_MB:.0f} MB)"),
            ("dominant stage", f"{big['dominant_stage']} ({big['timings'][big['dominant_stage']]:.1f} s)"),
            ("stages", ", ".join(f"{k} {v:.1f}" for k, v in big["timings"].items())),
            ("large P / R / F1", "{precision:.4f} / {recall:.4f} / {f1:.4f}".format(**big["metrics"])),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cmp = None if args.large_only else compare(args)
    bigs, path = [], None

    def save():  # after every run, so that a long run stopped later keeps what it measured
        nonlocal path
        if args.no_write:
            return
        result = {
            "quick": args.quick,
            "device": args.device,
            "noise": args.noise,
            "rate": args.rate,
            "seed": args.seed,
            "features": "benchmarks/features.py clip_features",
            "comparison": cmp,
            "large": bigs,
        }
        path = write_result("select-gpu" if args.device.startswith("cuda") else "select", result, path=path)

    save()
    if not args.skip_large:
        for n in ([args.mid_n] if args.mid_n else []) + [args.large_n]:
            for mode in args.modes.split(","):
                bigs.append(large_in_child(args, n, mode))
                print_table(None, bigs[-1:])
                save()
    print_table(cmp, bigs)
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

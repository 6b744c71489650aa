"""Selection quality under many kinds of label noise: precision / recall / F1 and time of

  clipcleaner  `engine select` (the paper's procedure, the default mode)
  robust       `engine select --mode robust`
  cleanlab     cleanlab.filter.find_label_issues(labels, pred_probs) on 5-fold out-of-fold
               probabilities of the engine's linear classifier (its time includes the 5 fits);
               clean = not an issue (a baseline only)

on data sets from two structurally different generators (benchmarks/features.py: `clip_features`
and `tree_features` with a weak and a strong zero-shot witness) and on the shapes images embedded
by the bundled model. Prints a table and writes benchmarks/results/quality-*.json.

    python benchmarks/bench_quality.py              # the default matrix (about an hour on 2 cores)
    python benchmarks/bench_quality.py --quick      # small sizes, a few minutes
    python benchmarks/bench_quality.py --full       # every rate and kind, two seeds (hours)
    python benchmarks/bench_quality.py --timing     # also the time ratio robust / clipcleaner at 50k x 100

Targets (issue): hard 0.4 at 100 classes F1 >= 0.90 with precision >= 0.92; symmetric 0.5 F1 >=
0.97; instance noise no more than 0.03 below the better anchor; shapes hard 0.4 above both anchors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.features import clip_features, tree_features  # noqa: E402
from engine.select import SelectConfig, select_samples, selection_metrics  # noqa: E402

METHODS = ("clipcleaner", "robust", "cleanlab")


def settings(args) -> list[tuple]:
    """(source, classes, noise, rate, seed) of the matrix."""
    if args.quick:
        return [("clip", 10, k, r, 0) for k, r in (("sym", 0.5), ("hard", 0.4), ("instance", 0.4))] + [
            ("shapes", 20, "hard", 0.4, 0)
        ]
    seeds = (0, 1) if args.full else (0,)
    kinds = (
        [("sym", r) for r in (0.2, 0.4, 0.5, 0.6)]
        + [("hard", r) for r in (0.2, 0.4, 0.6)]
        + [("instance", 0.4), ("idn", 0.4), ("mix", 0.4)]
        if args.full
        else [("sym", 0.2), ("sym", 0.5), ("hard", 0.2), ("hard", 0.4), ("instance", 0.4), ("idn", 0.4), ("mix", 0.4)]
    )
    out = [("clip", c, k, r, s) for c in (10, 100) for k, r in kinds for s in seeds]
    out += [("clip", 1000, k, 0.4, s) for k in ("sym", "hard", "mix") for s in seeds]
    out += [(f"tree-{w}", 100, k, 0.4, s) for w in ("weak", "strong") for k in ("sym", "hard", "mix") for s in seeds]
    out += [("shapes", 30, k, 0.4, 0) for k in ("sym", "hard", "mix")]
    return out


def data(source: str, classes: int, noise: str, rate: float, seed: int, args) -> dict:
    """{features, labels, true, text, mask} of one setting."""
    if source == "shapes":
        return shapes(classes, noise, rate, seed, args)
    n = {10: 20_000, 100: 50_000, 1000: 50_000}[classes] if not args.quick else 4000
    dim = 512 if not args.quick else 128
    if source == "clip":
        f, y, t, text, _ = clip_features(n, classes, dim, noise=noise, rate=rate, seed=seed)
    else:
        f, y, t, text = tree_features(
            n, classes, 256 if not args.quick else 128, noise=noise, rate=rate, seed=seed, witness=source.split("-")[1]
        )
    return {
        "features": f,
        "labels": y.astype(np.int64),
        "true": t.astype(np.int64),
        "text": text,
        "mask": np.ones(text.shape[:2], bool),
    }


def shapes(classes: int, noise: str, rate: float, seed: int, args) -> dict:
    """The shapes set with `noise`, embedded by the bundled model (4,000 images; --quick 1,000)."""
    from engine.cache import Cache
    from engine.embed import EmbedConfig, embed_shards
    from engine.synthetic import ShapesConfig, write_shards

    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    per = 250 if args.quick else 500
    made = write_shards(
        work / "s", ShapesConfig(classes=classes, per_shard=per, shards=4, noise=noise, rate=rate, seed=seed + 1)
    )
    embed_shards(
        made["shards"],
        str(work / "c.zarr"),
        EmbedConfig(classes=made["classes_file"], true_label_key="true_cls", workers=1),
        show_progress=False,
    )
    cache = Cache(str(work / "c.zarr"))
    text, mask = cache.text_features()
    return {
        "features": cache.load_features(),
        "labels": cache.labels().astype(np.int64),
        "true": cache.true_labels().astype(np.int64),
        "text": text,
        "mask": mask,
    }


def run(method: str, d: dict) -> dict:
    start = time.perf_counter()
    if method == "cleanlab":
        selected = cleanlab_clean(d)
    else:
        r = select_samples(
            d["features"],
            d["labels"],
            text_features=d["text"],
            text_mask=d["mask"],
            config=SelectConfig(mode=method, device="cpu"),
        )
        selected = r.selected
    seconds = time.perf_counter() - start
    m = selection_metrics(selected, d["labels"], d["true"])
    return {k: round(m[k], 4) for k in ("precision", "recall", "f1")} | {"seconds": round(seconds, 2)}


def cleanlab_clean(d: dict, folds: int = 5) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    from engine.classifiers import fit_linear_folds, linear_oof_log_probs

    models, fold = fit_linear_folds(d["features"], d["labels"], folds=folds, device="cpu", seed=0)
    feats, fold_t = torch.from_numpy(np.asarray(d["features"])), torch.from_numpy(fold)
    probs = np.empty((len(d["labels"]), models[0].weight.shape[0]), np.float32)
    for s in range(0, len(probs), 16384):
        probs[s : s + 16384] = linear_oof_log_probs(models, fold_t[s : s + 16384], feats[s : s + 16384]).exp().numpy()
    return ~find_label_issues(d["labels"], probs)


def timing(args) -> dict:
    """clipcleaner and robust back to back, 3 times, at 50,000 x 100 x 512 (hard 0.4)."""
    d = data("clip", 100, "hard", 0.4, 0, argparse.Namespace(quick=False))
    times = {m: [] for m in ("clipcleaner", "robust")}
    for _ in range(3):
        for m in times:
            times[m].append(run(m, d)["seconds"])
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"seconds": times, "median": med, "robust_over_clipcleaner": round(med["robust"] / med["clipcleaner"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--only", default=None, help="run only settings whose name contains this")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    methods = [m for m in args.methods.split(",") if m]
    print(f"{'setting':<32}" + "".join(f"{m + ' P/R/F1 (s)':>30}" for m in methods), flush=True)
    for source, classes, noise, rate, seed in settings(args):
        name = f"{source}-C{classes}-{noise}{rate}-s{seed}"
        if args.only and args.only not in name:
            continue
        d = data(source, classes, noise, rate, seed, args)
        row = {
            "setting": name,
            "source": source,
            "classes": classes,
            "noise": noise,
            "rate": rate,
            "seed": seed,
            "rows": len(d["labels"]),
            "actual_noise": round(float((d["labels"] != d["true"]).mean()), 4),
        }
        for m in methods:
            row[m] = run(m, d)
        rows.append(row)
        print(
            f"{name:<32}"
            + "".join(
                f"{row[m]['precision']:>10.3f}/{row[m]['recall']:.3f}/{row[m]['f1']:.3f} ({row[m]['seconds']:>5.1f})"
                for m in methods
            ),
            flush=True,
        )
    result = {"rows": rows, "methods": methods, "quick": args.quick, "full": args.full}
    if args.timing:
        result["timing"] = timing(args)
        print("time robust / clipcleaner at 50k x 100:", result["timing"]["robust_over_clipcleaner"])
    print("wrote", write_result("quality", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

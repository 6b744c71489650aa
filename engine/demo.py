"""`engine demo`: the whole job end to end on the bundled offline default.

Draws a shapes training set with 40% label noise (half symmetric, half flips to the close
partner) and a clean test set, embeds both with `shapes-tiny`, then runs every later stage
on the cache: selection, diagnostics, MixFix training with baselines, and the HTML report of
what the selection rejected (WORKDIR/report/index.html).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from engine.embed import EmbedConfig, embed_shards
from engine.runtime import EngineError
from engine.synthetic import ShapesConfig, write_shards

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    classes: int = 20
    train_shards: int = 8
    per_shard: int = 500
    test_images: int = 1000
    noise: str = "mix"
    rate: float = 0.4
    seed: int = 0
    epochs: int = 30
    workers: int | None = None


def _stage(summary: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    summary.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
    return result


_MARKER = ".engine-demo"
_OUTPUTS = (
    "shards",
    "test-shards",
    "train.zarr",
    "test.zarr",
    "selection.csv",
    "head.pt",
    "head.metrics.jsonl",
    "head.pt.state",
    "report",
)


def _fresh_workdir(work: Path) -> Path:
    """An empty or earlier-demo folder, emptied of the demo's own outputs (cached shards of an
    earlier run with other settings would otherwise be skipped as done)."""
    import shutil

    if work.exists() and any(work.iterdir()) and not (work / _MARKER).exists():
        raise EngineError(f"out: {work} exists and is not a demo folder; give an empty or new --out")
    for name in _OUTPUTS:
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).write_text("made by engine demo\n")
    return work


def run_demo(workdir: str | Path, config: DemoConfig = DemoConfig(), *, show_progress: bool | None = None) -> dict:
    """Run every stage into `workdir`; returns a summary of what was found."""
    work = _fresh_workdir(Path(workdir))
    summary: dict = {"workdir": str(work)}
    train = ShapesConfig(
        classes=config.classes,
        per_shard=config.per_shard,
        shards=config.train_shards,
        noise=config.noise,
        rate=config.rate,
        seed=config.seed,
        prefix="train",
    )
    test = ShapesConfig(
        classes=config.classes,
        per_shard=config.test_images,
        shards=1,
        noise="none",
        rate=0.0,
        seed=config.seed + 1,
        prefix="test",
    )
    made = _stage(summary, "make_shards", write_shards, work / "shards", train)
    _stage(summary, "make_shards_test", write_shards, work / "test-shards", test)
    summary["data"] = {
        "train_images": made["samples"],
        "classes": config.classes,
        "noisy_labels": made["noisy"],
        "noise_rate": round(made["noise_rate"], 4),
        "test_images": config.test_images,
    }
    embed_cfg = EmbedConfig(classes=made["classes_file"], true_label_key="true_cls", workers=config.workers)
    train_cache, test_cache = str(work / "train.zarr"), str(work / "test.zarr")
    summary["embed"] = _stage(
        summary, "embed", embed_shards, made["shards"], train_cache, embed_cfg, show_progress=show_progress
    )
    summary["embed_test"] = _stage(
        summary,
        "embed_test",
        embed_shards,
        [str(p) for p in sorted((work / "test-shards").glob("*.tar"))],
        test_cache,
        embed_cfg,
        show_progress=show_progress,
    )
    summary["caches"] = {"train": train_cache, "test": test_cache}
    _later_stages(summary, config, work, train_cache, test_cache, show_progress=show_progress)
    return summary


def _later_stages(
    summary: dict,
    config: DemoConfig,
    work: Path,
    train_cache: str,
    test_cache: str,
    *,
    show_progress: bool | None = None,
) -> None:
    from engine.report import write_report
    from engine.select import SelectConfig
    from engine.stages import diagnose_from_cache, select_from_cache, train_from_cache
    from engine.train import TrainConfig

    summary["diagnose"] = _stage(summary, "diagnose", diagnose_from_cache, train_cache, k=10, top=5)
    summary["select"] = _stage(
        summary, "select", select_from_cache, train_cache, SelectConfig(), out=str(work / "selection.csv")
    )
    train_cfg = TrainConfig(epochs=config.epochs, seed=config.seed)
    summary["train"] = _stage(
        summary,
        "train",
        train_from_cache,
        train_cache,
        train_cfg,
        eval_cache=test_cache,
        out=str(work / "head.pt"),
        baselines=True,
    )
    summary["report"] = _stage(
        summary, "report", write_report, train_cache, str(work / "report"), show_progress=show_progress
    )


def summary_lines(s: dict):
    d = s["data"]
    yield (
        f"data: {d['train_images']} training images of {d['classes']} shape classes, "
        f"{d['noisy_labels']} with a wrong label ({d['noise_rate']:.1%}); {d['test_images']} clean test images"
    )
    e = s["embed"]
    yield (
        f"embed: {e['rows']} rows at {e['images_per_s']} img/s ({e['model']}, {e['precision']}) "
        f"-> {s['caches']['train']}"
    )
    if "diagnose" in s:
        g = s["diagnose"]
        yield "diagnose: most confusable classes (image centroids): " + ", ".join(
            f"{p['a']}/{p['b']}" for p in g["confusable_image"][:4]
        )
        yield "          labels whose neighbors disagree most: " + ", ".join(
            f"{w['label']} -> {w['neighbors_say']} ({w['count']})" for w in g["swaps"][:4]
        )
    if "select" in s:
        c, m = s["select"]["counts"], s["select"].get("metrics") or {}
        yield (
            f"select: kept {c['final']} of {s['select']['rows']} samples; precision {m.get('precision', 0):.3f}, "
            f"recall {m.get('recall', 0):.3f} (of the correctly labelled), F1 {m.get('f1', 0):.3f}"
        )
        yield "        classifier accuracy vs true labels: " + ", ".join(
            f"{k} {v:.3f}" for k, v in m.get("accuracy", {}).items()
        )
    if "train" in s:
        t = {row["run"]: row.get("eval_acc") for row in s["train"]["table"]}
        yield (
            f"train (linear head, {s['train']['epochs']} epochs) - test accuracy: all noisy labels "
            f"{t.get('noisy', 0):.3f} | selection only {t.get('selection', 0):.3f} | MixFix {t.get('mixfix', 0):.3f}"
        )
    yield f"time per stage (s): {s['seconds']}"
    if "report" in s:
        r = s["report"]
        yield (
            f"report: {r['index']} ({r['shown']} rejected samples shown, {r['thumbnails']} thumbnails, "
            f"{r['placeholders']} placeholders)"
        )

"""`engine report`: a static HTML report of what a selection rejected (summary, per-class chart,
confusable-class heatmap, one gallery page per class with neighbors and thumbnails read back
from the shards), built beside its folder and swapped in when complete. The folder layout, the
scale rules and the recovery of killed runs: docs/commands.md#report, docs/architecture.md.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.cache import Cache
from engine.outputs import FolderSwap
from engine.report.config import MARKER, OUTPUTS, ReportConfig
from engine.report.html import class_file, class_page, list_pages
from engine.report.rows import (
    Rows,
    class_stats,
    confusable_classes,
    find_neighbors,
    rank_rejected,
    read_rows,
)
from engine.report.thumbnails import Thumbnails, write_thumbnails
from engine.runtime import Timer, resolve_device

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the report
def _placeholder_summary(thumbs: Thumbnails) -> tuple[dict, list]:
    reasons: dict[str, int] = {}
    missing = set()
    for kind, detail in thumbs.problems.values():
        reasons[kind] = reasons.get(kind, 0) + 1
        if kind == "shard missing":
            missing.add(detail)
    return reasons, sorted(missing)


def report_folder(out: Path) -> FolderSwap:
    """The report's output folder: marked by MARKER, replaced whole (`engine.outputs.FolderSwap`)."""
    return FolderSwap(Path(out), command="report", marker=MARKER, outputs=OUTPUTS)


def write_report(
    cache_path: str,
    out_dir: str,
    config: ReportConfig | None = None,
    *,
    device: str = "auto",
    show_progress: bool | None = None,
) -> dict:
    """Write the HTML report of the cache's selection into `out_dir`; returns a summary.

    The report is built in a hidden folder next to `out_dir` and swapped in when complete, so a
    failure leaves an earlier report there untouched.

    Memory: the cache's row columns and selection, plus the features (N x D float16) when
    neighbors or image-centroid similarities have to be computed."""
    config = config or ReportConfig()
    started, timer = time.perf_counter(), Timer()
    out = Path(out_dir)
    folder = report_folder(out)
    for line in folder.recover():  # a run killed mid-way (SIGKILL, power) leaves hidden folders
        _logger.warning("report: %s", line)
    folder.check()
    resolve_device(device)  # `--device cuda` without CUDA fails here, before any work
    cache = Cache(cache_path)
    with timer("load"):
        data = read_rows(cache)
    stage = folder.stage(("classes",))  # built here, swapped in at the end: a failure leaves the earlier report
    try:
        summary = _write(cache, cache_path, data, stage, out, config, device, show_progress, timer, started)
        folder.swap_in(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        folder.release()
    return summary


def _write(
    cache: Cache,
    cache_path: str,
    data: Rows,
    stage: Path,
    out: Path,
    config: ReportConfig,
    device: str,
    show_progress: bool | None,
    timer: Timer,
    started: float,
) -> dict:
    """The report's files, written into `stage`; paths in the summary name `out`."""
    num_classes = len(data.names)
    stats = class_stats(data.labels, data.selected, num_classes, data.true)
    shown = rank_rejected(data.labels, data.selected, data.suspicion, per_class=config.per_class)
    k = min(config.neighbors, max(0, cache.num_rows - 1))
    features = functools.cache(cache.load_features)  # read at most once, only when needed
    with timer("neighbors"):
        sims, ids, source = find_neighbors(cache, shown, k, device=device, features=features)
    with timer("thumbnails"):
        thumbs = write_thumbnails(
            np.concatenate([shown, ids[ids >= 0]]),
            data,
            stage,
            size=config.thumb,
            workers=config.workers,
            show_progress=show_progress,
            previous=out if (out / MARKER).is_file() else None,
        )
    with timer("similarity"):
        conf = confusable_classes(cache, data, min(config.heatmap_classes, num_classes), features=features)
    reasons, missing = _placeholder_summary(thumbs)
    info = {
        "thumbnails": len(thumbs.paths),
        "thumb": config.thumb,
        "placeholders": len(thumbs.problems),
        "placeholder_reasons": reasons,
        "neighbors": k,
        "neighbor_source": source,
        "seconds": timer.rounded(2),
    }
    with timer("pages"):
        pages = list_pages(cache, data, stats, conf, info, config)
        bounds = np.searchsorted(data.labels[shown], np.arange(num_classes + 1))
        for c in range(num_classes):
            part = slice(bounds[c], bounds[c + 1])
            pages[class_file(c, num_classes)] = class_page(
                c, shown[part], sims[part], ids[part], data, stats, thumbs, config
            )
        for name, text in pages.items():
            (stage / name).write_text(text, encoding="utf-8")
    summary = {
        "cache": cache_path,
        "out": str(out),
        "index": str(out / "index.html"),
        "pages": len(pages),
        "list_pages": len(pages) - num_classes,
        "class_pages": num_classes,
        "classes": num_classes,
        "rows": len(data.labels),
        "selected": int(data.selected.sum()),
        "rejected": int(stats["rejected"].sum()),
        "shown": int(shown.size),
        "thumbnails": info["thumbnails"],
        "thumbnails_reused": thumbs.reused,
        "placeholders": info["placeholders"],
        "placeholder_reasons": reasons,
        "missing_shards": missing,
        "neighbors": {"k": k, "source": source},
        "heatmap": None if conf is None else {"classes": len(conf.classes), "source": conf.source},
        "config": asdict(config),
        "seconds": {**timer.rounded(), "total": round(time.perf_counter() - started, 3)},
    }
    (stage / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_lines(s: dict):
    """The short stdout summary of `write_report`."""
    yield (
        f"report: {s['index']} ({s['list_pages']} list page{'s' * (s['list_pages'] != 1)}, "
        f"{s['class_pages']} class pages)"
    )
    yield (
        f"  shown {s['shown']} of {s['rejected']} rejected samples, {s['neighbors']['k']} neighbors each "
        f"({s['neighbors']['source']}); {s['thumbnails']} thumbnails"
        + (f" ({s['thumbnails_reused']} from the previous report)" if s.get("thumbnails_reused") else "")
        + f", {s['placeholders']} placeholders"
        + (f" (shards missing: {', '.join(s['missing_shards'][:3])})" if s["missing_shards"] else "")
    )
    yield f"  in {s['seconds']['total']:.2f} s"

"""Cache-level entry points of the stages after `embed`: read the cache, call the array-level
core (`select`, `index`, `train`), and write the results back into the cache's result groups
(`selection/`, `index/`, `diagnostics/`, `train/`) with the configuration and timings.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from engine.cache import Cache
from engine.results import Diagnostics, IndexGroup, Neighbors, Selection, Training
from engine.runtime import EngineError, Timer

_logger = logging.getLogger(__name__)


def _class_names(cache: Cache, labels: np.ndarray) -> list[str]:
    names = cache.class_names
    if names:
        return list(names)
    count = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    return [f"class {k}" for k in range(count)]


def _same_features(a: Cache, b: Cache, what: str) -> None:
    from engine.models import describe, same_model

    if not same_model(a.identity, b.identity):
        raise EngineError(
            f"{what}: {b.path} holds features of {describe(b.identity)}, but {a.path} holds "
            f"{describe(a.identity)}; embed both with the same model"
        )


# ---------------------------------------------------------------- select
def neighbors_for(cache: Cache, features, *, k: int, device: str) -> Neighbors:
    """The cache's current `knn/` group for exactly k neighbors, computed (and stored) when
    missing or stale."""
    from engine import index as ix

    stored = Neighbors.current(cache, k=k, features=features)
    if stored is not None:
        return Neighbors.read(cache)
    index = load_cached_index(cache, features, device=device)
    sims, ids = ix.knn_all(index, features, k=k)
    found = Neighbors(ids=ids, similarities=sims, k=k, fingerprint=index.info.fingerprint, index=index.info.kind)
    found.write(cache)
    return found


def select_from_cache(
    cache_path: str,
    config,
    *,
    out: str | None = None,
    probs_dir: str | None = None,
    knn_k: int = 10,
    show_progress: bool | None = None,
) -> dict:
    """CLIPCleaner selection on the cache; results into `selection/`, optional table and P matrices."""
    from engine.select import select_samples

    check_table_path(out)
    cache = Cache(cache_path, mode="a")
    if cache.num_rows == 0:
        raise EngineError(f"cache: {cache_path} has no rows; embed or import features first")
    timer = Timer()
    with timer("load"):
        features, labels, true = cache.load_features(), cache.labels(), cache.true_labels()
    text, mask = cache.text_features() if cache.has_text() else (None, None)
    num_classes = text.shape[0] if text is not None else len(_class_names(cache, labels))
    neighbors = None
    if "knn" in config.classifiers:
        with timer("knn"):
            found = neighbors_for(cache, features, k=knn_k, device=config.device)
            neighbors = (np.asarray(found.similarities), np.asarray(found.ids))
    if probs_dir:
        Path(probs_dir).mkdir(parents=True, exist_ok=True)
    with timer("select_total"):
        result = select_samples(
            features,
            labels,
            text_features=text,
            text_mask=mask,
            config=config,
            num_classes=num_classes,
            neighbors=neighbors,
            true_labels=true,
            probs_dir=probs_dir,
            show_progress=show_progress,
        )
    summary = {"cache": cache_path, **result.summary(), "seconds": {**timer.rounded(), **result.timings}}
    if summary.get("noise"):
        names = _class_names(cache, labels)
        name = lambda k: names[k] if 0 <= k < len(names) else f"class {k}"  # noqa: E731
        for pair in summary["noise"]["top_pairs"]:
            pair.update(given_name=name(pair["given"]), true_name=name(pair["true"]))
        for entry in summary["noise"]["noisiest_classes"]:
            entry["name"] = name(entry["class"])
    stored = Selection.from_result(result, {k: v for k, v in summary.items() if k != "cache"})
    stored.write(cache)
    columns = stored.table_columns()
    if out:
        table = {"key": cache.keys(), "label": labels, **columns}
        if true is not None:
            table["true_label"] = true
        write_table(out, table)
        summary["out"] = out
    if probs_dir:
        summary["probs"] = sorted(str(p) for p in Path(probs_dir).glob("probs_*.npy"))
    return summary


# ---------------------------------------------------------------- train / predict
def train_from_cache(
    cache_path: str,
    config,
    *,
    eval_cache: str | None = None,
    out: str = "head.pt",
    baselines: bool = False,
    resume: bool = False,
    on_epoch=None,
) -> dict:
    """MixFix (and optionally the two baselines) on the cache's features and latest selection."""
    from engine.train import save_head, train_head, train_with_baselines

    if resume and baselines:
        raise EngineError("resume: --resume continues one MixFix run; it cannot be combined with --baselines")
    cache = Cache(cache_path, mode="a")
    selected = Selection.read(cache).selected
    timer = Timer()
    with timer("load"):
        features, labels = cache.load_features(), cache.labels()
    names = _class_names(cache, labels)
    evaluation = {}
    if eval_cache:
        other = Cache(eval_cache)
        _same_features(cache, other, "eval-cache")
        eval_labels = other.true_labels() if other.has_true_labels else other.labels()
        evaluation = {"eval_features": other.load_features(), "eval_labels": eval_labels}
    metrics_path = Path(out).with_suffix(".metrics.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with open(metrics_path, "a" if resume else "w") as metrics:

        def record(row: dict) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if on_epoch is not None:
                on_epoch(row)

        common = dict(
            config=config, num_classes=len(names), true_labels=cache.true_labels(), on_epoch=record, **evaluation
        )
        with timer("train"):
            if baselines:
                runs = train_with_baselines(features, labels, selected, **common)
                result, table = runs.mixfix, runs.table
            else:
                result = train_head(features, labels, selected, state_path=str(out) + ".state", resume=resume, **common)
                table = [{"run": "mixfix" if config.mixfix else "selection", "eval_acc": result.eval_acc}]
    save_head(out, result, class_names=names, feature_identity=cache.identity, config=config)
    if result.best_state is not None:
        save_head(
            Path(out).with_suffix(".best.pt"),
            result,
            class_names=names,
            feature_identity=cache.identity,
            config=config,
            which="best",
        )
    Training(
        labels=result.labels,
        selection=result.selection,
        attrs={
            "config": config.to_dict(),
            "eval_acc": result.eval_acc,
            "table": table,
            "head": str(out),
            "seconds": timer.rounded(),
        },
    ).write(cache)
    last = result.log[-1] if result.log else {}
    return {
        "cache": cache_path,
        "head": str(out),
        "metrics": str(metrics_path),
        "epochs": len(result.log),
        "initial_selected": int(selected.sum()),
        "final_set": int(result.selection.sum()),
        "relabelled": last.get("relabelled"),
        "relabel_correct": last.get("relabel_correct"),
        "eval_acc": result.eval_acc,
        "best_val_acc": result.best_val_acc,
        "table": table,
        "seconds": timer.rounded(),
    }


def predict_from_cache(head_path: str, cache_path: str, *, out: str | None = None, device: str = "auto") -> dict:
    """Apply a trained head to every row of a cache; optional CSV `key,label,pred,conf[,true_label]`."""
    from engine.train import load_head, predict

    check_table_path(out)
    cache = Cache(cache_path)
    head = load_head(head_path, feature_dim=cache.dim, feature_identity=cache.identity)
    pred, conf, _ = predict(head, cache.load_features(), device=device)
    labels, true = cache.labels(), cache.true_labels()
    summary = {
        "cache": cache_path,
        "head": head_path,
        "rows": int(len(pred)),
        "agree_with_given": float((pred == labels)[labels >= 0].mean()) if (labels >= 0).any() else None,
    }
    if true is not None and (true >= 0).any():
        summary["accuracy"] = float((pred == true)[true >= 0].mean())
    if out:
        columns = {"key": cache.keys(), "label": labels, "pred": pred, "conf": np.round(conf, 5)}
        if true is not None:
            columns["true_label"] = true
        write_table(out, columns)
        summary["out"] = out
    return summary


# ---------------------------------------------------------------- index / diagnose / neighbors
def index_from_cache(cache_path: str, config, *, device: str = "auto") -> dict:
    """Build the FAISS index over the cache's features and store it in `index/` (bytes + info)."""
    from engine.index import build_index, index_to_bytes

    cache = Cache(cache_path, mode="a")
    if cache.num_rows < 2:
        raise EngineError(f"cache: {cache_path} has {cache.num_rows} rows; an index needs at least 2")
    timer = Timer()
    with timer("load"):
        features, keys = cache.load_features(), cache.keys()
    with timer("build"):
        index = build_index(features, config, keys=keys, device=device)
    IndexGroup(
        data=index_to_bytes(index),
        info=index.info.to_dict(),
        attrs={"config": _asdict(config), "seconds": timer.rounded()},
    ).write(cache)
    return {
        "cache": cache_path,
        "kind": index.info.kind,
        "rows": index.info.rows,
        "params": index.info.params,
        "device": index.device,
        "seconds": timer.rounded(),
    }


def load_cached_index(cache: Cache, features, *, device: str = "auto", build_config=None):
    """The cache's stored index when it is current; else one is built (and stored when writable)."""
    from engine.index import IndexConfig, IndexInfo, index_from_bytes, index_is_stale

    stored_info = IndexGroup.read_info(cache)
    if stored_info is not None:
        info = IndexInfo.from_dict(stored_info)
        if not index_is_stale(info, features, keys=cache.keys()):
            return index_from_bytes(IndexGroup.read(cache).data, info, device=device)
        _logger.warning("the stored index is stale (rows changed); rebuilding")
    index_from_cache(cache.path, build_config or IndexConfig(), device=device)
    return load_cached_index(Cache(cache.path), features, device=device)


def _pairs(pairs, names, value: str) -> list[dict]:
    return [{"a": names[a], "b": names[b], value: round(float(v), 4)} for a, b, v in pairs]


def diagnose_from_cache(
    cache_path: str, *, k: int = 10, top: int = 10, device: str = "auto", export_knn: str | None = None
) -> dict:
    """Confusable class pairs (text and image), kNN label agreement and the swap table; written
    into `knn/` (neighbor ids and similarities, reused by `select --classifiers ...,knn`) and
    `diagnostics/`."""
    if export_knn is not None and (not str(export_knn).endswith(".npz") or Path(export_knn).is_dir()):
        raise EngineError(f"export-knn: got {str(export_knn)!r}, expected a .npz file path (the kNN graph is one file)")
    from engine import index as ix

    cache = Cache(cache_path, mode="a")
    timer = Timer()
    with timer("load"):
        features, labels = cache.load_features(), cache.labels()
    names = _class_names(cache, labels)
    with timer("index"):
        index = load_cached_index(cache, features, device=device)
    with timer("knn"):
        sims, ids = ix.knn_all(index, features, k=k)
    Neighbors(ids=ids, similarities=sims, k=k, fingerprint=index.info.fingerprint, index=index.info.kind).write(cache)
    with timer("diagnostics"):
        report = ix.knn_diagnostics(ids, labels, len(names), top=top)
        image_sim = ix.image_class_similarity(features, labels, len(names))
        text_pairs = []
        if cache.has_text():
            text_pairs = ix.top_confusable_pairs(ix.text_class_similarity(*cache.text_features()), top=top)
    summary = {
        "cache": cache_path,
        "k": k,
        "index": index.info.kind,
        "confusable_text": _pairs(text_pairs, names, "similarity"),
        "confusable_image": _pairs(
            ix.top_confusable_pairs(np.nan_to_num(image_sim, nan=-1.0), top=top), names, "similarity"
        ),
        "swaps": [{"label": names[a], "neighbors_say": names[b], "count": int(c)} for a, b, c in report.swaps],
        "agreement_mean": round(float(report.mean_agreement), 4),
        "class_agreement": {
            names[c]: round(float(v), 4) for c, v in enumerate(report.class_agreement) if np.isfinite(v)
        },
    }
    Diagnostics(
        agreement=report.agreement,
        majority=report.majority,
        class_agreement=report.class_agreement,
        image_similarity=image_sim,
        attrs={key: summary[key] for key in ("confusable_text", "confusable_image", "swaps", "k")},
    ).write(cache)
    if export_knn:
        ix.save_knn_graph(ix.knn_graph(sims, ids), export_knn)
        summary["knn_graph"] = export_knn
    summary["seconds"] = timer.rounded()
    return summary


def neighbors_from_cache(cache_path: str, key: str, *, k: int = 10, device: str = "auto") -> dict:
    """A sample's k nearest neighbors: keys, labels, similarity."""
    from engine.index import query_neighbors

    cache = Cache(cache_path)
    row = cache.row_of(key)
    features = cache.load_features()
    index = load_cached_index(cache, features, device=device)
    sims, ids = query_neighbors(index, features, row, k=k)
    labels, keys = cache.labels(), cache.keys()
    names = _class_names(cache, labels)
    label_name = lambda y: names[y] if 0 <= y < len(names) else None  # noqa: E731
    found = [
        {"key": keys[i], "label": int(labels[i]), "class": label_name(int(labels[i])), "similarity": round(float(s), 4)}
        for s, i in zip(sims, ids)
        if i >= 0
    ]
    return {
        "key": key,
        "row": row,
        "label": int(labels[row]),
        "class": label_name(int(labels[row])),
        "neighbors": found,
    }


def _asdict(config) -> dict:
    from dataclasses import asdict

    return asdict(config)


# ---------------------------------------------------------------- tables
def check_table_path(path: str | None) -> None:
    """Fail before any work when an output table path has an unknown suffix."""
    if path is not None and not str(path).endswith((".csv", ".parquet")):
        raise EngineError(f"out: got {str(path)!r}, expected a .csv or .parquet path")


def write_table(path: str, columns: dict, *, class_names: list[str] | None = None) -> None:
    """Write equal-length columns as CSV, or Parquet when `path` ends in .parquet (needs pyarrow).
    With `class_names` (a list, maybe empty), a Parquet table carries the `datasets` features in
    its schema metadata: class-index columns load as `ClassLabel(names)` (`engine.hf`)."""
    path = str(path)
    check_table_path(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise EngineError(
                "out: Parquet needs pyarrow (`pip install 'engine[parquet]'`); or use a .csv path"
            ) from None
        table = pa.table(
            {k: np.asarray(v).tolist() if np.asarray(v).dtype == object else np.asarray(v) for k, v in columns.items()}
        )
        if class_names is not None:
            from engine.hf import with_features

            table = with_features(table, class_names)
        pq.write_table(table, path)
        return
    names = list(columns)
    arrays = [np.asarray(columns[n]) for n in names]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        block = 65536
        for start in range(0, len(arrays[0]), block):
            writer.writerows(zip(*(a[start : start + block].tolist() for a in arrays)))

"""What the report reads from the cache: rows and the selection, per-class figures, the ranking of
rejected rows, neighbors and confusable classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from engine.cache import Cache
from engine.report.config import QUERY_BLOCK
from engine.results import Diagnostics, Neighbors, Selection

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- what is read from the cache
@dataclass
class Rows:
    """Row arrays (N,) of the cache and its selection; names (C,); urls of the shards."""

    keys: np.ndarray
    labels: np.ndarray
    true: np.ndarray | None
    shard: np.ndarray
    position: np.ndarray
    selected: np.ndarray
    suspicion: np.ndarray  # lower = more suspicious
    predictions: dict  # classifier -> (N,) int
    confidences: dict  # classifier -> (N,) float
    consistency: dict  # classifier -> (N,) float, when the criterion ran
    passes: dict  # "classifier/criterion" -> (N,) bool
    attrs: dict
    names: list
    urls: list
    noise: dict | None = None  # robust mode: given (E,), true (E,), count (E,) estimated label swaps


def _class_names(cache: Cache, labels: np.ndarray, predictions: dict) -> list[str]:
    """The cache's class names, extended with "class k" up to the largest label or prediction."""
    names = list(cache.class_names or [])
    top = max([int(labels.max()) if labels.size else -1] + [int(p.max()) for p in predictions.values() if p.size])
    return names + [f"class {k}" for k in range(len(names), top + 1)]


def read_rows(cache: Cache) -> Rows:
    stored = Selection.read(cache)  # one-line error naming `engine select` when absent or stale
    classifiers = stored.classifiers
    if stored.clean_score is not None:
        suspicion = stored.clean_score.astype(np.float32)
    elif classifiers:
        suspicion = np.mean([c.loss_score.astype(np.float32) for c in classifiers.values()], axis=0)
    else:
        suspicion = -stored.noise_score.astype(np.float32)
    predictions = {name: c.prediction.astype(np.int64) for name, c in classifiers.items()}
    labels = cache.labels().astype(np.int64)
    shard, position = cache.provenance()
    return Rows(
        keys=cache.keys(),
        labels=labels,
        true=cache.true_labels(),
        shard=shard.astype(np.int64),
        position=position.astype(np.int64),
        selected=stored.selected,
        suspicion=suspicion,
        predictions=predictions,
        confidences={name: c.confidence for name, c in classifiers.items()},
        consistency={pair.split("/")[0]: p.score for pair, p in stored.pairs.items() if pair.endswith("/consistency")},
        passes={pair: p.passed for pair, p in stored.pairs.items()},
        attrs=stored.attrs,
        noise=stored.noise,
        names=_class_names(cache, labels, predictions),
        urls=[s["url"] for s in cache.manifest.get("shards", [])],
    )


# ---------------------------------------------------------------- per-class figures and ranking
def class_stats(labels, selected, num_classes: int, true_labels=None) -> dict[str, np.ndarray]:
    """Per class (C,) int64: labelled, selected, rejected; float64 rejected_share (0 for empty
    classes); with true_labels (N,) also wrong (given != true) and wrong_selected.
    labels (N,) int, -1 = unlabelled; selected (N,) bool."""
    labels, selected = np.asarray(labels), np.asarray(selected, dtype=bool)
    labelled = labels >= 0
    count = lambda mask: np.bincount(labels[mask], minlength=num_classes).astype(np.int64)  # noqa: E731
    stats = {"labelled": count(labelled), "selected": count(labelled & selected)}
    stats["rejected"] = stats["labelled"] - stats["selected"]
    stats["rejected_share"] = stats["rejected"] / np.maximum(stats["labelled"], 1)
    if true_labels is not None:
        true_labels = np.asarray(true_labels)
        wrong = labelled & (true_labels >= 0) & (labels != true_labels)
        stats["wrong"], stats["wrong_selected"] = count(wrong), count(wrong & selected)
    return stats


def class_order(stats: dict) -> np.ndarray:
    """Class indices by rejected share (highest first), classes without rows last, ties by index."""
    c = len(stats["labelled"])
    return np.lexsort((np.arange(c), -stats["rejected_share"], stats["labelled"] == 0))


def rank_rejected(labels, selected, suspicion, *, per_class: int) -> np.ndarray:
    """Rows (M,) int64 not selected and labelled, grouped by label (ascending), within a label the
    lowest `suspicion` (N,) first (ties by row), at most `per_class` per label."""
    labels = np.asarray(labels)
    candidates = np.flatnonzero(~np.asarray(selected, dtype=bool) & (labels >= 0))
    order = np.lexsort((candidates, np.asarray(suspicion, np.float64)[candidates], labels[candidates]))
    ranked = candidates[order]
    ranked_labels = labels[ranked]
    first = np.searchsorted(ranked_labels, ranked_labels, side="left")
    return ranked[np.arange(len(ranked)) - first < per_class]


# ---------------------------------------------------------------- neighbors
def _without_self(similarities: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, k+1) search results of `rows (M,)` -> (M, k) without the row itself (else the last)."""
    is_self = ids == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    m, k1 = ids.shape
    return similarities[keep].reshape(m, k1 - 1), ids[keep].reshape(m, k1 - 1)


def find_neighbors(
    cache: Cache, rows: np.ndarray, k: int, *, device: str = "auto", features=None
) -> tuple[np.ndarray, np.ndarray, str]:
    """k nearest neighbors of `rows (M,)`: (similarities (M, k) float32, ids (M, k) int64, source).

    The cache's `knn/` group when it is current and has at least k neighbors (checked on the
    keys and a few sampled rows, without loading the features); else a search of the cache's
    FAISS index (built and stored when missing or stale) for just these rows.
    `features`: a callable returning the cache's (N, D) features (to share one load), or None."""
    from engine import index as ix
    from engine.stages import load_cached_index

    rows = np.asarray(rows, dtype=np.int64)
    if k == 0 or rows.size == 0:
        return np.zeros((rows.size, 0), np.float32), np.zeros((rows.size, 0), np.int64), "none"
    stored = Neighbors.current(cache, k=k, at_least=True)
    if stored is not None:
        sims = stored.similarities.get_orthogonal_selection((rows, slice(0, k)))
        ids = stored.ids.get_orthogonal_selection((rows, slice(0, k)))
        return np.asarray(sims, np.float32), np.asarray(ids, np.int64), f"knn group (k={stored.k})"
    if cache.has_group(Neighbors.NAME):
        _logger.info("the cache's knn/ group is stale or has k < %d; searching the index", k)
    features = (features or cache.load_features)()
    index = load_cached_index(cache, features, device=device)
    out_sims, out_ids = [], []
    for start in range(0, rows.size, QUERY_BLOCK):
        block = rows[start : start + QUERY_BLOCK]
        sims, ids = ix.search_index(index, features[block].astype(np.float32), k=k + 1)
        sims, ids = _without_self(sims, ids, block)
        out_sims.append(sims)
        out_ids.append(ids)
    return np.concatenate(out_sims), np.concatenate(out_ids), f"{index.info.kind} index"


# ---------------------------------------------------------------- class similarity
@dataclass
class Confusable:
    """The heatmap's classes (K,), their similarity (K, K), its source and the top pairs."""

    classes: list
    similarity: np.ndarray
    source: str
    pairs: list


def confusable_classes(cache: Cache, data: Rows, max_classes: int, *, features=None) -> Confusable | None:
    """Classes of the most similar pairs (text prompt centroids when the cache has text features,
    else image centroids), at most `max_classes`; None with fewer than 2 classes. `features`: as
    in `find_neighbors`."""
    from engine import index as ix

    c = len(data.names)
    if c < 2:
        return None
    sim, source = None, ""
    if cache.has_text():
        text, mask = cache.text_features()
        if text.shape[0] == c:
            sim, source = ix.text_class_similarity(text, mask), "text: class prompt centroids"
    if sim is None and cache.has_group(Diagnostics.NAME):
        stored = Diagnostics.read(cache).image_similarity
        if stored.shape == (c, c):
            sim, source = stored, "image: class centroids of the features"
    if sim is None:
        sim = ix.image_class_similarity((features or cache.load_features)(), data.labels, c)
        source = "image: class centroids of the features"
    pairs = ix.top_confusable_pairs(sim, top=min(c * (c - 1) // 2, 8 * max_classes))
    classes: list[int] = []
    for a, b, _ in pairs:
        for k in (a, b):
            if k not in classes and len(classes) < max_classes:
                classes.append(k)
    return Confusable(
        classes=classes, similarity=np.asarray(sim)[np.ix_(classes, classes)], source=source, pairs=pairs[:10]
    )

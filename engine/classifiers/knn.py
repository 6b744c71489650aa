"""The kNN classifier: similarity-weighted votes of a row's nearest other rows (neighbor lists from
`engine.index`), one block of rows at a time. See docs/method.md."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.index import check_ids, check_labels, check_neighbors, check_positive, neighbor_labels
from engine.runtime import EngineError

KNN_TAU = 0.07  # vote temperature (InstDisc / DINO kNN classifier)
KNN_SMOOTHING = 0.01  # mixed with the uniform distribution, so log-probs are finite


def knn_log_probs(
    similarities, ids, labels, num_classes: int, *, tau: float = KNN_TAU, smoothing: float = KNN_SMOOTHING
) -> np.ndarray:
    """Class log-probabilities from similarity-weighted neighbor votes, for a block of rows.

    `similarities (B, k)`, `ids (B, k)` (self excluded), `labels (N,)` of all rows. A labelled
    neighbor j votes exp((s_j - s_max) / tau) for its label (tau = 0.07, the InstDisc/DINO kNN
    classifier); p = (1 - smoothing) * votes / sum(votes) + smoothing / C, so log p is finite.
    Rows without a labelled neighbor get the uniform distribution. Returns (B, C) float32."""
    sims, ids = check_neighbors(similarities, ids)
    num_classes = check_positive(num_classes, "num_classes")
    labels = check_labels(labels, None, num_classes)
    ids = check_ids(ids, labels.shape[0])
    _check_vote_options(tau, smoothing)
    return _knn_votes(sims, ids, labels, num_classes, tau=tau, smoothing=smoothing)


def _check_vote_options(tau: float, smoothing: float) -> None:
    if not tau > 0 or not 0 < smoothing <= 1:
        raise EngineError(f"tau/smoothing: got {tau!r}/{smoothing!r}, expected tau > 0 and 0 < smoothing <= 1")


def _knn_votes(
    sims: np.ndarray, ids: np.ndarray, labels: np.ndarray, num_classes: int, *, tau: float, smoothing: float
) -> np.ndarray:
    """`knn_log_probs` on inputs already validated (the per-block hot path)."""
    neighbor = neighbor_labels(ids, labels)
    valid = (neighbor >= 0) & np.isfinite(sims)
    top = np.max(np.where(valid, sims, -np.inf), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        weights = np.where(valid, np.exp((sims - np.where(np.isfinite(top), top, 0.0)) / tau), 0.0)
    b = ids.shape[0]
    rows = np.repeat(np.arange(b), ids.shape[1])
    codes = rows * num_classes + np.where(valid, neighbor, 0).ravel()
    votes = np.bincount(codes, weights=weights.ravel(), minlength=b * num_classes).reshape(b, num_classes)
    total = votes.sum(axis=1, keepdims=True)
    share = np.divide(votes, total, out=np.full_like(votes, 1.0 / num_classes), where=total > 0)
    return np.log((1.0 - smoothing) * share + smoothing / num_classes).astype(np.float32)


def knn_classifier(
    similarities, ids, labels, num_classes: int, *, tau: float = KNN_TAU, smoothing: float = KNN_SMOOTHING
) -> Callable[[int, int], np.ndarray]:
    """A row-block classifier over precomputed neighbors: `fn(start, stop) -> (B, C) float32`
    log-probabilities of rows start..stop (see `knn_log_probs`)."""
    sims, ids = check_neighbors(similarities, ids)
    num_classes = check_positive(num_classes, "num_classes")
    labels = check_labels(labels, sims.shape[0], num_classes)
    ids = check_ids(ids, labels.shape[0])
    _check_vote_options(tau, smoothing)

    def log_probs(start: int, stop: int) -> np.ndarray:  # validated once above, not per block
        if not 0 <= start <= stop <= sims.shape[0]:
            raise EngineError(f"rows: got [{start}, {stop}), expected within [0, {sims.shape[0]}]")
        return _knn_votes(sims[start:stop], ids[start:stop], labels, num_classes, tau=tau, smoothing=smoothing)

    return log_probs

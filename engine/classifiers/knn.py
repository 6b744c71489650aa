"""The kNN classifier: similarity-weighted votes of a row's nearest other rows (neighbor lists from
`engine.index`), one block of rows at a time. See docs/method.md."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.index import check_ids, check_labels, check_neighbors, check_positive, neighbor_labels
from engine.runtime import EngineError

KNN_TAU = 0.07  # vote temperature (InstDisc / DINO kNN classifier)
KNN_ALPHA = 1.0  # pseudo-votes spread by the class prior: a label absent among the neighbors is unlikely,
# not impossible (a discrete vote otherwise fails every clean row of a mixed neighborhood)
VETO_OWN, VETO_OTHER = 0.1, 0.5  # the knn test: reject a row whose label holds < 10% of the vote while
# another label holds >= 50% (kNN only vetoes; it never has to pass a row)


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float64 share of each class among the labelled rows (uniform when none is labelled)."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(num_classes, 1.0 / num_classes)


def knn_log_probs(
    similarities, ids, labels, num_classes: int, *, tau: float = KNN_TAU, alpha: float = KNN_ALPHA, rows=None
) -> np.ndarray:
    """Class log-probabilities from soft, similarity-weighted neighbor votes, for a block of rows.

    `similarities (B, k)`, `ids (B, k)`, `labels (N,)` of all rows; `rows (B,)` the block's own row
    numbers (a neighbor equal to its own row is dropped: leave-one-out; None: ids are trusted to
    exclude self). A labelled neighbor j votes w_j = exp((s_j - s_max) / tau) for its label; votes
    are smoothed toward the class prior with `alpha` pseudo-votes (Dirichlet):
    p = (votes + alpha prior) / (sum votes + alpha). Returns (B, C) float32."""
    sims, ids = check_neighbors(similarities, ids)
    num_classes = check_positive(num_classes, "num_classes")
    labels = check_labels(labels, None, num_classes)
    ids = check_ids(ids, labels.shape[0])
    _check_vote_options(tau, alpha)
    prior = class_prior(labels, num_classes)
    return _knn_votes(sims, ids, labels, num_classes, tau=tau, alpha=alpha, prior=prior, rows=rows)


def _check_vote_options(tau: float, alpha: float) -> None:
    if not tau > 0 or not alpha > 0:
        raise EngineError(f"tau/alpha: got {tau!r}/{alpha!r}, expected tau > 0 and alpha > 0")


def _knn_votes(sims, ids, labels, num_classes: int, *, tau: float, alpha: float, prior, rows=None) -> np.ndarray:
    """`knn_log_probs` on inputs already validated (the per-block hot path)."""
    neighbor = neighbor_labels(ids, labels)
    valid = (neighbor >= 0) & np.isfinite(sims)
    if rows is not None:
        valid &= ids != np.asarray(rows)[:, None]
    top = np.max(np.where(valid, sims, -np.inf), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        weights = np.where(valid, np.exp((sims - np.where(np.isfinite(top), top, 0.0)) / tau), 0.0)
    b = ids.shape[0]
    codes = np.repeat(np.arange(b), ids.shape[1]) * num_classes + np.where(valid, neighbor, 0).ravel()
    votes = np.bincount(codes, weights=weights.ravel(), minlength=b * num_classes).reshape(b, num_classes)
    p = (votes + alpha * prior[None, :]) / (votes.sum(axis=1, keepdims=True) + alpha)
    return np.log(np.maximum(p, 1e-30)).astype(np.float32)


def knn_classifier(
    similarities, ids, labels, num_classes: int, *, tau: float = KNN_TAU, alpha: float = KNN_ALPHA
) -> Callable[[int, int], np.ndarray]:
    """A row-block classifier over precomputed neighbors: `fn(start, stop) -> (B, C) float32`
    log-probabilities of rows start..stop (see `knn_log_probs`; a row is never its own neighbor)."""
    sims, ids = check_neighbors(similarities, ids)
    num_classes = check_positive(num_classes, "num_classes")
    labels = check_labels(labels, sims.shape[0], num_classes)
    ids = check_ids(ids, labels.shape[0])
    _check_vote_options(tau, alpha)
    prior = class_prior(labels, num_classes)

    def log_probs(start: int, stop: int) -> np.ndarray:  # validated once above, not per block
        if not 0 <= start <= stop <= sims.shape[0]:
            raise EngineError(f"rows: got [{start}, {stop}), expected within [0, {sims.shape[0]}]")
        return _knn_votes(
            sims[start:stop],
            ids[start:stop],
            labels,
            num_classes,
            tau=tau,
            alpha=alpha,
            prior=prior,
            rows=np.arange(start, stop),
        )

    return log_probs


def vote_veto(
    consistency: np.ndarray, log_p: np.ndarray, prediction: np.ndarray, confidence: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """(N,) bool rows the kNN vote rejects: the given label holds < VETO_OWN of the vote while
    another label holds >= VETO_OTHER (from the per-row scores of `engine.select.score_block`)."""
    own = np.exp(log_p)
    return (labels >= 0) & (own < VETO_OWN) & (prediction != labels) & (confidence >= VETO_OTHER)

"""CLIPCleaner selection on arrays: per-row scores from each classifier's log-probabilities in one
streaming pass over row blocks, batched per-class 1-D mixtures, the intersection of the
(classifier, criterion) tests and the empty-class fill-in. Nothing N x C is held. The method and
its conventions: docs/method.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from engine.classifiers import (
    CLASSIFIERS,
    NEEDS_HINT,
    ClassifierInputs,
    LogProbsFn,
    as_features,
    as_labels,
    auto_block_rows,
)
from engine.runtime import DEVICES, EngineError, Timer, progress, resolve_device

_logger = logging.getLogger(__name__)

MODES = {
    "clipcleaner": "the paper: zero-shot and linear classifiers, consistency and loss criteria, intersected",
    "robust": "clean posteriors from a leave-one-out discriminant, calibrated zero-shot and an estimated noise "
    "transition matrix (engine.robust)",
}
CRITERIA = {
    "consistency": "P(y|x) / max_k P(k|x) >= theta_cons",
    "loss": "per-class 2-component GMM on the normalised log P(y|x); posterior of the larger-mean "
    "component >= theta_gmm",
}


# ----------------------------------------------------------------------------- config


def _names(field_name: str, value, table: dict) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else tuple(value)
    if not names or any(not isinstance(v, str) for v in names):
        raise EngineError(f"{field_name}: got {value!r}, expected a non-empty list of {', '.join(table)}")
    unknown = [v for v in names if v not in table]
    if unknown:
        raise EngineError(
            f"{field_name}: got unknown {', '.join(map(repr, unknown))}, expected some of {', '.join(table)}"
        )
    if len(set(names)) != len(names):
        raise EngineError(f"{field_name}: got {names!r} with repeats, expected each name once")
    return names


def _check_number(
    name: str, value, *, low: float, high: float = math.inf, low_open: bool = False, integer: bool = False
) -> None:
    kinds = (int,) if integer else (int, float)
    ok = (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        what = "an integer" if integer else "a number"
        bound = f"> {low}" if low_open else f">= {low}"
        raise EngineError(
            f"{name}: got {value!r}, expected {what} {bound}" + (f" and <= {high}" if high != math.inf else "")
        )


@dataclass(frozen=True)
class SelectConfig:
    """Everything that decides a selection; recorded with every result (`to_dict`)."""

    mode: str = "clipcleaner"  # the paper's procedure; "robust": engine.robust (docs/method.md)
    criteria: tuple[str, ...] = ("consistency", "loss")
    classifiers: tuple[str, ...] = ("zeroshot", "linear")
    theta_cons: float = 0.8
    theta_gmm: float = 0.5
    tau: float = 0.07  # zero-shot temperature
    linear_c: float = 1.0  # inverse penalty, scikit-learn's C
    linear_max_iter: int = 10_000
    linear_tol: float = 1e-4  # max |grad| of the summed objective (scikit-learn 1.2.2's tol)
    linear_whiten: float = 0.1  # ridge of the whitening preconditioner (0 = none)
    linear_folds: int = 0  # 0: in-sample (the paper); K >= 2: out-of-fold
    gmm_max_iter: int = 100
    gmm_tol: float = 1e-3
    gmm_reg_covar: float = 1e-6
    fill_empty: bool = True
    robust_threshold: float = 0.5  # robust mode: select rows whose clean posterior is at least this
    block_rows: int | None = None  # None: about 16M float32 per (rows, columns) block
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise EngineError(f"mode: got {self.mode!r}, expected one of {', '.join(MODES)}")
        _check_number("robust_threshold", self.robust_threshold, low=0.0, high=1.0)
        object.__setattr__(self, "criteria", _names("criteria", self.criteria, CRITERIA))
        object.__setattr__(self, "classifiers", _names("classifiers", self.classifiers, CLASSIFIERS))
        for name in ("theta_cons", "theta_gmm"):
            _check_number(name, getattr(self, name), low=0.0, high=1.0)
        for name in ("tau", "linear_c", "linear_tol", "gmm_tol", "gmm_reg_covar"):
            _check_number(name, getattr(self, name), low=0.0, low_open=True)
        for name in ("linear_max_iter", "gmm_max_iter"):
            _check_number(name, getattr(self, name), low=1, integer=True)
        _check_number("linear_whiten", self.linear_whiten, low=0.0)
        if (
            isinstance(self.linear_folds, bool)
            or not isinstance(self.linear_folds, int)
            or self.linear_folds < 0
            or self.linear_folds == 1
        ):
            raise EngineError(f"linear_folds: got {self.linear_folds!r}, expected 0 (in-sample) or an integer >= 2")
        if self.block_rows is not None:
            _check_number("block_rows", self.block_rows, low=1, integer=True)
        if not isinstance(self.device, str) or (self.device not in DEVICES and not self.device.startswith("cuda:")):
            raise EngineError(f"device: got {self.device!r}, expected one of {', '.join(DEVICES)} (or cuda:N)")
        _check_number("seed", self.seed, low=0, integer=True)
        if not isinstance(self.fill_empty, bool):
            raise EngineError(f"fill_empty: got {self.fill_empty!r}, expected True or False")

    @property
    def pairs(self) -> tuple[str, ...]:
        """The (classifier, criterion) pairs as "classifier/criterion", classifier-major (the knn
        classifier's only test is its vote veto, `knn/vote`)."""
        return tuple(f"{c}/{k}" for c in self.classifiers for k in criteria_of(c, self.criteria))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> SelectConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EngineError(f"select config: got unknown keys {unknown}, expected some of {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------- scores


def score_block(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row scores of one block: log_probs (B, C) float, labels (B,) int64 (-1 = unlabelled).

    Returns (B,) tensors on the block's device: consistency float32 in [0, 1], log_p float32
    log P(y) (may be -inf), prediction int64 argmax, confidence float32 max P. Unlabelled rows
    get consistency 0 and log_p 0."""
    log_probs = log_probs.float()
    top, prediction = log_probs.max(dim=1)
    labelled = labels >= 0
    log_p = log_probs.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    consistency = torch.exp(log_p - top)
    zero = torch.zeros((), dtype=torch.float32, device=log_probs.device)
    return {
        "consistency": torch.where(labelled, consistency, zero),
        "log_p": torch.where(labelled, log_p, zero),
        "prediction": prediction,
        "confidence": top.exp(),
    }


@dataclass(frozen=True)
class ClassGroups:
    """Labelled rows grouped by class: `order` (M,) int64 rows sorted by label (stable), `labels`
    (M,) their labels, `counts` (C,) rows per class, `starts` (C,) offset of each class in `order`."""

    order: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    starts: np.ndarray

    @classmethod
    def build(cls, labels: np.ndarray, num_classes: int) -> ClassGroups:
        labelled = np.flatnonzero(labels >= 0)
        order = labelled[np.argsort(labels[labelled], kind="stable")]
        counts = np.bincount(labels[labelled], minlength=num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return cls(order=order, labels=labels[order], counts=counts, starts=starts)

    def reduce(self, ufunc, values_sorted: np.ndarray, empty) -> np.ndarray:
        """(C,) `ufunc`.reduceat over each class's values (sorted like `order`); `empty` where none."""
        out = np.full(len(self.counts), empty, dtype=values_sorted.dtype)
        present = self.counts > 0
        if present.any():
            out[present] = ufunc.reduceat(values_sorted, self.starts[present])
        return out


def normalise_loss(log_p: np.ndarray, groups: ClassGroups) -> tuple[np.ndarray, np.ndarray]:
    """Per-class min-max normalised loss of the labelled rows.

    log_p (N,) float, log P(y) per row; returns (scores (N,) float32 in [0, 1], 0 for unlabelled
    rows and 1 in degenerate classes; degenerate (C,) bool: fewer than 2 rows or max == min).
    -inf values count as the class's worst finite value."""
    values = log_p[groups.order].astype(np.float64)
    finite = np.isfinite(values)
    if np.isnan(values).any() or np.isposinf(values).any():
        raise EngineError("log-probabilities: got NaN or +inf for a labelled row, expected finite values or -inf")
    low = groups.reduce(np.minimum, np.where(finite, values, np.inf), np.inf)
    high = groups.reduce(np.maximum, np.where(finite, values, -np.inf), -np.inf)
    span = high - low
    degenerate = (groups.counts < 2) | ~(span > 0)
    degen_r = degenerate[groups.labels]
    low_r = np.where(degenerate, 0.0, low)[groups.labels]
    span_r = np.where(degenerate, 1.0, span)[groups.labels]
    normalised = np.where(degen_r, 1.0, (np.where(finite, values, low_r) - low_r) / span_r)
    scores = np.zeros(len(log_p), dtype=np.float32)
    scores[groups.order] = np.clip(normalised, 0.0, 1.0)
    return scores, degenerate


# ----------------------------------------------------------------------------- mixtures


@dataclass
class MixtureFit:
    """Batched 2-component 1-D Gaussian mixtures, one per group.

    posterior (M,) float64 of the larger-mean component per value; weights, means, variances
    (G, 2) float64; n_iter (G,) int; converged (G,) bool (groups whose change of the mean
    log-likelihood fell below tol within max_iter)."""

    posterior: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray


def _segments(group: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(group, minlength=num_groups)
    return counts, np.concatenate([[0], np.cumsum(counts)[:-1]])


def two_means_init(values: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """Exact 1-D 2-means split of every group at once: (M,) int 0/1 cluster of each value.

    values (M,) float64 sorted ascending within each group, group (M,) int sorted ascending;
    every group needs 2 distinct values. The split maximises the between-cluster sum of squares
    n_l n_r / n (mean_l - mean_r)^2 over cut points between distinct values (prefix sums of the
    group-centred values); the first best cut wins ties. This is the global optimum of the
    k-means objective that scikit-learn's KMeans (k-means++ and Lloyd, n_init=1) reaches in
    all but rare multi-modal cases."""
    counts, starts = _segments(group, num_groups)
    n = counts[group].astype(np.float64)
    centred = values - (np.bincount(group, values, minlength=num_groups) / np.maximum(counts, 1))[group]
    prefix = np.cumsum(centred)
    before = np.concatenate([[0.0], prefix])[starts][group]
    left_sum = prefix - before
    n_left = (np.arange(len(values)) - starts[group] + 1).astype(np.float64)
    n_right = n - n_left
    cut_ok = np.concatenate([(values[1:] > values[:-1]) & (group[1:] == group[:-1]), [False]])
    gain = np.where(cut_ok, left_sum**2 * n / (n_left * np.maximum(n_right, 1.0)), -1.0)
    best = np.maximum.reduceat(gain, starts[counts > 0])
    full_best = np.full(num_groups, -1.0)
    full_best[counts > 0] = best
    hits = np.flatnonzero(cut_ok & (gain == full_best[group]))
    hit_groups, first = np.unique(group[hits], return_index=True)
    threshold = np.full(num_groups, np.inf)
    threshold[hit_groups] = values[hits[first]]
    return (values > threshold[group]).astype(np.int64)


def _m_step(values, group, resp, num_groups, reg_covar):
    """(nk, means, variances) (G, 2) from responsibilities resp (M, 2), as scikit-learn's 'full'."""
    nk = np.stack([np.bincount(group, resp[:, j], minlength=num_groups) for j in range(2)], 1)
    nk += 10 * np.finfo(np.float64).eps
    means = np.stack([np.bincount(group, resp[:, j] * values, minlength=num_groups) for j in range(2)], 1) / nk
    diff2 = (values[:, None] - means[group]) ** 2
    variances = (
        np.stack([np.bincount(group, resp[:, j] * diff2[:, j], minlength=num_groups) for j in range(2)], 1) / nk
        + reg_covar
    )
    return nk, means, variances


def _e_step(values, group, weights, means, variances):
    """(log_resp (M, 2), log p(x) (M,)) under the current parameters, as scikit-learn computes them."""
    prec_chol = 1.0 / np.sqrt(variances)
    y = (values[:, None] - means[group]) * prec_chol[group]
    log_prob = -0.5 * (np.log(2 * np.pi) + y**2) + np.log(prec_chol[group]) + np.log(weights[group])
    norm = np.logaddexp(log_prob[:, 0], log_prob[:, 1])
    return log_prob - norm[:, None], norm


def fit_mixtures(
    values: np.ndarray,
    group: np.ndarray,
    *,
    num_groups: int,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
) -> MixtureFit:
    """One batched EM fitting a 2-component Gaussian mixture to each group's values.

    values (M,) float, group (M,) int in [0, num_groups); every group present needs 2 distinct
    values. Per group exactly scikit-learn's GaussianMixture(n_components=2) procedure: 2-means
    init (`two_means_init`), then E/M steps until the change of the mean log-likelihood is
    below `tol` (each group stops on its own; its parameters then stay fixed), at most
    `max_iter` iterations; the posterior comes from a final E-step. float64 throughout."""
    order = np.lexsort((values, group))
    x, g = np.asarray(values, np.float64)[order], np.asarray(group, np.int64)[order]
    counts = np.bincount(g, minlength=num_groups)
    init = two_means_init(x, g, num_groups)
    nk, means, variances = _m_step(x, g, np.stack([1 - init, init], 1).astype(np.float64), num_groups, reg_covar)
    weights = nk / np.maximum(counts, 1)[:, None]
    active = counts > 0
    lower = np.full(num_groups, -np.inf)
    n_iter = np.zeros(num_groups, dtype=np.int64)
    converged = np.zeros(num_groups, dtype=bool)
    for it in range(1, max_iter + 1):
        rows = active[g]
        xa, ga = (x, g) if rows.all() else (x[rows], g[rows])
        log_resp, norm = _e_step(xa, ga, weights, means, variances)
        mean_ll = np.bincount(ga, norm, minlength=num_groups) / np.maximum(counts, 1)
        nk_new, means_new, var_new = _m_step(xa, ga, np.exp(log_resp), num_groups, reg_covar)
        upd = active[:, None]
        weights = np.where(upd, nk_new / nk_new.sum(1, keepdims=True), weights)
        means, variances = np.where(upd, means_new, means), np.where(upd, var_new, variances)
        done = active & (np.abs(mean_ll - lower) < tol)
        lower = np.where(active, mean_ll, lower)
        n_iter[active] = it
        converged |= done
        active &= ~done
        if not active.any():
            break
    log_resp, _ = _e_step(x, g, weights, means, variances)
    upper = np.argmax(means, axis=1)
    posterior = np.empty(len(x))
    posterior[order] = np.exp(log_resp[np.arange(len(x)), upper[g]])
    return MixtureFit(
        posterior=posterior,
        weights=weights,
        means=means,
        variances=variances,
        n_iter=n_iter,
        converged=converged | (counts == 0),
    )


def loss_posteriors(
    loss_scores: np.ndarray, groups: ClassGroups, degenerate: np.ndarray, *, config: SelectConfig
) -> tuple[np.ndarray, dict]:
    """(posterior (N,) float32 of the larger-mean component, info) for the loss criterion: one
    batched mixture per non-degenerate class; rows of degenerate classes get 1, unlabelled 0."""
    posterior = np.zeros(len(loss_scores), dtype=np.float32)
    fit_rows = ~degenerate[groups.labels]
    posterior[groups.order[~fit_rows]] = 1.0
    info = {"classes_fitted": int((~degenerate & (groups.counts > 0)).sum()), "unconverged": 0, "max_n_iter": 0}
    if fit_rows.any():
        rows = groups.order[fit_rows]
        fit = fit_mixtures(
            loss_scores[rows].astype(np.float64),
            groups.labels[fit_rows],
            num_groups=len(groups.counts),
            max_iter=config.gmm_max_iter,
            tol=config.gmm_tol,
            reg_covar=config.gmm_reg_covar,
        )
        posterior[rows] = fit.posterior
        info["unconverged"] = int((~fit.converged).sum())
        info["max_n_iter"] = int(fit.n_iter.max())
        if info["unconverged"]:
            _logger.warning(
                "select: %d class mixtures did not converge in %d iterations (kept as they are)",
                info["unconverged"],
                config.gmm_max_iter,
            )
    return posterior, info


# ----------------------------------------------------------------------------- selection


def fill_empty_classes(
    selected: np.ndarray, labels: np.ndarray, ranking: np.ndarray, groups: ClassGroups, *, num_classes: int
) -> tuple[np.ndarray, int]:
    """Rows (K,) int64 to add so that no labelled class ends empty, and m (0 when none is empty).

    selected (N,) bool; ranking (N,) float, higher first (ties: lower row first). A class with
    labelled rows but none selected gets its top m = max(smallest non-zero per-class count,
    floor(M / C^2), 1) rows (M labelled rows), or all of them when it has fewer."""
    per_class = np.bincount(labels[selected & (labels >= 0)], minlength=num_classes)
    empty = (groups.counts > 0) & (per_class == 0)
    if not empty.any():
        return np.zeros(0, dtype=np.int64), 0
    nonzero = per_class[per_class > 0]
    m = max(int(nonzero.min()) if len(nonzero) else 0, len(groups.order) // num_classes**2, 1)
    candidates = groups.order[empty[groups.labels]]
    cand_labels = labels[candidates]
    order = np.lexsort((candidates, -ranking[candidates].astype(np.float64), cand_labels))
    ranked, ranked_labels = candidates[order], cand_labels[order]
    first = np.searchsorted(ranked_labels, ranked_labels, side="left")
    return ranked[np.arange(len(ranked)) - first < m], m


def noise_scores(
    scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float], labelled: np.ndarray, masks=None
) -> np.ndarray:
    """(N,) float32 in [0, 1]: max over pairs of max(0, (theta - score) / theta), counted only where
    the pair failed when its `masks` are given (the knn vote fails by veto, not by threshold); 1 for
    unlabelled rows."""
    noise = np.zeros(len(labelled), dtype=np.float32)
    for pair, score in scores.items():
        theta = thresholds[pair]
        if theta > 0:
            shortfall = np.clip((theta - score) / theta, 0.0, 1.0).astype(np.float32)
            if masks is not None:
                shortfall[masks[pair]] = 0.0
            np.maximum(noise, shortfall, out=noise)
    noise[~labelled] = 1.0
    return noise


def selection_metrics(selected, labels, true_labels) -> dict:
    """Precision, recall and F1 of a selection against ground truth.

    selected (N,) bool; labels (N,) int given labels; true_labels (N,) int, -1 = unknown. A row is
    correct when labelled and label == true label; rows with an unknown true label or no label
    are left out. Precision = correct selected / selected, recall = correct selected / correct;
    0 (never NaN) when a denominator is 0."""
    selected, labels, true_labels = (np.asarray(a) for a in (selected, labels, true_labels))
    if not (selected.shape == labels.shape == true_labels.shape) or selected.ndim != 1:
        raise EngineError(
            f"selection_metrics: got shapes {selected.shape}, {labels.shape}, {true_labels.shape}, "
            f"expected three equal (N,) shapes"
        )
    known = (true_labels >= 0) & (labels >= 0)
    correct = known & (labels == true_labels)
    chosen = selected.astype(bool) & known
    hits = int((chosen & correct).sum())
    precision = hits / int(chosen.sum()) if chosen.any() else 0.0
    recall = hits / int(correct.sum()) if correct.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "selected": int(chosen.sum()),
        "correct_selected": hits,
        "correct": int(correct.sum()),
        "evaluated": int(known.sum()),
        "noise_rate": 1.0 - int(correct.sum()) / int(known.sum()) if known.any() else 0.0,
    }


def label_agreement(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """How a classifier's predictions (N,) agree with the given labels (N,) (-1 = unlabelled, left out).

    agreement: share of labelled rows where pred == label; chance: the agreement expected if the
    two were independent with the same marginals, sum_k p_label(k) p_pred(k); kappa: Cohen's
    (agreement - chance) / (1 - chance), 0 for a classifier that knows nothing of the labels."""
    known = labels >= 0
    if not known.any():
        return {"agreement": 0.0, "chance": 0.0, "kappa": 0.0}
    p, y = np.asarray(pred)[known], np.asarray(labels)[known]
    agreement = float((p == y).mean())
    chance = float((np.bincount(y, minlength=num_classes) * np.bincount(p, minlength=num_classes)).sum()) / len(y) ** 2
    kappa = (agreement - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    return {"agreement": round(agreement, 6), "chance": round(chance, 6), "kappa": round(kappa, 6)}


FEW_ITERATIONS = 5  # a fit that stops sooner has hardly left its starting point
CHANCE_KAPPA = 0.05  # agreement with the given labels this close to chance is a warning


def classifier_warnings(info: Mapping[str, dict]) -> list[str]:
    """One line per sign that a classifier did not work: a fit that stopped within a handful of
    iterations, hit its iteration cap or lost its line search; predictions that agree with the
    given labels no better than chance."""
    out = []
    for name, entry in info.items():
        for k, fit in enumerate(entry.get("fit", [])):
            which = name if len(entry["fit"]) == 1 else f"{name} (fold {k + 1})"
            if fit["stop"] == "max_iter":
                out.append(
                    f"{which}: hit its iteration cap ({fit['n_iter']}) before converging "
                    f"(max |grad| {fit['grad_max']:.3g}); raise linear_max_iter"
                )
            elif fit["stop"] == "line_search":
                out.append(
                    f"{which}: the line search failed after {fit['n_iter']} iterations "
                    f"(max |grad| {fit['grad_max']:.3g}); its probabilities may be far from the optimum"
                )
            elif fit["n_iter"] < FEW_ITERATIONS:
                out.append(
                    f"{which}: stopped after only {fit['n_iter']} iterations "
                    f"(max |grad| {fit['grad_max']:.3g}); check linear_tol"
                )
        agree = entry.get("labels")
        if agree and agree["kappa"] < CHANCE_KAPPA:
            out.append(
                f"{name}: agrees with the given labels on {agree['agreement']:.1%} of rows, no better than "
                f"chance ({agree['chance']:.1%}); check that the classes (prompts) match the labels"
            )
    return out


def classifier_accuracy(pred, true_labels) -> float:
    """Fraction of rows with a known true label (>= 0) where pred (N,) == true_labels (N,); 0 if none."""
    pred, true_labels = np.asarray(pred), np.asarray(true_labels)
    if pred.shape != true_labels.shape or pred.ndim != 1:
        raise EngineError(
            f"classifier_accuracy: got shapes {pred.shape} and {true_labels.shape}, expected two equal (N,) shapes"
        )
    known = true_labels >= 0
    return float((pred[known] == true_labels[known]).mean()) if known.any() else 0.0


# ----------------------------------------------------------------------------- result


@dataclass
class SelectionResult:
    """A selection and everything behind it (arrays (N,) in row order).

    selected bool, the final clean set; filled bool, the rows added by empty-class fill-in;
    scores["classifier/criterion"] float32, the value compared with the threshold (consistency,
    or the loss-GMM posterior); masks[pair] bool; predictions[classifier] int32 argmax;
    confidences[classifier] float32 max P; loss_scores[classifier] float32 normalised loss in
    [0, 1]; noise_score float32 in [0, 1] (module docstring). counts: rows passing each pair,
    "intersection", "filled", "final"; per_class: min/median/max of the final per-class counts
    over classes with labelled rows, and how many classes were empty and filled; classifier_info:
    per classifier the degenerate classes, mixture convergence and (linear) the fit summary."""

    selected: np.ndarray
    filled: np.ndarray
    scores: dict
    masks: dict
    predictions: dict
    confidences: dict
    loss_scores: dict
    noise_score: np.ndarray
    counts: dict
    per_class: dict
    unlabelled: int
    classifier_info: dict
    timings: dict
    config: SelectConfig
    metrics: dict | None = None
    linear_models: list = field(default_factory=list, repr=False)
    warnings: list = field(default_factory=list)
    clean_score: np.ndarray | None = None  # robust mode: log-odds that the label is right, ranks all rows
    noise: dict | None = None  # robust mode: estimated given -> true counts {given, true, count} (E,)
    noise_summary: dict | None = None  # robust mode: estimated rate, per-class rates, top swapped pairs

    def summary(self) -> dict:
        """JSON-ready: counts, per-class figures, classifier info, metrics, timings, warnings and the config."""
        return {
            "rows": int(len(self.selected)),
            "counts": self.counts,
            "per_class": self.per_class,
            "unlabelled": self.unlabelled,
            "classifiers": self.classifier_info,
            "metrics": self.metrics,
            "noise": self.noise_summary,
            "warnings": self.warnings,
            "timings": self.timings,
            "config": self.config.to_dict(),
        }


# ----------------------------------------------------------------------------- pipeline


def _as_text(text_features, text_mask, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.as_tensor(np.asarray(text_features) if not isinstance(text_features, torch.Tensor) else text_features)
    if text.ndim == 2:
        text = text[:, None, :]
    if text.ndim != 3 or not text.is_floating_point() or text.shape[2] != dim or text.shape[0] < 1:
        raise EngineError(
            f"text_features: got shape {tuple(text.shape)} dtype {text.dtype}, expected (C, P, {dim}) "
            f"or (C, {dim}) floating point (D of the image features)"
        )
    mask = (
        torch.ones(text.shape[:2], dtype=torch.bool)
        if text_mask is None
        else torch.as_tensor(np.asarray(text_mask) if not isinstance(text_mask, torch.Tensor) else text_mask)
    )
    if tuple(mask.shape) != tuple(text.shape[:2]) or mask.dtype is not torch.bool:
        raise EngineError(
            f"text_mask: got shape {tuple(mask.shape)} dtype {mask.dtype}, expected {tuple(text.shape[:2])} bool (C, P)"
        )
    if not mask.any(1).all():
        missing = torch.nonzero(~mask.any(1)).squeeze(1)[:5].tolist()
        raise EngineError(f"text_mask: classes {missing} have no prompt, expected at least one per class")
    return text.to(device=device, dtype=torch.float32), mask.to(device)


def _check_sources(config: SelectConfig, extra: Mapping, available: set) -> None:
    stray = [name for name in extra if name not in config.classifiers]
    if stray:
        raise EngineError(
            f"extra_classifiers: got {stray}, which are not in config.classifiers "
            f"({', '.join(config.classifiers)}); add them there"
        )
    for name in config.classifiers:
        if name in extra:
            continue
        missing = [need for need in CLASSIFIERS[name].needs if need not in available]
        if missing:
            hint = NEEDS_HINT[missing[0]].format(name=name)
            raise EngineError(f"classifiers: {name} needs {missing[0]} and none were given; {hint}")


def _neighbors(neighbors, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if neighbors is None:
        return None
    similarities, ids = (np.asarray(a) for a in neighbors)
    if similarities.ndim != 2 or similarities.shape != ids.shape or len(ids) != n:
        raise EngineError(
            f"neighbors: got shapes {similarities.shape} and {ids.shape}, expected two ({n}, k) arrays "
            f"(similarities, ids)"
        )
    return similarities, ids


def _prepare(
    features, labels, text_features, text_mask, num_classes, true_labels, neighbors, config, extra
) -> tuple[ClassifierInputs, np.ndarray | None]:
    """Validate everything at the boundary; features become float16 on the device."""
    device = resolve_device(config.device)
    feats = as_features(features, device)
    n, dim = feats.shape
    text = None if text_features is None else _as_text(text_features, text_mask, dim, device)
    if text is None:
        labs, num_classes = as_labels(labels, n, num_classes)
    else:
        classes = text[0].shape[0]
        if num_classes is not None and num_classes != classes:
            raise EngineError(
                f"num_classes: got {num_classes}, but text_features has {classes} classes; expected them to agree"
            )
        labs, num_classes = as_labels(labels, n, None)
        if num_classes > classes:
            raise EngineError(
                f"labels: got values up to {num_classes - 1}, but text_features has {classes} "
                f"classes (expected labels in [-1, {classes - 1}]); run `engine prompts` with the "
                f"class file of these labels"
            )
        num_classes = classes
    if not (labs >= 0).any():
        raise EngineError(f"labels: got {n} rows and none labelled (all -1), expected some labelled rows")
    found = _neighbors(neighbors, n)
    available = {name for name, present in (("text", text is not None), ("neighbors", found is not None)) if present}
    _check_sources(config, extra, available)
    true = None
    if true_labels is not None:
        true = as_labels(true_labels, n, num_classes, name="true_labels")[0].numpy()
    columns = max(num_classes * (text[0].shape[1] if text is not None else 1), num_classes, dim)
    inputs = ClassifierInputs(
        features=feats,
        labels=labs.numpy(),
        num_classes=num_classes,
        text=text,
        neighbors=found,
        device=device,
        block_rows=config.block_rows or auto_block_rows(columns),
    )
    return inputs, true


def _score_rows(name: str, fn: LogProbsFn, inputs: ClassifierInputs, *, probs_path, show_progress) -> dict:
    """One pass over the row blocks: per-row scores (N,) of classifier `name`, and its P to `probs_path`."""
    n, c = len(inputs.labels), inputs.num_classes
    out = {
        "consistency": np.empty(n, np.float32),
        "log_p": np.empty(n, np.float32),
        "prediction": np.empty(n, np.int32),
        "confidence": np.empty(n, np.float32),
    }
    probs = (
        None if probs_path is None else np.lib.format.open_memmap(probs_path, mode="w+", dtype=np.float32, shape=(n, c))
    )
    labels = torch.from_numpy(inputs.labels)
    disable = None if show_progress is None else not show_progress
    with progress(total=n, desc=f"select {name}", unit="row", disable=disable) as bar:
        for start in range(0, n, inputs.block_rows):
            stop = min(n, start + inputs.block_rows)
            block = torch.as_tensor(fn(start, stop))
            if tuple(block.shape) != (stop - start, c) or not block.is_floating_point():
                raise EngineError(
                    f"classifier {name}: rows {start}:{stop} gave shape {tuple(block.shape)} dtype "
                    f"{block.dtype}, expected ({stop - start}, {c}) floating log-probabilities"
                )
            scores = score_block(block, labels[start:stop].to(block.device))
            if bool(torch.isnan(block).any()) or not bool((scores["confidence"] > 0).all()):
                raise EngineError(f"classifier {name}: rows {start}:{stop} have NaN or all -inf log-probabilities")
            for key, value in scores.items():
                out[key][start:stop] = value.cpu().numpy()
            if probs is not None:
                probs[start:stop] = block.float().exp().cpu().numpy()
            bar.update(stop - start)
    if probs is not None:
        probs.flush()
    return out


def criteria_of(classifier: str, criteria: tuple[str, ...]) -> tuple[str, ...]:
    """The tests a classifier's probabilities go through: the configured criteria, except for
    knn, whose 10-neighbor vote is not a confidence: it only vetoes (docs/method.md)."""
    return ("vote",) if classifier == "knn" else criteria


def _criterion_scores(
    name: str, per: dict, inputs: ClassifierInputs, groups: ClassGroups, config: SelectConfig, timer: Timer, info: dict
) -> None:
    """Adds loss_score (N,) and, with the loss criterion, posterior (N,) to one classifier's `per`."""
    with timer("normalise"):
        per["loss_score"], degenerate = normalise_loss(per["log_p"], groups)
    info["degenerate_classes"] = int((degenerate & (groups.counts > 0)).sum())
    if "loss" in criteria_of(name, config.criteria):
        with timer("gmm"):
            per["posterior"], info["gmm"] = loss_posteriors(per["loss_score"], groups, degenerate, config=config)


def _combine(per: dict, inputs: ClassifierInputs, groups: ClassGroups, config: SelectConfig) -> dict:
    """Masks per pair, their intersection, the fill-in, the noise score and the counts."""
    from engine.classifiers.knn import VETO_OWN, vote_veto

    labelled = inputs.labels >= 0
    value_of = {
        "consistency": lambda p: p["consistency"],
        "loss": lambda p: p["posterior"],
        "vote": lambda p: np.exp(p["log_p"]),
    }
    theta_of = {"consistency": config.theta_cons, "loss": config.theta_gmm, "vote": VETO_OWN}
    scores, masks, thresholds = {}, {}, {}
    for name in config.classifiers:
        for criterion in criteria_of(name, config.criteria):
            pair = f"{name}/{criterion}"
            scores[pair] = value_of[criterion](per[name]).astype(np.float32, copy=False)
            thresholds[pair] = theta_of[criterion]
            if criterion == "vote":
                p = per[name]
                masks[pair] = labelled & ~vote_veto(
                    p["consistency"], p["log_p"], p["prediction"], p["confidence"], inputs.labels
                )
            else:
                masks[pair] = labelled & (scores[pair] >= thresholds[pair])
    intersection = np.logical_and.reduce(list(masks.values()))
    ranker = "zeroshot" if "zeroshot" in per else config.classifiers[0]
    fill_rows, m = (
        fill_empty_classes(
            intersection, inputs.labels, per[ranker]["loss_score"], groups, num_classes=inputs.num_classes
        )
        if config.fill_empty
        else (np.zeros(0, np.int64), 0)
    )
    filled = np.zeros(len(labelled), dtype=bool)
    filled[fill_rows] = True
    selected = intersection | filled
    per_class = per_class_figures(selected, intersection, filled, inputs.labels, groups, fill_m=m)
    per_class["fill_ranked_by"] = f"{ranker}/loss_score"
    counts = {pair: int(mask.sum()) for pair, mask in masks.items()}
    counts.update(intersection=int(intersection.sum()), filled=int(filled.sum()), final=int(selected.sum()))
    return {
        "selected": selected,
        "filled": filled,
        "scores": scores,
        "masks": masks,
        "counts": counts,
        "per_class": per_class,
        "noise_score": noise_scores(scores, thresholds, labelled, masks),
    }


def per_class_figures(selected, before_fill, filled, labels, groups: ClassGroups, *, fill_m: int) -> dict:
    """min/median/max of the final per-class counts over classes with labelled rows, and the fill-in."""
    num_classes = len(groups.counts)
    final = np.bincount(labels[selected], minlength=num_classes)[groups.counts > 0]
    before = np.bincount(labels[before_fill], minlength=num_classes)
    return {
        "min": int(final.min()),
        "median": float(np.median(final)),
        "max": int(final.max()),
        "classes_with_rows": int((groups.counts > 0).sum()),
        "empty_before_fill": int(((groups.counts > 0) & (before == 0)).sum()),
        "filled_classes": int(len(np.unique(labels[filled]))),
        "fill_m": fill_m,
    }


def _select_robust(
    inputs: ClassifierInputs, groups: ClassGroups, config: SelectConfig, timer: Timer, show_progress
) -> SelectionResult:
    """The robust mode (engine.robust) as a SelectionResult: one test, "robust/posterior" (the clean
    posterior against `robust_threshold`), the likeliest true class as the prediction, and the
    estimated noise structure."""
    from engine.robust import RobustConfig, robust_select

    robust_config = RobustConfig(
        tau=config.tau, threshold=config.robust_threshold, fill_empty=config.fill_empty, block_rows=config.block_rows
    )
    with timer("robust"):
        out = robust_select(inputs, config=robust_config, seed=config.seed, show_progress=show_progress)
    labelled = inputs.labels >= 0
    passed = labelled & (out.clean_prob >= config.robust_threshold)
    info = {
        "robust": {
            "source": "built-in",
            "decisions": out.decisions,
            "labels": label_agreement(out.likely_true, inputs.labels, inputs.num_classes),
        }
    }
    for name, pred in (("gda", out.pred_gda), ("zeroshot", out.pred_zeroshot)):
        info[name] = {"source": "robust witness", "labels": label_agreement(pred, inputs.labels, inputs.num_classes)}
    counts = {
        "robust/posterior": int(passed.sum()),
        "intersection": int(passed.sum()),
        "filled": int(out.filled.sum()),
        "final": int(out.selected.sum()),
    }
    names_rate = np.nan_to_num(out.noise_rate, nan=0.0)
    noisiest = np.argsort(-names_rate, kind="stable")[:10]
    return SelectionResult(
        selected=out.selected,
        filled=out.filled,
        scores={"robust/posterior": out.clean_prob},
        masks={"robust/posterior": passed},
        predictions={"robust": out.likely_true},
        confidences={"robust": out.clean_prob},
        loss_scores={"robust": out.clean_prob},
        noise_score=np.where(labelled, 1.0 - out.clean_prob, 1.0).astype(np.float32),
        counts=counts,
        per_class=per_class_figures(
            out.selected, passed, out.filled, inputs.labels, groups, fill_m=out.decisions["fill_m"]
        ),
        unlabelled=int((~labelled).sum()),
        classifier_info=info,
        timings=timer.rounded(),
        config=config,
        warnings=classifier_warnings(info),
        clean_score=out.score,
        noise=out.noise,
        noise_summary={
            "model": out.decisions["noise_model"],
            "why": out.decisions["why"],
            "estimated_rate": round(out.decisions["estimated_noise_rate"], 4),
            "noisiest_classes": [
                {"class": int(k), "rate": round(float(names_rate[k]), 4)} for k in noisiest if names_rate[k] > 0
            ],
            "top_pairs": out.top_pairs,
        },
    )


def select_samples(
    features,
    labels,
    *,
    text_features=None,
    text_mask=None,
    config: SelectConfig | None = None,
    num_classes: int | None = None,
    extra_classifiers: Mapping[str, LogProbsFn] | None = None,
    neighbors=None,
    true_labels=None,
    probs_dir=None,
    show_progress: bool | None = None,
) -> SelectionResult:
    """Select the rows whose given label looks clean (docs/method.md).

    features (N, D) float16 unit rows (numpy or torch; other float dtypes are cast: a float16
    copy); labels (N,) int, -1 = unlabelled; text_features (C, P, D) or (C, D) float with
    text_mask (C, P) bool (None: all prompts real), needed for "zeroshot"; num_classes needed
    only without text features when the labels do not reach the last class;
    extra_classifiers {name: fn(start, stop) -> log P (stop - start, C)} supplies classifiers
    built elsewhere or replaces a registered one; neighbors (similarities (N, k), ids (N, k)), each
    row's nearest other rows, needed for "knn"; true_labels (N,)
    int (-1 = unknown) adds precision/recall/F1 and accuracies; probs_dir writes each
    classifier's P as probs_<name>.npy (N, C) float32. Memory: see the module docstring."""
    config = config or SelectConfig()
    extra = dict(extra_classifiers or {})
    timer = Timer()
    with timer("prepare"):
        inputs, true = _prepare(
            features, labels, text_features, text_mask, num_classes, true_labels, neighbors, config, extra
        )
        groups = ClassGroups.build(inputs.labels, inputs.num_classes)
    if config.mode == "robust":
        result = _select_robust(inputs, groups, config, timer, show_progress)
        return _finish_result(result, inputs, true)
    per, info = {}, {}
    for name in config.classifiers:
        info[name] = {"source": "extra_classifiers" if name in extra else "built-in"}
        fn = extra[name] if name in extra else CLASSIFIERS[name].build(inputs, config, timer, info[name])
        path = None if probs_dir is None else Path(probs_dir) / f"probs_{name}.npy"
        with timer(f"score:{name}"):
            per[name] = _score_rows(name, fn, inputs, probs_path=path, show_progress=show_progress)
        _criterion_scores(name, per[name], inputs, groups, config, timer, info[name])
        info[name]["labels"] = label_agreement(per[name]["prediction"], inputs.labels, inputs.num_classes)
    with timer("select"):
        combined = _combine(per, inputs, groups, config)
    models = [m for name in info for m in info[name].pop("models", [])]
    result = SelectionResult(
        predictions={k: v["prediction"] for k, v in per.items()},
        confidences={k: v["confidence"] for k, v in per.items()},
        loss_scores={k: v["loss_score"] for k, v in per.items()},
        unlabelled=int((inputs.labels < 0).sum()),
        classifier_info=info,
        timings=timer.rounded(),
        config=config,
        linear_models=models,
        warnings=classifier_warnings(info),
        **combined,
    )
    for line in result.warnings:
        _logger.info("select: warning: %s", line)
    return _finish_result(result, inputs, true)


def _finish_result(result: SelectionResult, inputs: ClassifierInputs, true) -> SelectionResult:
    """Metrics against the true labels when known, and a log line."""
    if true is not None:
        result.metrics = selection_metrics(result.selected, inputs.labels, true)
        result.metrics["accuracy"] = {k: classifier_accuracy(v, true) for k, v in result.predictions.items()}
    _logger.info(
        "select: %d of %d rows selected (%s)",
        result.counts["final"],
        len(inputs.labels),
        ", ".join(f"{k} {v}" for k, v in result.counts.items()),
    )
    return result

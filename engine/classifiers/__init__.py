"""The classifiers behind selection, and their registry.

`CLASSIFIERS` maps each name `--classifiers` accepts to a `ClassifierSpec`: what it is, what it
needs (text features, neighbor lists) and how it is built into a row-block function
`fn(start, stop) -> log P (stop - start, C)`. The array-level pieces live in `zeroshot`,
`linear` and `knn`; the method is described in docs/method.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.classifiers.common import BLOCK_ELEMENTS, as_features, as_labels, auto_block_rows
from engine.classifiers.knn import KNN_ALPHA, KNN_TAU, knn_classifier, knn_log_probs
from engine.classifiers.linear import (
    ABSENT_BIAS,
    FTOL,
    LinearModel,
    fit_linear,
    fit_linear_folds,
    linear_block_rows,
    linear_log_probs,
    linear_oof_log_probs,
    stratified_folds,
)
from engine.classifiers.zeroshot import zeroshot_log_probs
from engine.runtime import EngineError

LogProbsFn = Callable[[int, int], torch.Tensor]  # (start, stop) -> log P (stop - start, C)


@dataclass
class ClassifierInputs:
    """What a classifier is built from, validated once: features (N, D) float16 on the device,
    labels (N,) int64 (-1 = unlabelled), num_classes, text ((C, P, D) float32, (C, P) bool) on the
    device or None, neighbors ((N, k) similarities float32, (N, k) ids int64) or None, the device
    and the rows per scoring block."""

    features: torch.Tensor
    labels: np.ndarray
    num_classes: int
    text: tuple | None
    neighbors: tuple | None
    device: torch.device
    block_rows: int


@dataclass(frozen=True)
class ClassifierSpec:
    """A registered classifier: `build(inputs, config, timer, info) -> LogProbsFn` may fit a model
    (timed with `timer`) and records what it did in `info` (JSON-ready; "fit" for fitted models)."""

    name: str
    description: str
    needs: tuple[str, ...]
    build: Callable


def _build_zeroshot(inputs: ClassifierInputs, config, timer, info: dict) -> LogProbsFn:
    text, mask = inputs.text
    return lambda start, stop: zeroshot_log_probs(inputs.features[start:stop], text, mask, tau=config.tau)


def _build_linear(inputs: ClassifierInputs, config, timer, info: dict) -> LogProbsFn:
    options = dict(
        num_classes=inputs.num_classes,
        c=config.linear_c,
        max_iter=config.linear_max_iter,
        tol=config.linear_tol,
        whiten=config.linear_whiten,
        device=inputs.device,
        block_rows=config.block_rows,
    )
    with timer("linear_fit"):
        if config.linear_folds:
            models, fold = fit_linear_folds(
                inputs.features, inputs.labels, folds=config.linear_folds, seed=config.seed, **options
            )
        else:
            models, fold = [fit_linear(inputs.features, inputs.labels, **options)], None
    info["fit"] = [m.summary() for m in models]
    info["models"] = models
    dev = inputs.device
    placed = [replace(m, weight=m.weight.to(dev), bias=m.bias.to(dev)) for m in models]  # moved once, not per block
    if fold is None:
        return lambda start, stop: linear_log_probs(placed[0], inputs.features[start:stop])
    fold_t = torch.from_numpy(fold).to(dev)
    return lambda start, stop: linear_oof_log_probs(placed, fold_t[start:stop], inputs.features[start:stop])


def _build_knn(inputs: ClassifierInputs, config, timer, info: dict) -> LogProbsFn:
    similarities, ids = inputs.neighbors
    fn = knn_classifier(similarities, ids, inputs.labels, inputs.num_classes)
    info["k"] = int(np.shape(ids)[1])
    return lambda start, stop: torch.from_numpy(np.asarray(fn(start, stop)))


def _build_gda(inputs: ClassifierInputs, config, timer, info: dict) -> LogProbsFn:
    from engine.classifiers.gda import build_gda, choose_shrinkage, class_stats

    labels = torch.from_numpy(np.asarray(inputs.labels, dtype=np.int64))
    with timer("gda_fit"):
        stats = class_stats(
            inputs.features, labels, inputs.num_classes, block_rows=inputs.block_rows, device=inputs.device
        )
        rows = torch.nonzero(labels >= 0).squeeze(1)
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))[:20_000]
        sample = rows[pick].sort().values
        lam, scores = choose_shrinkage(
            stats, inputs.features[sample.to(inputs.features.device)].float(), labels[sample].to(inputs.device)
        )
        model = build_gda(stats, lam)
    info["shrinkage"] = lam
    info["shrinkage_agreement"] = {str(k): round(v, 4) for k, v in scores.items()}

    def log_probs(start: int, stop: int) -> torch.Tensor:
        x = inputs.features[start:stop].float()
        return torch.log_softmax(model.logits(x, labels[start:stop].to(x.device)), dim=1)

    return log_probs


CLASSIFIERS = {
    spec.name: spec
    for spec in (
        ClassifierSpec(
            "zeroshot",
            "CLIP zero-shot with the class prompts (text features from `engine prompts`)",
            ("text",),
            _build_zeroshot,
        ),
        ClassifierSpec(
            "linear",
            "balanced multinomial logistic regression fitted on the features and given labels",
            (),
            _build_linear,
        ),
        ClassifierSpec(
            "knn",
            "similarity-weighted votes of each row's nearest other rows (FAISS neighbors)",
            ("neighbors",),
            _build_knn,
        ),
        ClassifierSpec(
            "gda",
            "a Gaussian discriminant of the given labels (shared, shrunk covariance), leave-one-out for a row's own "
            "class: it never votes for its own label",
            (),
            _build_gda,
        ),
    )
}

NEEDS_HINT = {
    "text": "run `engine prompts --cache ... --classes ...` first, or drop {name} from --classifiers",
    "neighbors": "pass the neighbor lists (engine.stages computes them from the cache's FAISS index)",
}


def get_classifier(name: str) -> ClassifierSpec:
    """The registered classifier `name`; an error listing the choices otherwise."""
    if name not in CLASSIFIERS:
        raise EngineError(f"classifier: got {name!r}, expected one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name]


__all__ = [
    "ABSENT_BIAS",
    "BLOCK_ELEMENTS",
    "CLASSIFIERS",
    "ClassifierInputs",
    "ClassifierSpec",
    "FTOL",
    "KNN_ALPHA",
    "KNN_TAU",
    "LinearModel",
    "LogProbsFn",
    "NEEDS_HINT",
    "as_features",
    "as_labels",
    "auto_block_rows",
    "fit_linear",
    "fit_linear_folds",
    "get_classifier",
    "knn_classifier",
    "knn_log_probs",
    "linear_block_rows",
    "linear_log_probs",
    "linear_oof_log_probs",
    "stratified_folds",
    "zeroshot_log_probs",
]

"""MixFix training of a linear or MLP head on cached features (in-memory arrays): class-balanced
sampler, mixup, absorb/relabel recomputed every epoch from the given labels, baselines, checkpoints
and exact resume. The method and its conventions: docs/method.md.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.runtime import DEVICES, EngineError, Timer, make_generator, progress, resolve_device

_logger = logging.getLogger(__name__)

HEAD_FORMAT = "engine-head"
STATE_FORMAT = "engine-train-state"
FORMAT_VERSION = 1
DEFAULT_MILESTONE_FRACTIONS = (0.5, 0.75)
_VAL_SEED_OFFSET = 1  # the validation split uses seed + 1, independent of the training stream


# ----------------------------------------------------------------------------- heads


def _linear_head(in_dim: int, num_classes: int, hidden: int) -> nn.Module:
    return nn.utils.skip_init(nn.Linear, in_dim, num_classes)


def _mlp_head(in_dim: int, num_classes: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.utils.skip_init(nn.Linear, in_dim, hidden), nn.ReLU(), nn.utils.skip_init(nn.Linear, hidden, num_classes)
    )


HEADS = {"linear": _linear_head, "mlp": _mlp_head}


class Standardize(nn.Module):
    """(x - mean) * scale per feature dimension; buffers, so they travel with the head's state.

    Identity until `fit` sets them. L2-normalised CLIP features have per-dimension spreads of
    about 1/sqrt(D): a head on raw features stays unconfident under the method's learning rate
    and weight decay, and MixFix's confidence thresholds are then never reached."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale

    @torch.no_grad()
    def fit(self, features: torch.Tensor, rows: torch.Tensor, *, block_rows: int = 65536) -> None:
        """Mean and 1/std over `features[rows]` (rows (M,) int64), accumulated in float64 blocks."""
        total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
        square = torch.zeros_like(total)
        for start in range(0, len(rows), block_rows):
            block = features[rows[start : start + block_rows]].double()
            total += block.sum(0)
            square += (block * block).sum(0)
        count = max(1, len(rows))
        mean = total / count
        std = (square / count - mean * mean).clamp_min(0).sqrt()
        self.mean.copy_(mean.float())
        self.scale.copy_(torch.where(std > 1e-8, 1.0 / std.clamp_min(1e-8), torch.ones_like(std)).float())


def build_head(
    kind: str, in_dim: int, num_classes: int, *, hidden: int = 1024, generator: torch.Generator | None = None
) -> nn.Module:
    """A head mapping (B, in_dim) float32 features to (B, num_classes) logits, on CPU: a
    `Standardize` layer (identity until fitted) followed by the linear or MLP core.

    Linear layers get PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and
    bias, drawn from `generator` (a CPU generator; never the global RNG)."""
    if kind not in HEADS:
        raise EngineError(f"head: got {kind!r}, expected one of {', '.join(HEADS)}")
    core = HEADS[kind](in_dim, num_classes, hidden)
    generator = generator if generator is not None else make_generator(0)
    with torch.no_grad():
        for layer in core.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return nn.Sequential(Standardize(in_dim), core)


def _head_dims(head: nn.Module) -> tuple[int, int]:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EngineError(
            f"head: got a {type(head).__name__} without Linear layers, expected a head "
            f"from build_head, load_head or train_head"
        )
    return linears[0].in_features, linears[-1].out_features


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """MixFix training settings; defaults are the authors' (docs/method.md) where they give one.

    `milestones` None means 50% and 75% of `epochs` (see `resolved_milestones`).
    `block_rows` bounds the rows predicted at once (a block's probabilities are
    block_rows x C float32)."""

    head: str = "linear"
    hidden: int = 1024
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    beta: float = 1.0
    theta_r: float = 0.8
    theta_r2: float = 0.8
    mixfix: bool = True
    standardize: bool = True  # per-dimension standardisation fitted on the labelled rows
    relabel_unlabelled: bool = False
    val_fraction: float = 0.0
    block_rows: int = 65536
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.head not in HEADS:
            raise EngineError(f"head: got {self.head!r}, expected one of {', '.join(HEADS)}")
        for name in ("hidden", "epochs", "batch_size", "block_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EngineError(f"{name}: got {value!r}, expected a positive integer")
        checks = {
            "lr": (self.lr > 0, "a positive number"),
            "momentum": (0 <= self.momentum < 1, "a number in [0, 1)"),
            "weight_decay": (self.weight_decay >= 0, "a number >= 0"),
            "gamma": (0 < self.gamma <= 1, "a number in (0, 1]"),
            "beta": (self.beta > 0, "a positive number"),
            "theta_r": (0 <= self.theta_r <= 1, "a threshold in [0, 1]"),
            "theta_r2": (0 <= self.theta_r2 <= 1, "a threshold in [0, 1]"),
            "val_fraction": (0 <= self.val_fraction < 1, "a fraction in [0, 1)"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise EngineError(f"{name}: got {getattr(self, name)!r}, expected {expected}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise EngineError(f"device: got {self.device!r}, expected one of {', '.join(DEVICES)} (or cuda:N)")
        if self.milestones is not None:
            object.__setattr__(self, "milestones", self._checked_milestones(self.milestones))

    def _checked_milestones(self, milestones) -> tuple[int, ...]:
        values = tuple(milestones)
        ok = all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= self.epochs for m in values)
        if not ok or list(values) != sorted(set(values)):
            raise EngineError(
                f"milestones: got {list(values)}, expected strictly increasing epochs in [1, {self.epochs}]"
            )
        return values

    def resolved_milestones(self) -> tuple[int, ...]:
        """The epochs after which the learning rate is multiplied by `gamma`."""
        if self.milestones is not None:
            return self.milestones
        return tuple(sorted({max(1, int(f * self.epochs)) for f in DEFAULT_MILESTONE_FRACTIONS}))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["milestones"] = None if self.milestones is None else list(self.milestones)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EngineError(f"config: got unknown keys {unknown}, expected some of {sorted(known)}")
        values = dict(values)
        if values.get("milestones") is not None:
            values["milestones"] = tuple(values["milestones"])
        return cls(**values)


# ----------------------------------------------------------------------------- input


@dataclass
class _Data:
    features: torch.Tensor  # (N, D) float16, on the device
    labels: torch.Tensor  # (N,) int64 y~, -1 = unlabelled, on the device
    seed_mask: torch.Tensor  # (N,) bool S0 (labelled, not validation), on the device
    eligible: torch.Tensor  # (N,) bool rows the MixFix update may add or relabel
    val_mask: torch.Tensor  # (N,) bool held-out validation rows
    true_labels: torch.Tensor | None
    eval_features: torch.Tensor | None
    eval_labels: torch.Tensor | None
    num_classes: int
    fingerprint: dict
    dropped_unlabelled: int


def _tensor(name: str, value, *, ndim: int, kind: str, expected: str) -> torch.Tensor:
    """`value` (numpy array, torch tensor or array-like) as a CPU tensor, checked for ndim and kind
    ('f' floating, 'i' integer, 'b' bool)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(value)))
    kinds = {
        "f": tensor.is_floating_point(),
        "b": tensor.dtype is torch.bool,
        "i": not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype is not torch.bool,
    }
    if tensor.ndim != ndim or not kinds[kind]:
        raise EngineError(f"{name}: got shape {tuple(tensor.shape)} dtype {tensor.dtype}, expected {expected}")
    return tensor


def _check_labels(name: str, labels: torch.Tensor, num_classes: int, *, allow_unlabelled: bool) -> None:
    low = -1 if allow_unlabelled else 0
    if labels.numel() and (int(labels.min()) < low or int(labels.max()) >= num_classes):
        raise EngineError(
            f"{name}: got values in [{int(labels.min())}, {int(labels.max())}], expected "
            f"[{low}, {num_classes - 1}] ({'-1 = unlabelled, ' if low < 0 else ''}"
            f"num_classes={num_classes})"
        )


def _load_inputs(features, labels, selection, true_labels, eval_features, eval_labels, num_classes):
    """Check shapes and dtypes at the boundary; returns CPU tensors and the number of classes."""
    feats = _tensor("features", features, ndim=2, kind="f", expected="(N, D) floating point")
    n, dim = feats.shape
    labs = _tensor("labels", labels, ndim=1, kind="i", expected=f"({n},) integer").long()
    if len(labs) != n:
        raise EngineError(f"labels: got {len(labs)} rows, expected {n} (the rows of features)")
    sel = (
        (labs >= 0) if selection is None else _tensor("selection", selection, ndim=1, kind="b", expected=f"({n},) bool")
    )
    true = (
        None
        if true_labels is None
        else _tensor("true_labels", true_labels, ndim=1, kind="i", expected=f"({n},) integer").long()
    )
    for name, value in (("selection", sel), ("true_labels", true)):
        if value is not None and len(value) != n:
            raise EngineError(f"{name}: got {len(value)} rows, expected {n} (the rows of features)")
    ev_f = ev_l = None
    if (eval_features is None) != (eval_labels is None):
        raise EngineError("eval_features/eval_labels: got only one of them, expected both or neither")
    if eval_features is not None:
        ev_f = _tensor("eval_features", eval_features, ndim=2, kind="f", expected=f"(M, {dim}) floating point")
        ev_l = _tensor("eval_labels", eval_labels, ndim=1, kind="i", expected=f"({len(ev_f)},) integer").long()
        if ev_f.shape[1] != dim or len(ev_l) != len(ev_f):
            raise EngineError(
                f"eval_features/eval_labels: got shapes {tuple(ev_f.shape)} and {tuple(ev_l.shape)}, "
                f"expected (M, {dim}) and (M,) (D must match the training features)"
            )
    if num_classes is None:
        tops = [int(t.max()) for t in (labs, ev_l) if t is not None and t.numel()]
        num_classes = max(tops, default=-1) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EngineError(f"num_classes: got {num_classes!r}, expected a positive integer")
    _check_labels("labels", labs, num_classes, allow_unlabelled=True)
    for name, value in (("true_labels", true), ("eval_labels", ev_l)):
        if value is not None:
            _check_labels(name, value, num_classes, allow_unlabelled=True)
    return feats, labs, sel.bool(), true, ev_f, ev_l, num_classes


def _prepare(
    features,
    labels,
    selection,
    *,
    config: TrainConfig,
    device: torch.device,
    num_classes,
    true_labels,
    eval_features,
    eval_labels,
) -> _Data:
    """Everything on the device once; features stay float16 there and are cast per batch."""
    feats, labs, sel, true, ev_f, ev_l, num_classes = _load_inputs(
        features, labels, selection, true_labels, eval_features, eval_labels, num_classes
    )
    labelled = labs >= 0
    dropped = int((sel & ~labelled).sum())
    if dropped:
        _logger.warning("selection: %d selected rows have no label (-1); they are not trained on", dropped)
    seed = sel & labelled
    val = _val_split(seed, config.val_fraction, config.seed)
    seed &= ~val
    if not bool(seed.any()):
        raise EngineError(
            f"selection: got {int(sel.sum())} selected rows, of which none is labelled and "
            f"outside validation; expected at least one to train on"
        )
    eligible = ~val & (torch.ones_like(labelled) if config.relabel_unlabelled else labelled)
    digest = hashlib.sha256(labs.numpy().tobytes() + sel.numpy().tobytes()).hexdigest()
    fingerprint = {"rows": int(len(labs)), "dim": int(feats.shape[1]), "num_classes": num_classes, "sha256": digest}
    to = lambda t, dtype=None: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return _Data(
        to(feats, torch.float16),
        to(labs),
        to(seed),
        to(eligible),
        to(val),
        to(true),
        to(ev_f, torch.float16),
        to(ev_l),
        num_classes,
        fingerprint,
        dropped,
    )


def _val_split(seed_mask: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """(N,) bool: round(fraction * |S0|) seeded random rows of S0 (at least one when fraction > 0)."""
    val = torch.zeros_like(seed_mask)
    if fraction <= 0:
        return val
    rows = torch.nonzero(seed_mask).squeeze(1)
    count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    if count < 1:
        raise EngineError(
            f"val_fraction: got {fraction} with {len(rows)} selected labelled rows, expected "
            f"at least 2 selected rows to hold some out"
        )
    order = torch.randperm(len(rows), generator=make_generator(seed + _VAL_SEED_OFFSET))
    val[rows[order[:count]]] = True
    return val


# ----------------------------------------------------------------------------- sampling and mixup


def balanced_indices(labels: torch.Tensor, *, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Class-balanced draw of positions into `labels` (M,) int64 in [0, C), CPU.

    Returns (K * m,) int64 positions grouped by class, where K = classes present and
    m = the largest class count: class k's rows each appear floor(m / n_k) times, plus a
    random subset of (m mod n_k) of them once more (the authors' sampler, vectorised)."""
    counts = torch.bincount(labels, minlength=num_classes)
    largest = int(counts.max())
    shuffled = torch.randperm(len(labels), generator=generator)
    order = shuffled[torch.argsort(labels[shuffled], stable=True)]  # grouped by class, random within
    starts = torch.cumsum(counts, 0) - counts
    present = counts > 0
    draw = torch.arange(largest)
    positions = starts[present, None] + draw[None, :] % counts[present, None]
    return order[positions.reshape(-1)]


def sample_batches(
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    iterations: int,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(iterations, batch_size) int64 row ids: the class-balanced multiset of `rows` (M,) with
    `labels` (M,), shuffled afresh for every pass through it, passes concatenated and cut."""
    ids = rows[balanced_indices(labels, num_classes=num_classes, generator=generator)]
    need = iterations * batch_size
    passes = -(-need // len(ids))
    if passes == 1:
        stream = ids[torch.randperm(len(ids), generator=generator)]
    else:
        stream = ids[torch.rand(passes, len(ids), generator=generator).argsort(dim=1)].reshape(-1)
    return stream[:need].view(iterations, batch_size)


def draw_lams(rng: np.random.Generator, beta: float, size: int) -> np.ndarray:
    """(size,) float64 mixup weights: lam ~ Beta(beta, beta), lam = max(lam, 1 - lam) >= 0.5."""
    lam = rng.beta(beta, beta, size=size)
    return np.maximum(lam, 1.0 - lam)


def mixup(
    inputs: torch.Tensor, labels: torch.Tensor, *, lam: float, perm: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (B, D) float, labels (B,) int64, perm (B,) a permutation -> (mixed inputs (B, D),
    mixed one-hot targets (B, C) in the inputs' dtype, rows summing to one)."""
    # scatter rather than F.one_hot, which checks the label range and so waits for a GPU every batch
    onehot = torch.zeros(len(labels), num_classes, dtype=inputs.dtype, device=inputs.device)
    onehot.scatter_(1, labels[:, None], 1.0)
    return lam * inputs + (1 - lam) * inputs[perm], lam * onehot + (1 - lam) * onehot[perm]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k targets_k log softmax(logits)_k; logits and targets (B, C)."""
    return F.cross_entropy(logits, targets)  # probability targets: the soft-target form, fewer kernels


# ----------------------------------------------------------------------------- prediction


def _predict_rows(
    head: nn.Module, features: torch.Tensor, *, block_rows: int, device: torch.device, with_probs: bool = False
):
    """features (N, D) any float dtype/device -> on `device`: pred (N,) int64, conf (N,) float32,
    probs (N, C) float32 or None. At most `block_rows` rows are moved and predicted at once."""
    head.eval()
    preds, confs, probs = [], [], []
    with torch.inference_mode():
        for start in range(0, len(features), block_rows):
            block = features[start : start + block_rows].to(device=device, non_blocking=True).float()
            p = torch.softmax(head(block), dim=1)
            conf, pred = p.max(dim=1)
            preds.append(pred)
            confs.append(conf)
            if with_probs:
                probs.append(p)
    num_classes = _head_dims(head)[1]
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    pred = torch.cat(preds) if preds else empty
    conf = torch.cat(confs) if confs else empty.float()
    prob = (torch.cat(probs) if probs else torch.zeros(0, num_classes, device=device)) if with_probs else None
    return pred, conf, prob


def _accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, *, block_rows: int) -> float | None:
    """Fraction of labelled rows (label >= 0) predicted right; None when there are none."""
    known = labels >= 0
    if not bool(known.any()):
        return None
    pred, _, _ = _predict_rows(head, features[known], block_rows=block_rows, device=labels.device)
    return float((pred == labels[known]).float().mean())


def predict(
    head, features, *, block_rows: int = 65536, device: str | torch.device = "auto", return_probs: bool = False
):
    """Predict with a trained head over features (N, D) (numpy or torch, any float dtype).

    `head`: an nn.Module, a `HeadCheckpoint` or a `TrainResult`. Returns numpy arrays
    (pred (N,) int32, conf (N,) float32 = max probability, probs (N, C) float32 or None),
    computed `block_rows` rows at a time (a block's probabilities are block_rows x C float32)."""
    module = getattr(head, "head", head)
    if not isinstance(module, nn.Module):
        raise EngineError(f"head: got {type(head).__name__}, expected an nn.Module, HeadCheckpoint or TrainResult")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise EngineError(f"block_rows: got {block_rows!r}, expected a positive integer")
    in_dim, _ = _head_dims(module)
    feats = _tensor("features", features, ndim=2, kind="f", expected=f"(N, {in_dim}) floating point")
    if feats.shape[1] != in_dim:
        raise EngineError(
            f"features: got D={feats.shape[1]}, expected D={in_dim} (the head was trained on "
            f"{in_dim}-dimensional features; use features from the same model)"
        )
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    module = copy.deepcopy(module).to(dev)  # leave the caller's module where it is
    pred, conf, probs = _predict_rows(module, feats, block_rows=block_rows, device=dev, with_probs=return_probs)
    return (pred.to(torch.int32).cpu().numpy(), conf.cpu().numpy(), None if probs is None else probs.cpu().numpy())


# ----------------------------------------------------------------------------- MixFix


def mixfix_update(
    labels: torch.Tensor,
    pred: torch.Tensor,
    conf: torch.Tensor,
    selection: torch.Tensor,
    *,
    theta_r: float,
    theta_r2: float,
    eligible: torch.Tensor | None = None,
):
    """One MixFix update from the given labels y~ (never from the previous epoch's y').

    labels (N,) int64 y~, pred (N,) int64 yhat, conf (N,) float max probability, selection (N,)
    bool S0, eligible (N,) bool rows the update may touch (default: labelled rows).
    Returns (y' (N,) int64, S (N,) bool, absorbed (N,) bool, relabelled (N,) bool)."""
    eligible = (labels >= 0) if eligible is None else eligible
    absorbed = eligible & (pred == labels) & (conf >= theta_r)
    relabelled = eligible & (pred != labels) & (conf >= theta_r2)
    new_labels = torch.where(absorbed | relabelled, pred, labels)
    return new_labels, selection | absorbed | relabelled, absorbed, relabelled


# ----------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """A finished (or resumed-to-the-end) run. `labels` (N,) int32 is the final y' and
    `selection` (N,) bool the final training set S (both after the last MixFix update);
    `val_mask` (N,) bool the held-out validation rows; `best_state` the head's state at the
    best validation epoch (only when config.val_fraction > 0); `initial_rows` = |S0| trained on
    in the first epoch (after unlabelled and validation rows are taken out)."""

    head: nn.Module
    kind: str
    in_dim: int
    num_classes: int
    log: list[dict]
    labels: np.ndarray
    selection: np.ndarray
    val_mask: np.ndarray
    eval_acc: float | None
    config: TrainConfig
    best_state: dict | None = None
    best_epoch: int | None = None
    best_val_acc: float | None = None
    initial_rows: int = 0
    dropped_unlabelled: int = 0


@dataclass
class _State:
    epoch: int  # epochs completed
    labels: torch.Tensor  # (N,) int64 y'
    mask: torch.Tensor  # (N,) bool S
    log: list = field(default_factory=list)
    best: dict | None = None  # {"epoch", "val_acc", "state"}


@dataclass
class _Run:
    head: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    generator: torch.Generator
    rng: np.random.Generator
    device: torch.device


def _new_run(data: _Data, config: TrainConfig, device: torch.device) -> _Run:
    generator = make_generator(config.seed)
    head = build_head(
        config.head, data.features.shape[1], data.num_classes, hidden=config.hidden, generator=generator
    ).to(device)
    if config.standardize:
        head[0].fit(data.features, torch.nonzero(data.labels >= 0).squeeze(1), block_rows=config.block_rows)
    optimizer = torch.optim.SGD(
        head.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda" or None,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.resolved_milestones()), gamma=config.gamma
    )
    return _Run(head, optimizer, scheduler, generator, np.random.default_rng(config.seed), device)


def _train_epoch(run: _Run, data: _Data, state: _State, config: TrainConfig, epoch: int) -> float:
    """One epoch of max(1, N // batch) mixup steps on S with labels y'; returns the mean loss."""
    n, batch = len(data.labels), config.batch_size
    iterations = max(1, n // batch)
    rows = torch.nonzero(state.mask).squeeze(1).cpu()
    batches = sample_batches(
        rows,
        state.labels.cpu()[rows],
        num_classes=data.num_classes,
        iterations=iterations,
        batch_size=batch,
        generator=run.generator,
    ).to(run.device)
    perms = torch.rand(iterations, batch, generator=run.generator).argsort(dim=1).to(run.device)
    lams = draw_lams(run.rng, config.beta, iterations).tolist()
    run.head.train()
    total = torch.zeros((), device=run.device)
    for i in progress(range(iterations), desc=f"train epoch {epoch}", unit="batch"):
        idx = batches[i]
        inputs, targets = mixup(
            data.features[idx].float(), state.labels[idx], lam=lams[i], perm=perms[i], num_classes=data.num_classes
        )
        loss = soft_cross_entropy(run.head(inputs), targets)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total += loss.detach()
    return float(total) / iterations


def _update(run: _Run, data: _Data, state: _State, config: TrainConfig) -> dict:
    """The MixFix step after an epoch: sets state.labels / state.mask, returns the counts."""
    if not config.mixfix:
        return {"absorbed": 0, "relabelled": 0, "relabel_correct": None}
    pred, conf, _ = _predict_rows(run.head, data.features, block_rows=config.block_rows, device=run.device)
    state.labels, state.mask, absorbed, relabelled = mixfix_update(
        data.labels,
        pred,
        conf,
        data.seed_mask,
        theta_r=config.theta_r,
        theta_r2=config.theta_r2,
        eligible=data.eligible,
    )
    correct = None
    if data.true_labels is not None:
        correct = int((relabelled & (pred == data.true_labels)).sum())
    return {"absorbed": int(absorbed.sum()), "relabelled": int(relabelled.sum()), "relabel_correct": correct}


def _run_epoch(run: _Run, data: _Data, state: _State, config: TrainConfig, epoch: int) -> dict:
    """Train, step the schedule, evaluate, update; returns the epoch's log record."""
    timer, start = Timer(), time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    with timer("train"):
        loss = _train_epoch(run, data, state, config, epoch)
    run.scheduler.step()
    with timer("eval"):
        eval_acc = (
            None
            if data.eval_features is None
            else _accuracy(run.head, data.eval_features, data.eval_labels, block_rows=config.block_rows)
        )
        val_acc = None
        if bool(data.val_mask.any()):
            val_acc = _accuracy(
                run.head, data.features[data.val_mask], data.labels[data.val_mask], block_rows=config.block_rows
            )
    if val_acc is not None and (state.best is None or val_acc > state.best["val_acc"]):
        state.best = {"epoch": epoch, "val_acc": val_acc, "state": _cpu_state(run.head)}
    with timer("update"):
        counts = _update(run, data, state, config)
    precision = None
    if data.true_labels is not None:
        hit = state.labels[state.mask] == data.true_labels[state.mask]
        precision = float(hit.float().mean()) if hit.numel() else None
    return {
        "epoch": epoch,
        "lr": lr,
        "loss": loss,
        "selected": int(state.mask.sum()),
        **counts,
        "label_precision": precision,
        "eval_acc": eval_acc,
        "val_acc": val_acc,
        "seconds": time.perf_counter() - start,
        "seconds_train": timer.seconds["train"],
        "seconds_eval": timer.seconds["eval"],
        "seconds_update": timer.seconds["update"],
    }


def _cpu_state(head: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}


# ----------------------------------------------------------------------------- resumable state


def _save_state(path: Path, run: _Run, state: _State, data: _Data, config: TrainConfig) -> None:
    """Write everything needed to continue after `state.epoch` epochs (atomically: tmp + rename)."""
    scheduler = run.scheduler.state_dict()
    scheduler["milestones"] = dict(scheduler["milestones"])  # Counter -> dict for weights_only loads
    payload = {
        "format": STATE_FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": data.fingerprint,
        "epoch": state.epoch,
        "head": _cpu_state(run.head),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": scheduler,
        "torch_rng": run.generator.get_state(),
        "numpy_rng": run.rng.bit_generator.state,
        "labels": state.labels.cpu(),
        "mask": state.mask.cpu(),
        "log": state.log,
        "best": state.best,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _check_resumable(path: Path, saved: dict, data: _Data, config: TrainConfig) -> None:
    if saved.get("format") != STATE_FORMAT or saved.get("version") != FORMAT_VERSION:
        raise EngineError(f"resume: {path} is not an {STATE_FORMAT} v{FORMAT_VERSION} file")
    old, new = saved["fingerprint"], data.fingerprint
    if old["dim"] != new["dim"]:
        raise EngineError(
            f"resume: the saved head takes D={old['dim']} features, got D={new['dim']}; "
            f"use features from the same model or start without resume"
        )
    for key, what in (("rows", "rows"), ("num_classes", "classes"), ("sha256", "labels/selection hash")):
        if old[key] != new[key]:
            raise EngineError(
                f"resume: {path} was made with {what} {old[key]}, got {new[key]}; "
                f"resume needs the same data (start without resume)"
            )
    ours = {k: v for k, v in config.to_dict().items() if k != "device"}
    theirs = {k: v for k, v in saved["config"].items() if k != "device"}
    if ours != theirs:
        diff = ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(ours) if ours[k] != theirs.get(k))
        raise EngineError(
            f"resume: {path} was made with a different config ({diff}); use the same settings or start without resume"
        )


def _load_state(path: Path, run: _Run, data: _Data, config: TrainConfig) -> _State:
    """Restore head, optimizer, schedule and both RNGs from `path`; returns the saved progress."""
    saved = _read_torch_file(path, "resume state")
    _check_resumable(path, saved, data, config)
    run.head.load_state_dict(saved["head"])
    run.optimizer.load_state_dict(saved["optimizer"])
    scheduler = dict(saved["scheduler"])
    scheduler["milestones"] = collections.Counter(scheduler["milestones"])
    run.scheduler.load_state_dict(scheduler)
    run.generator.set_state(saved["torch_rng"])
    run.rng.bit_generator.state = saved["numpy_rng"]
    _logger.info("resume: continuing %s after epoch %d of %d", path, saved["epoch"], config.epochs)
    return _State(
        saved["epoch"], saved["labels"].to(run.device), saved["mask"].to(run.device), list(saved["log"]), saved["best"]
    )


# ----------------------------------------------------------------------------- entry points


def train_head(
    features,
    labels,
    selection=None,
    *,
    config: TrainConfig | None = None,
    num_classes: int | None = None,
    eval_features=None,
    eval_labels=None,
    true_labels=None,
    state_path: str | Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a head with MixFix (or, with config.mixfix False, on the fixed selection).

    features (N, D) float (held on the device as float16, cast to float32 per batch);
    labels (N,) int, -1 = unlabelled; selection (N,) bool S0 (None: all labelled rows);
    true_labels (N,) int, optional, only for logging; eval_features (M, D) / eval_labels (M,),
    optional held-out set evaluated after every epoch. `num_classes` defaults to max label + 1.
    With `state_path`, the full training state is written after every epoch; `resume=True`
    continues from it (and starts afresh when it does not exist). `on_epoch(record)` is called
    with each epoch's log record after the state is written."""
    config = TrainConfig() if config is None else config
    device = resolve_device(config.device)
    data = _prepare(
        features,
        labels,
        selection,
        config=config,
        device=device,
        num_classes=num_classes,
        true_labels=true_labels,
        eval_features=eval_features,
        eval_labels=eval_labels,
    )
    run = _new_run(data, config, device)
    path = None if state_path is None else Path(state_path)
    state = _State(0, data.labels.clone(), data.seed_mask.clone())
    if resume and path is not None and path.exists():
        state = _load_state(path, run, data, config)
    elif resume:
        _logger.info("resume: no saved state at %s; starting afresh", path)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        record = _run_epoch(run, data, state, config, epoch)
        state.epoch = epoch
        state.log.append(record)
        _logger.info(
            "epoch %d/%d loss %.4f |S| %d absorbed %d relabelled %d eval %s val %s (%.1fs)",
            epoch,
            config.epochs,
            record["loss"],
            record["selected"],
            record["absorbed"],
            record["relabelled"],
            record["eval_acc"],
            record["val_acc"],
            record["seconds"],
        )
        if path is not None:
            _save_state(path, run, state, data, config)
        if on_epoch is not None:
            on_epoch(record)
    return _result(run, state, data, config)


def _result(run: _Run, state: _State, data: _Data, config: TrainConfig) -> TrainResult:
    head = run.head.to("cpu").eval()
    in_dim, num_classes = _head_dims(head)
    best = state.best or {}
    return TrainResult(
        head=head,
        kind=config.head,
        in_dim=in_dim,
        num_classes=num_classes,
        log=state.log,
        labels=state.labels.cpu().numpy().astype(np.int32),
        selection=state.mask.cpu().numpy(),
        val_mask=data.val_mask.cpu().numpy(),
        eval_acc=state.log[-1]["eval_acc"] if state.log else None,
        config=config,
        best_state=best.get("state"),
        best_epoch=best.get("epoch"),
        best_val_acc=best.get("val_acc"),
        initial_rows=int(data.seed_mask.sum()),
        dropped_unlabelled=data.dropped_unlabelled,
    )


@dataclass
class BaselineResults:
    """The same head, config and seed trained three ways; `table` has one row per run."""

    noisy: TrainResult
    selection: TrainResult
    mixfix: TrainResult
    table: list[dict]


# run name -> (start from the selection (else all labelled rows), MixFix on)
BASELINE_RUNS = {"noisy": (False, False), "selection": (True, False), "mixfix": (True, True)}


def train_with_baselines(
    features,
    labels,
    selection,
    *,
    config: TrainConfig | None = None,
    num_classes: int | None = None,
    eval_features=None,
    eval_labels=None,
    true_labels=None,
    on_epoch: Callable[[dict], None] | None = None,
) -> BaselineResults:
    """Train on (a) all noisy labels, (b) the selection without MixFix, (c) the selection with
    MixFix; arguments as for `train_head`. Records passed to `on_epoch` carry a "run" key."""
    config = TrainConfig() if config is None else config
    results = {}
    for name, (use_selection, mixfix) in BASELINE_RUNS.items():
        callback = None if on_epoch is None else (lambda record, name=name: on_epoch({"run": name, **record}))
        results[name] = train_head(
            features,
            labels,
            selection if use_selection else None,
            config=dataclasses.replace(config, mixfix=mixfix),
            num_classes=num_classes,
            eval_features=eval_features,
            eval_labels=eval_labels,
            true_labels=true_labels,
            on_epoch=callback,
        )
    table = [
        {"run": name, "initial_rows": r.initial_rows, "final_rows": int(r.selection.sum()), "eval_acc": r.eval_acc}
        for name, r in results.items()
    ]
    return BaselineResults(results["noisy"], results["selection"], results["mixfix"], table)


# ----------------------------------------------------------------------------- head files


@dataclass
class HeadCheckpoint:
    """A head read back by `load_head`: the module (CPU, eval mode) and what it was trained on."""

    head: nn.Module
    kind: str
    in_dim: int
    num_classes: int
    hidden: int | None
    class_names: list[str]
    feature_identity: dict
    config: TrainConfig


_HEAD_STATES = {"last": lambda result: _cpu_state(result.head), "best": lambda result: result.best_state}


def save_head(
    path: str | Path,
    result: TrainResult,
    *,
    class_names,
    feature_identity: dict,
    config: TrainConfig | None = None,
    which: str = "last",
) -> Path:
    """Write the head (`which`: last | best-on-validation), its kind and dims, the class names
    (C,), the identity of the feature model (a plain dict from the caller) and the config."""
    if which not in _HEAD_STATES:
        raise EngineError(f"which: got {which!r}, expected one of {', '.join(_HEAD_STATES)}")
    state = _HEAD_STATES[which](result)
    if state is None:
        raise EngineError("which: got 'best' but this run kept no best checkpoint (needs val_fraction > 0)")
    names = [str(n) for n in class_names]
    if len(names) != result.num_classes:
        raise EngineError(f"class_names: got {len(names)} names, expected {result.num_classes} (the head's classes)")
    if not isinstance(feature_identity, dict):
        raise EngineError(f"feature_identity: got {type(feature_identity).__name__}, expected a dict")
    config = result.config if config is None else config
    payload = {
        "format": HEAD_FORMAT,
        "version": FORMAT_VERSION,
        "kind": result.kind,
        "in_dim": result.in_dim,
        "num_classes": result.num_classes,
        "hidden": config.hidden if result.kind == "mlp" else None,
        "state_dict": state,
        "class_names": names,
        "feature_identity": copy.deepcopy(feature_identity),
        "config": config.to_dict(),
        "which": which,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _read_torch_file(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many types for a file that isn't ours
        raise EngineError(f"{what}: {path} is not a file this engine wrote ({type(err).__name__})") from None


def load_head(
    path: str | Path, *, feature_dim: int | None = None, feature_identity: dict | None = None
) -> HeadCheckpoint:
    """Read a head written by `save_head`. With `feature_dim` / `feature_identity`, refuse a head
    trained on features of another dimension or from another feature model."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"head: got {str(path)!r}, expected an existing file written by save_head")
    saved = _read_torch_file(path, "head")
    if not isinstance(saved, dict) or saved.get("format") != HEAD_FORMAT:
        raise EngineError(f"head: {path} is not an {HEAD_FORMAT} file")
    if feature_dim is not None and feature_dim != saved["in_dim"]:
        raise EngineError(
            f"head: {path} takes D={saved['in_dim']} features, got D={feature_dim}; "
            f"use features from the model it was trained on"
        )
    from engine.models import same_model

    if feature_identity is not None and not same_model(feature_identity, saved["feature_identity"]):
        keys = sorted(
            k
            for k in set(feature_identity) | set(saved["feature_identity"])
            if feature_identity.get(k) != saved["feature_identity"].get(k)
        )
        raise EngineError(
            f"head: {path} was trained on features from {saved['feature_identity']}, "
            f"got {feature_identity} (differs in {', '.join(keys)})"
        )
    config = TrainConfig.from_dict(saved["config"])
    head = build_head(saved["kind"], saved["in_dim"], saved["num_classes"], hidden=saved["hidden"] or 1)
    head.load_state_dict(saved["state_dict"])
    return HeadCheckpoint(
        head.eval(),
        saved["kind"],
        saved["in_dim"],
        saved["num_classes"],
        saved["hidden"],
        list(saved["class_names"]),
        saved["feature_identity"],
        config,
    )

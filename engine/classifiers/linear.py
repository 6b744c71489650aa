"""The linear (induced) classifier: scikit-learn's `LogisticRegression(class_weight='balanced', C=c)`
multinomial objective, solved by L-BFGS in torch over row blocks, stopped as scikit-learn 1.2.2
(the authors' pin) stops. Out-of-fold variants for `--linear-folds`. The objective, the stopping
rule and the conditioning are in docs/method.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.classifiers.common import as_features, as_labels, resolve
from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

ABSENT_BIAS = -1.0e4  # bias of classes without training rows: probability exp(-1e4) = 0
LINEAR_BLOCK_ELEMENTS = 1 << 22


def linear_block_rows(dim: int, num_classes: int, device: torch.device) -> int:
    """Rows per block of the linear objective. CPU: features (B, D) and logits (B, C) in about
    16 MB of float32, which stays in cache better than large blocks (measured 64 vs 77 ms per
    evaluation at N = 50k, C = 100, D = 512; equal at C = 1000). GPU: 8x that, fewer launches."""
    budget = LINEAR_BLOCK_ELEMENTS * (8 if device.type == "cuda" else 1)
    return int(min(1 << 18, max(1024, budget // (dim + num_classes))))


@dataclass(frozen=True)
class LinearModel:
    """A fitted multinomial logistic regression.

    weight (C, D) float32 and bias (C,) float32 on CPU; `present` (C,) bool the classes that had
    training rows (the others have weight 0, bias ABSENT_BIAS); `objective` in scikit-learn's
    unscaled form 0.5 ||W||^2 + c sum_i w_i CE_i; `grad_max` max |grad G| of the summed
    objective at the solution (the measure `tol` bounds); `stop` why the solver stopped:
    "gtol" (grad_max <= tol), "ftol" (no relative progress beyond ftol), "max_iter" or
    "line_search"; `converged` for the first two."""

    weight: torch.Tensor
    bias: torch.Tensor
    present: torch.Tensor
    n_iter: int
    n_evals: int
    converged: bool
    objective: float
    grad_max: float
    stop: str = "gtol"

    def summary(self) -> dict:
        return {
            "n_iter": self.n_iter,
            "n_evals": self.n_evals,
            "converged": self.converged,
            "stop": self.stop,
            "objective": self.objective,
            "grad_max": self.grad_max,
        }


def linear_log_probs(model: LinearModel, features: torch.Tensor) -> torch.Tensor:
    """log P (B, C) float32 of one block of features (B, D) any float dtype, on its device."""
    x = features.to(torch.float32)
    weight = model.weight.to(x.device)
    bias = model.bias.to(x.device)
    return torch.log_softmax(torch.addmm(bias, x, weight.T), dim=1)


class _Objective:
    """F and grad F over row blocks, in the coordinates the optimiser works in.

    F(W, b) = sum_i w_i CE_i / S + l2 ||W||^2 / 2 with W (K, D), b (K,) float64. features (N, D)
    float16 on the device; rows (M,) int64 the training rows; targets (M,) int64 their class in
    0..K-1; sample_weight (M,) float32; l2 = 1 / (c S).

    With `whitening` (A (D, D), mu (D,), float64) the optimiser's variables are
    theta = [V, b'] with W = V A and b = b' - W mu: the same function in better-conditioned
    coordinates (the features centred and whitened), hence the same minimiser. The data pass
    always runs with (W, b) on the stored features; the gradient is mapped back by the chain rule,
    and the stopping measure is max |grad F| in the original (W, b), as scikit-learn's."""

    def __init__(self, features, rows, targets, sample_weight, *, num_classes, l2, block_rows, whitening=None):
        self.features, self.rows, self.targets, self.sw = features, rows, targets, sample_weight
        self.k, self.dim = num_classes, features.shape[1]
        self.sw_sum = float(sample_weight.double().sum())
        self.l2, self.block_rows, self.whitening = l2, block_rows, whitening
        self.evals = 0
        self.buffers = None
        self.contiguous = len(rows) > 0 and int(rows[-1]) - int(rows[0]) == len(rows) - 1

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reused float32 blocks x (B, D), logits (B, K), gradient (K, D): fresh large tensors cost
        page faults on every block (measured 4x slower casts on CPU)."""
        if self.buffers is None:
            rows = min(self.block_rows, len(self.rows))
            kw = {"dtype": torch.float32, "device": self.features.device}
            self.buffers = (
                torch.empty(rows, self.dim, **kw),
                torch.empty(rows, self.k, **kw),
                torch.empty(self.k, self.dim, **kw),
            )
        return self.buffers

    def block(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Training rows start:stop cast into `out` (B, D) float32; a slice when rows are contiguous."""
        if self.contiguous:
            first = int(self.rows[0])
            return out.copy_(self.features[first + start : first + stop])
        return out.copy_(self.features[self.rows[start:stop]])

    def to_model(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (K, D), b (K,)) float64 from the optimiser's variables."""
        kd = self.k * self.dim
        weight, bias = theta[:kd].view(self.k, self.dim), theta[kd:]
        if self.whitening is None:
            return weight, bias
        matrix, mean = self.whitening
        weight = weight @ matrix
        return weight, bias - weight @ mean

    def data_term(self, weight: torch.Tensor, bias: torch.Tensor):
        """(sum_i w_i CE_i, its gradients (K, D) and (K,)), float64, one pass over the blocks."""
        weight32, bias32 = weight.float(), bias.float()
        loss = torch.zeros((), dtype=torch.float64, device=weight.device)
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias)
        x_buf, z_buf, g_buf = self._buffers()
        for start in range(0, len(self.rows), self.block_rows):
            stop = min(start + self.block_rows, len(self.rows))
            x = self.block(start, stop, x_buf[: stop - start])
            z = torch.addmm(bias32, x, weight32.T, out=z_buf[: stop - start])
            y, sw = self.targets[start:stop, None], self.sw[start:stop]
            z_y = z.gather(1, y).squeeze(1)
            top = z.max(dim=1).values
            z.sub_(top[:, None]).exp_()
            total = z.sum(dim=1)
            loss += (sw.double() * (top + total.log() - z_y).double()).sum()
            z.mul_((sw / total)[:, None])  # z is now w_i P (B, K)
            z.scatter_add_(1, y, -sw[:, None])
            grad_w += torch.mm(z.T, x, out=g_buf)
            grad_b += z.sum(0)
        return loss, grad_w, grad_b

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """(F, grad F in the optimiser's coordinates, max |grad G| in (W, b) for the summed G = S F)."""
        self.evals += 1
        weight, bias = self.to_model(theta)
        loss, grad_w, grad_b = self.data_term(weight, bias)
        value = float(loss) / self.sw_sum + 0.5 * self.l2 * float((weight * weight).sum())
        grad_w = grad_w / self.sw_sum + self.l2 * weight
        grad_b = grad_b / self.sw_sum
        gmax = max(float(grad_w.abs().max()), float(grad_b.abs().max())) * self.sw_sum
        if self.whitening is not None:
            matrix, mean = self.whitening
            grad_w = (grad_w - grad_b[:, None] * mean[None, :]) @ matrix.T
        return value, torch.cat([grad_w.flatten(), grad_b]), gmax


def _whitening(features, rows, *, block_rows: int, ridge: float):
    """(A (D, D), mean (D,)) float64 with A (Cov + r I) A^T = I, A = L^-1 for the Cholesky factor L,
    r = ridge * tr(Cov) / D, from one pass over the training rows. (Any such A whitens; L-BFGS
    is invariant to the remaining rotation, and a Cholesky factor is cheaper and sturdier than an
    eigendecomposition.)"""
    dim, device = features.shape[1], features.device
    shift = features[rows[:block_rows]].double().mean(0)
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    second = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for start in range(0, len(rows), block_rows):
        x = features[rows[start : start + block_rows]].float() - shift.float()
        total += x.sum(0).double()
        second += (x.T @ x).double()
    mean = total / len(rows)
    cov = second / len(rows) - mean[:, None] * mean[None, :]
    cov = 0.5 * (cov + cov.T)
    eye = torch.eye(dim, dtype=torch.float64, device=device)
    cov += (ridge * float(cov.diagonal().clamp(min=0).sum()) / dim + 1e-12) * eye
    lower = torch.linalg.cholesky(cov)
    return torch.linalg.solve_triangular(lower, eye, upper=False), mean + shift


def _two_loop(grad, history):
    """The L-BFGS direction -H grad from the (s, y, 1/y.s) history, oldest first."""
    q = -grad
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * float(s.dot(q))
        q.add_(y, alpha=-alpha)
        alphas.append(alpha)
    if history:
        s, y, _ = history[-1]
        q.mul_(float(s.dot(y)) / float(y.dot(y)))
    for (s, y, rho), alpha in zip(history, reversed(alphas)):
        beta = rho * float(y.dot(q))
        q.add_(s, alpha=alpha - beta)
    return q


def _line_search(fun, x, f, gtd, d, t, *, c1=1e-4, max_tries=30):
    """Step along the descent direction d (gtd = grad . d < 0); returns (t, f, g, gmax) or None.

    Accepts t when Armijo holds, or when the directional derivative at x + t d is still <= 0:
    F is convex, so that certifies a decrease even where float32 rounding hides it in F itself
    (near a tight tolerance). Otherwise t shrinks to the secant root of the derivative."""
    for _ in range(max_tries):
        f_new, g_new, gmax = fun(x + t * d)
        slope = float(g_new.dot(d))
        if not (math.isfinite(f_new) and math.isfinite(slope)):
            t *= 0.1
            continue
        if f_new <= f + c1 * t * gtd or slope <= 0:
            return t, f_new, g_new, gmax
        t *= min(max(gtd / (gtd - slope), 0.1), 0.9)
    return None


def _first_step(grad: torch.Tensor) -> float:
    """Step length along -grad when there is no curvature history yet: a unit-length step (in
    whitened coordinates; measured 1-2 evaluations fewer than torch's min(1, 1 / |g|_1))."""
    return 1.0 / max(float(grad.norm()), 1e-12)


def _lbfgs(
    fun, theta, *, max_iter: int, tol: float, ftol: float, history_size: int, value_scale: float = 1.0, on_iter=None
):
    """Minimise `fun` (theta -> (value, grad, stopping measure)) from `theta` until the measure is
    <= tol, or two iterations in a row lower the value by at most `ftol` relative (scipy's L-BFGS-B
    test, (f_k - f_k+1) / max(|f_k|, |f_k+1|, 1) <= ftol on the value times `value_scale`, which
    scipy applies to one iteration);
    returns (theta, value, measure, n_iter, stop) with stop "gtol", "ftol", "max_iter" or
    "line_search"."""
    value, grad, gmax = fun(theta)
    history: list = []
    n_iter = 0
    stop = "gtol" if gmax <= tol else "max_iter"
    flat = 0
    while gmax > tol and n_iter < max_iter:
        d = _two_loop(grad, history)
        gtd = float(grad.dot(d))
        if gtd >= 0:  # not a descent direction: restart
            history.clear()
            d, gtd = -grad, -float(grad.dot(grad))
        t = 1.0 if history else _first_step(grad)
        step = _line_search(fun, theta, value, gtd, d, t)
        if step is None:
            _logger.warning(
                "linear: line search failed at iteration %d (max |grad| %.3g > tol %.3g); stopping", n_iter, gmax, tol
            )
            stop = "line_search"
            break
        t, value_new, grad_new, gmax = step
        reduction = (value - value_new) * value_scale / max(abs(value) * value_scale, abs(value_new) * value_scale, 1.0)
        s, y = t * d, grad_new - grad
        ys = float(y.dot(s))
        if ys > 1e-10 * float(y.dot(y)) ** 0.5 * float(s.dot(s)) ** 0.5:
            history.append((s, y, 1.0 / ys))
            if len(history) > history_size:
                history.pop(0)
        theta, value, grad = theta + s, value_new, grad_new
        n_iter += 1
        if on_iter is not None:
            on_iter(n_iter, value, gmax)
        flat = flat + 1 if ftol > 0 and reduction <= ftol else 0
        if gmax <= tol:
            stop = "gtol"
        elif flat >= 2:  # twice in a row: one flat step can be float32 rounding in the value
            stop = "ftol"
            break
    return theta, value, gmax, n_iter, stop


def _balanced_targets(labels, rows, num_classes):
    """(present (C,) bool, targets (M,) int64 in 0..K-1, sample_weight (M,) float32) for the rows,
    class_weight='balanced' over the K classes that have rows: M / (K * n_k)."""
    y = labels[rows]
    counts = torch.bincount(y, minlength=num_classes)
    present = counts > 0
    class_index = torch.cumsum(present.long(), 0) - 1
    class_weight = len(rows) / (int(present.sum()) * counts[present].double())
    targets = class_index[y]
    return present, targets, class_weight[targets].float()


def _fit_rows(
    features, labels, rows, *, num_classes, c, max_iter, tol, ftol, whiten, history_size, block_rows
) -> LinearModel:
    """Fit on `rows` (M,) int64 (labelled) of features (N, D) float16 on the device; labels (N,) CPU."""
    device, dim = features.device, features.shape[1]
    present, targets, sample_weight = _balanced_targets(labels, rows, num_classes)
    k = int(present.sum())
    l2 = 1.0 / (c * float(sample_weight.double().sum()))
    whitening = None if not whiten else _whitening(features, rows.to(device), block_rows=block_rows, ridge=whiten)
    fun = _Objective(
        features,
        rows.to(device),
        targets.to(device),
        sample_weight.to(device),
        num_classes=k,
        l2=l2,
        block_rows=block_rows,
        whitening=whitening,
    )

    def on_iter(it, value, gmax):
        if it % 25 == 0:
            _logger.debug("linear: iteration %d, F %.10g, max|grad| %.3g", it, value, gmax)

    theta, value, gmax, n_iter, stop = _lbfgs(
        fun,
        torch.zeros(k * dim + k, dtype=torch.float64, device=device),
        max_iter=max_iter,
        tol=tol,
        ftol=ftol,
        history_size=history_size,
        value_scale=fun.sw_sum,
        on_iter=on_iter,
    )
    converged = stop in ("gtol", "ftol")
    weight, bias = fun.to_model(theta)
    full_w = torch.zeros(num_classes, dim, dtype=torch.float32)
    full_b = torch.full((num_classes,), ABSENT_BIAS, dtype=torch.float32)
    full_w[present] = weight.float().cpu()
    full_b[present] = bias.float().cpu()
    if not converged:
        _logger.warning("linear: not converged after %d iterations (max |grad| %.3g > tol %.3g)", n_iter, gmax, tol)
    return LinearModel(
        weight=full_w,
        bias=full_b,
        present=present,
        n_iter=n_iter,
        n_evals=fun.evals,
        converged=bool(converged),
        objective=value * c * fun.sw_sum,
        grad_max=gmax,
        stop=stop,
    )


def _check_fit_options(c, max_iter, tol, ftol, whiten, history_size, block_rows) -> None:
    if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
        raise EngineError(f"c: got {c!r}, expected a positive finite number")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise EngineError(f"max_iter: got {max_iter!r}, expected a positive integer")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise EngineError(f"tol: got {tol!r}, expected a positive number")
    if not (isinstance(ftol, (int, float)) and ftol >= 0):
        raise EngineError(f"ftol: got {ftol!r}, expected a number >= 0 (0: stop on tol only)")
    if isinstance(whiten, bool) or not isinstance(whiten, (int, float)) or not 0 <= whiten < math.inf:
        raise EngineError(f"whiten: got {whiten!r}, expected a ridge >= 0 (0 = no whitening)")
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
        raise EngineError(f"history_size: got {history_size!r}, expected a positive integer")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise EngineError(f"block_rows: got {block_rows!r}, expected a positive integer or None (auto)")


FTOL = 2.220446049250313e-09  # scipy's L-BFGS-B default (factr 1e7), as scikit-learn 1.2.2 ran it


def fit_linear(
    features,
    labels,
    *,
    num_classes: int | None = None,
    c: float = 1.0,
    max_iter: int = 10_000,
    tol: float = 1e-4,
    ftol: float = FTOL,
    whiten: float = 0.1,
    history_size: int = 10,
    device="auto",
    block_rows: int | None = None,
) -> LinearModel:
    """Fit scikit-learn's balanced multinomial logistic regression on the labelled rows.

    features (N, D) float16 (other float dtypes are cast: a float16 copy), unit rows;
    labels (N,) int, -1 = unlabelled (left out). `tol` bounds max |grad| of the summed objective
    in (W, b) and `ftol` its relative progress per iteration, as scikit-learn 1.2.2 ran scipy's
    L-BFGS-B (module docstring); `whiten` is the ridge of the whitening preconditioner
    (a fraction of the mean feature variance; 0 = none); `history_size` is L-BFGS's memory
    (scipy's default 10). Deterministic for a given device and block size.
    Memory: the float16 features on `device` (a copy unless already there), 3 * M int64/float32
    per-row arrays, blocks of block_rows x (D + C) float32 (reused), 2 * history_size + 6
    vectors of C x (D + 1) float64 and a D x D float64 whitening matrix."""
    _check_fit_options(c, max_iter, tol, ftol, whiten, history_size, block_rows)
    device = resolve(device)
    feats = as_features(features, device)
    labs, num_classes = as_labels(labels, len(feats), num_classes)
    rows = torch.nonzero(labs >= 0).squeeze(1)
    if len(rows) == 0:
        raise EngineError("labels: got no labelled row (all -1), expected at least one to fit on")
    block_rows = block_rows or linear_block_rows(feats.shape[1], num_classes, device)
    return _fit_rows(
        feats,
        labs,
        rows,
        num_classes=num_classes,
        c=c,
        max_iter=max_iter,
        tol=tol,
        ftol=ftol,
        whiten=whiten,
        history_size=history_size,
        block_rows=block_rows,
    )


def stratified_folds(labels, folds: int, *, seed: int = 0) -> np.ndarray:
    """(N,) int64 fold in 0..folds-1 of each row.

    Each class (and the unlabelled rows, as one more group) is dealt round-robin over the folds
    in a seeded random order, starting at a random fold, so class counts per fold differ by at
    most one and fold sizes stay balanced."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = len(labels)
    order = np.lexsort((rng.random(n), labels))
    ordered = labels[order]
    new_group = np.r_[True, ordered[1:] != ordered[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    offset = rng.integers(0, folds, size=len(starts))
    fold = np.empty(n, dtype=np.int64)
    fold[order] = (np.arange(n) - starts[group] + offset[group]) % folds
    return fold


def fit_linear_folds(
    features,
    labels,
    *,
    folds: int,
    num_classes: int | None = None,
    c: float = 1.0,
    max_iter: int = 10_000,
    tol: float = 1e-4,
    ftol: float = FTOL,
    whiten: float = 0.1,
    history_size: int = 10,
    device="auto",
    block_rows: int | None = None,
    seed: int = 0,
) -> tuple[list[LinearModel], np.ndarray]:
    """K = `folds` models, model k fitted on the labelled rows outside fold k (`stratified_folds`).

    Returns (models, fold (N,) int64); row i is scored by models[fold[i]], which never saw it.
    Other arguments and memory as `fit_linear` (one model at a time)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise EngineError(f"folds: got {folds!r}, expected an integer >= 2 (0 = in-sample, no folds)")
    _check_fit_options(c, max_iter, tol, ftol, whiten, history_size, block_rows)
    device = resolve(device)
    feats = as_features(features, device)
    labs, num_classes = as_labels(labels, len(feats), num_classes)
    labelled = labs >= 0
    if int(labelled.sum()) < folds:
        raise EngineError(
            f"folds: got {folds} folds but only {int(labelled.sum())} labelled rows, "
            f"expected at least one labelled row per fold"
        )
    fold = stratified_folds(labs.numpy(), folds, seed=seed)
    block_rows = block_rows or linear_block_rows(feats.shape[1], num_classes, device)
    fold_t = torch.from_numpy(fold)
    models = []
    for k in range(folds):
        rows = torch.nonzero(labelled & (fold_t != k)).squeeze(1)
        _logger.info("linear: fold %d/%d, %d training rows", k + 1, folds, len(rows))
        models.append(
            _fit_rows(
                feats,
                labs,
                rows,
                num_classes=num_classes,
                c=c,
                max_iter=max_iter,
                tol=tol,
                ftol=ftol,
                whiten=whiten,
                history_size=history_size,
                block_rows=block_rows,
            )
        )
    return models, fold


def linear_oof_log_probs(models: list[LinearModel], fold: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Out-of-fold log P (B, C) float32: row i of the block (B, D) scored by models[fold[i]]; fold (B,) int."""
    fold = fold.to(features.device)
    out = torch.empty(len(features), models[0].weight.shape[0], dtype=torch.float32, device=features.device)
    for k, model in enumerate(models):
        rows = torch.nonzero(fold == k).squeeze(1)
        if len(rows):
            out[rows] = linear_log_probs(model, features[rows])
    return out

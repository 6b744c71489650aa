"""engine.classifiers: zero-shot against a slow reference, the linear classifier against scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from engine.classifiers import (
    ABSENT_BIAS,
    fit_linear,
    fit_linear_folds,
    linear_log_probs,
    linear_oof_log_probs,
    stratified_folds,
    zeroshot_log_probs,
)
from engine.runtime import EngineError


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noisy_blobs(n=2000, c=10, d=32, *, rate=0.4, seed=0):
    """Unit float16 features around random class centres; labels with `rate` symmetric noise."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((c, d)))
    truth = rng.integers(0, c, n)
    feats = _unit(centres[truth] + 0.35 * rng.standard_normal((n, d))).astype(np.float16)
    labels = np.where(rng.random(n) < rate, rng.integers(0, c, n), truth)
    return feats, labels.astype(np.int64), truth


def _sk_objective(weight, bias, x, y, c=1.0):
    """scikit-learn's unscaled objective 0.5 ||W||^2 + c sum_i w_i CE_i, balanced weights, float64."""
    classes, counts = np.unique(y, return_counts=True)
    w = (len(y) / (len(classes) * counts))[np.searchsorted(classes, y)]
    z = x @ weight.T + bias
    z = z - z.max(1, keepdims=True)
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    return 0.5 * (weight**2).sum() + c * (w * ce).sum()


# ----------------------------------------------------------------------------- zero-shot


def test_zeroshot_matches_slow_reference_with_padded_prompts():
    rng = np.random.default_rng(1)
    feats = _unit(rng.standard_normal((37, 16))).astype(np.float16)
    text = _unit(rng.standard_normal((5, 4, 16))).astype(np.float32)
    mask = np.ones((5, 4), bool)
    mask[1, 2:] = False
    mask[3, 1:] = False
    text[~mask] = 99.0  # padding must be ignored whatever it holds
    out = zeroshot_log_probs(torch.from_numpy(feats), torch.from_numpy(text), torch.from_numpy(mask), tau=0.07)
    assert out.dtype == torch.float32 and out.shape == (37, 5)
    ref = np.zeros((37, 5))
    x = feats.astype(np.float64)
    for i in range(37):
        s = [sum(np.exp(x[i] @ text[k, p] / 0.07) for p in range(4) if mask[k, p]) for k in range(5)]
        ref[i] = np.log(np.array(s) / sum(s))
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5)


def test_zeroshot_rejects_mismatched_shapes():
    with pytest.raises(EngineError, match="same D"):
        zeroshot_log_probs(torch.zeros(2, 8), torch.zeros(3, 1, 9), torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(EngineError, match="text_mask"):
        zeroshot_log_probs(torch.zeros(2, 8), torch.zeros(3, 2, 8), torch.ones(3, 1, dtype=torch.bool))


# ----------------------------------------------------------------------------- linear vs scikit-learn


@pytest.fixture(scope="module")
def blobs():
    return _noisy_blobs()


@pytest.fixture(scope="module")
def sklearn_fits(blobs):
    """scikit-learn as the authors run it (tol 1e-4) and nearly exact (tol 1e-8), on the float16 values."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    feats, labels, _ = blobs
    x = feats.astype(np.float64)
    fits = {}
    for tol in (1e-4, 1e-8):
        fits[tol] = linear_model.LogisticRegression(class_weight="balanced", C=1.0, max_iter=10_000, tol=tol).fit(
            x, labels
        )
    return fits


def test_linear_probabilities_match_sklearn(blobs, sklearn_fits):
    """Tolerance: max |P - P_sklearn| <= 1e-4 with both solved tightly (measured ~3e-6)."""
    feats, labels, _ = blobs
    model = fit_linear(feats, labels, tol=2e-4, ftol=0, device="cpu")  # summed-gradient tol: 1e-7 x 2,000 rows
    assert model.converged and model.grad_max <= 2e-4
    probs = linear_log_probs(model, torch.from_numpy(feats)).exp().numpy()
    ref = sklearn_fits[1e-8].predict_proba(feats.astype(np.float64))
    assert np.abs(probs - ref).max() <= 1e-4


def test_linear_objective_not_worse_than_sklearn_at_same_tol(blobs, sklearn_fits):
    feats, labels, _ = blobs
    x = feats.astype(np.float64)
    sk = sklearn_fits[1e-4]
    model = fit_linear(feats, labels, device="cpu")  # tol 1e-4, as scikit-learn's default
    ours = _sk_objective(model.weight.double().numpy(), model.bias.double().numpy(), x, labels)
    theirs = _sk_objective(sk.coef_, sk.intercept_, x, labels)
    assert model.converged
    assert ours <= theirs * (1 + 1e-7)
    assert model.objective == pytest.approx(ours, rel=1e-6)  # reported in the same (unscaled) form


def test_linear_whitening_changes_iterations_not_solution(blobs):
    feats, labels, _ = blobs
    plain = fit_linear(feats, labels, tol=2e-4, ftol=0, whiten=0, device="cpu")
    white = fit_linear(feats, labels, tol=2e-4, ftol=0, device="cpu")
    x = torch.from_numpy(feats)
    diff = (linear_log_probs(plain, x).exp() - linear_log_probs(white, x).exp()).abs().max()
    assert float(diff) <= 1e-4
    assert white.n_iter < plain.n_iter


def test_linear_block_size_and_unlabelled_rows_do_not_change_the_fit(blobs):
    feats, labels, _ = blobs
    whole = fit_linear(feats[:600], labels[:600], tol=6e-4, ftol=0, device="cpu")
    padded_labels = np.r_[labels[:600], -np.ones(50, np.int64)]
    padded = np.r_[feats[:600], feats[600:650]]
    blocked = fit_linear(padded, padded_labels, tol=6e-4, ftol=0, block_rows=77, device="cpu")
    x = torch.from_numpy(feats[:600])
    diff = (linear_log_probs(whole, x).exp() - linear_log_probs(blocked, x).exp()).abs().max()
    assert float(diff) <= 1e-4


def test_linear_class_without_rows_gets_probability_zero_and_finite_logs():
    feats, labels, _ = _noisy_blobs(n=600, c=4, d=8, seed=3)
    model = fit_linear(feats, labels, num_classes=6, device="cpu")  # classes 4 and 5 have no row
    assert model.present.tolist() == [True] * 4 + [False] * 2
    assert model.bias[4] == ABSENT_BIAS and float(model.weight[4:].abs().sum()) == 0
    logp = linear_log_probs(model, torch.from_numpy(feats))
    assert torch.isfinite(logp).all()
    assert float(logp[:, 4:].exp().max()) == 0.0
    four = fit_linear(feats, labels, num_classes=4, device="cpu")
    assert torch.allclose(logp[:, :4], linear_log_probs(four, torch.from_numpy(feats)), atol=1e-5)


def test_linear_bad_input():
    feats, labels, _ = _noisy_blobs(n=50, c=3, d=4)
    with pytest.raises(EngineError, match="c: got -1"):
        fit_linear(feats, labels, c=-1, device="cpu")
    with pytest.raises(EngineError, match=r"labels: got values in \[0, 2\], expected \[-1, 1\]"):
        fit_linear(feats, labels, num_classes=2, device="cpu")
    with pytest.raises(EngineError, match="none|no labelled"):
        fit_linear(feats, -np.ones(50, np.int64), device="cpu")
    with pytest.raises(EngineError, match="features: got shape"):
        fit_linear(feats[:, 0], labels, device="cpu")
    with pytest.raises(EngineError, match=r"labels: got shape \(49,\)"):
        fit_linear(feats, labels[:49], device="cpu")


# ----------------------------------------------------------------------------- out-of-fold


def test_stratified_folds_balance_every_class():
    rng = np.random.default_rng(0)
    labels = np.r_[rng.integers(0, 7, 500), -np.ones(20, np.int64)]
    fold = stratified_folds(labels, 4, seed=3)
    assert fold.min() == 0 and fold.max() == 3
    for k in np.unique(labels):
        per_fold = np.bincount(fold[labels == k], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.bincount(fold).max() - np.bincount(fold).min() <= 4
    assert (stratified_folds(labels, 4, seed=3) == fold).all()


def test_out_of_fold_rows_scored_by_the_model_that_did_not_see_them():
    feats, labels, _ = _noisy_blobs(n=900, c=5, d=12, seed=5)
    models, fold = fit_linear_folds(feats, labels, folds=3, tol=1e-6, device="cpu", seed=1)
    assert len(models) == 3 and fold.shape == (900,)
    x = torch.from_numpy(feats)
    oof = linear_oof_log_probs(models, torch.from_numpy(fold), x)
    for k in range(3):
        rows = fold == k
        alone = fit_linear(feats[~rows], labels[~rows], num_classes=5, tol=1e-6, device="cpu")
        ref = linear_log_probs(alone, x[rows])
        assert torch.allclose(oof[rows].exp(), ref.exp(), atol=1e-4)
    with pytest.raises(EngineError, match="folds: got 1"):
        fit_linear_folds(feats, labels, folds=1, device="cpu")


@pytest.mark.gpu_test
def test_linear_on_gpu_matches_cpu():
    feats, labels, _ = _noisy_blobs(n=3000, c=20, d=64, seed=2)
    cpu = fit_linear(feats, labels, tol=1e-6, device="cpu")
    gpu = fit_linear(feats, labels, tol=1e-6, device="cuda")
    x = torch.from_numpy(feats)
    assert float((linear_log_probs(cpu, x).exp() - linear_log_probs(gpu, x).exp()).abs().max()) <= 1e-3


# ----------------------------------------------------------------------------- many classes


def _clip_like(n, c, d, seed=0):
    from benchmarks.features import clip_features

    feats, labels, truth, _, _ = clip_features(n, c, d, noise="sym", rate=0.4, seed=seed)
    return feats, labels.astype(np.int64), truth


@pytest.mark.parametrize("n,c,d", [(2000, 10, 32), (5000, 100, 32), (8000, 1000, 32)])
def test_linear_reaches_sklearns_tight_optimum_at_10_100_1000_classes(n, c, d):
    """Default stopping rule (scikit-learn 1.2.2's, on the summed objective) against scikit-learn run
    to a tight tolerance on the same objective. Bounds: objective within 1e-7 relative and
    max |P - P_sklearn| <= 1e-3 (measured 2e-12 to 2e-10 and 3e-6 to 1e-5)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    feats, labels, _ = _clip_like(n, c, d)
    x = feats.astype(np.float64)
    model = fit_linear(feats, labels, num_classes=c, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = linear_model.LogisticRegression(class_weight="balanced", max_iter=10_000, tol=1e-10).fit(x, labels)
    ours = _sk_objective(model.weight.double().numpy(), model.bias.double().numpy(), x, labels)
    theirs = _sk_objective(sk.coef_, sk.intercept_, x, labels)
    assert model.converged and model.stop in ("gtol", "ftol")
    assert ours <= theirs * (1 + 1e-7)
    probs = linear_log_probs(model, torch.from_numpy(feats)).exp().numpy()
    assert np.abs(probs - sk.predict_proba(x)).max() <= 1e-3


def test_linear_does_not_stop_at_its_start_with_1000_classes():
    """At 1,000 classes and D = 512 the *mean* objective's gradient at zero is already below 1e-4
    (scikit-learn >= 1.4 stops there: 0 iterations, chance accuracy); the summed rule must not."""
    feats, labels, truth = _clip_like(20_000, 1000, 512, seed=1)
    x = feats.astype(np.float64)
    classes, counts = np.unique(labels, return_counts=True)
    w = (len(labels) / (len(classes) * counts))[np.searchsorted(classes, labels)]
    resid = np.full((len(labels), 1000), 1 / 1000) * w[:, None]
    resid[np.arange(len(labels)), labels] -= w
    start_grad = np.abs(resid.T @ x).max() / w.sum()  # max |grad F| at W = 0, b = 0 (bias grad is 0)
    assert start_grad < 1e-4
    model = fit_linear(feats, labels, num_classes=1000, max_iter=12, device="cpu")  # capped to keep the test short
    assert model.n_iter == 12 and model.stop == "max_iter"
    pred = linear_log_probs(model, torch.from_numpy(feats)).argmax(1).numpy()
    assert (pred == truth).mean() > 0.5  # chance is 0.001


def test_ftol_stop_needs_two_flat_iterations_and_gtol_is_on_the_summed_scale(blobs):
    feats, labels, _ = blobs
    model = fit_linear(feats, labels, ftol=0.0, tol=1e-3, device="cpu")  # gtol only
    assert model.stop == "gtol" and model.grad_max <= 1e-3
    capped = fit_linear(feats, labels, max_iter=2, device="cpu")
    assert capped.stop == "max_iter" and not capped.converged and capped.n_iter == 2

"""engine.select: scores, batched mixtures against scikit-learn, every selection rule of docs/method.md by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from engine.runtime import EngineError
from engine.select import (
    ClassGroups,
    SelectConfig,
    classifier_accuracy,
    fill_empty_classes,
    fit_mixtures,
    noise_scores,
    normalise_loss,
    score_block,
    select_samples,
    selection_metrics,
    two_means_init,
)


def _fixed(log_probs: np.ndarray):
    """An extra classifier serving the rows of a fixed (N, C) log-probability matrix."""
    table = torch.from_numpy(np.asarray(log_probs, np.float32))
    return lambda start, stop: table[start:stop]


def _log(p):
    p = np.asarray(p, np.float64)
    return np.log(p / p.sum(1, keepdims=True))


def _realistic_scores(seed=0, groups=40):
    """Normalised-loss-like values per class: bimodal, skewed unimodal, a few outliers, tiny classes."""
    rng = np.random.default_rng(seed)
    values, group = [], []
    for k in range(groups):
        kind, n = k % 4, [300, 400, 60, 8][k % 4] + int(rng.integers(0, 40))
        if kind == 0:
            v = np.r_[rng.beta(8, 2, int(0.6 * n)), rng.beta(2, 6, n - int(0.6 * n))]
        elif kind == 1:
            v = rng.beta(5, 2, n)
        elif kind == 2:
            v = np.r_[rng.normal(0.8, 0.08, n - 6), rng.normal(0.15, 0.05, 6)]
        else:
            v = rng.random(n)
        values.append((v - v.min()) / (v.max() - v.min()))
        group.append(np.full(n, k))
    values, group = np.concatenate(values), np.concatenate(group)
    perm = rng.permutation(len(values))
    return values[perm], group[perm]


# ----------------------------------------------------------------------------- scores


def test_score_block_by_hand():
    logp = torch.from_numpy(_log([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])).float()
    out = score_block(logp, torch.tensor([1, 2, -1]))
    np.testing.assert_allclose(out["consistency"].numpy(), [0.8, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["log_p"].numpy(), [np.log(0.4), np.log(0.6), 0.0], rtol=1e-6)
    assert out["prediction"].tolist() == [0, 2, 2]
    np.testing.assert_allclose(out["confidence"].numpy(), [0.5, 0.6, 0.4], rtol=1e-6)


def test_normalise_loss_per_class_with_degenerate_classes_and_minus_inf():
    labels = np.array([0, 0, 0, 1, 2, 2, -1, 3, 3, 3])
    log_p = np.array([-3.0, -1.0, -2.0, -0.5, -0.7, -0.7, -9.0, -np.inf, -2.0, -1.0], np.float32)
    groups = ClassGroups.build(labels, 5)
    scores, degenerate = normalise_loss(log_p, groups)
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    assert degenerate.tolist() == [False, True, True, False, True]  # class 4 has no rows
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    with pytest.raises(EngineError, match="NaN"):
        normalise_loss(np.where(labels == 0, np.nan, 0.0), groups)


def test_noise_score_is_zero_exactly_when_every_pair_passes():
    scores = {"a/consistency": np.array([0.9, 0.4, 0.8, 0.0]), "a/loss": np.array([0.6, 0.9, 0.25, 0.0])}
    noise = noise_scores(scores, {"a/consistency": 0.8, "a/loss": 0.5}, np.array([True, True, True, False]))
    np.testing.assert_allclose(noise, [0.0, 0.5, 0.5, 1.0])


# ----------------------------------------------------------------------------- mixtures


def test_two_means_init_is_the_exact_optimum():
    values, group = _realistic_scores(seed=1, groups=12)
    order = np.lexsort((values, group))
    x, g = values[order], group[order]
    split = two_means_init(x, g, 12)
    for k in range(12):
        xs, got = x[g == k], split[g == k]
        sse = [((xs[:j] - xs[:j].mean()) ** 2).sum() + ((xs[j:] - xs[j:].mean()) ** 2).sum() for j in range(1, len(xs))]
        ours = sum(((xs[got == c] - xs[got == c].mean()) ** 2).sum() for c in (0, 1))
        assert ours == pytest.approx(min(sse), rel=1e-9, abs=1e-12)
        assert (np.diff(got) >= 0).all()  # a contiguous split: the lower cluster first


def _sklearn_mixture_from_our_init(x: np.ndarray):
    """scikit-learn's two-component GaussianMixture on sorted scores `x`, started where ours starts
    (the optimal contiguous two-means split; its weights, means and variances + reg_covar)."""
    mixture = pytest.importorskip("sklearn.mixture")
    init = two_means_init(x, np.zeros(len(x), np.int64), 1)
    nk = np.array([(init == c).sum() for c in (0, 1)]) + 10 * np.finfo(float).eps
    means = np.array([x[init == c].mean() for c in (0, 1)])
    var = np.array([((x[init == c] - means[c]) ** 2).sum() for c in (0, 1)]) / nk + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mixture.GaussianMixture(
            2, weights_init=nk / len(x), means_init=means[:, None], precisions_init=(1 / var)[:, None, None]
        ).fit(x[:, None])


def test_mixtures_follow_sklearn_em_exactly_from_the_same_start():
    """Same start -> same iterations, same per-group stopping, same posteriors (float64 noise)."""
    values, group = _realistic_scores(seed=2, groups=16)
    fit = fit_mixtures(values, group, num_groups=16)
    for k in range(16):
        sk = _sklearn_mixture_from_our_init(np.sort(values[group == k]))
        raw = values[group == k]
        post = sk.predict_proba(raw[:, None])[:, np.argmax(sk.means_[:, 0])]
        assert sk.n_iter_ == fit.n_iter[k]
        np.testing.assert_allclose(fit.posterior[group == k], post, atol=1e-9)


def test_mixtures_agree_with_sklearn_default_fits():
    """Selected sets (posterior >= 0.5) against one GaussianMixture(2) per class: >= 99% agreement."""
    mixture = pytest.importorskip("sklearn.mixture")
    values, group = _realistic_scores(seed=3, groups=40)
    fit = fit_mixtures(values, group, num_groups=40)
    agree = 0
    for k in range(40):
        x = values[group == k][:, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = mixture.GaussianMixture(n_components=2, random_state=0).fit(x)
        post = sk.predict_proba(x)[:, np.argmax(sk.means_[:, 0])]
        agree += ((post >= 0.5) == (fit.posterior[group == k] >= 0.5)).sum()
    assert agree / len(values) >= 0.99
    assert fit.converged.all()


# ----------------------------------------------------------------------------- fill-in


def test_fill_in_takes_the_highest_scores_and_the_right_m():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, -1, 2])
    selected = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)  # class 2 empty; counts 2, 3
    ranking = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0.2, 0.9, 5.0, 0.9])
    groups = ClassGroups.build(labels, 3)
    rows, m = fill_empty_classes(selected, labels, ranking, groups, num_classes=3)
    assert m == 2  # max(min non-zero 2, 11 // 9 = 1)
    assert rows.tolist() == [9, 11]  # the two 0.9s (tie: lower row first)
    rows, m = fill_empty_classes(selected | (labels == 2), labels, ranking, groups, num_classes=3)
    assert len(rows) == 0 and m == 0


def test_fill_in_m_from_rows_over_classes_squared_and_small_classes():
    labels = np.r_[np.zeros(30, np.int64), np.ones(6, np.int64), 2 * np.ones(3, np.int64)]
    selected = labels == 0  # classes 1 and 2 empty
    ranking = np.arange(len(labels), dtype=float)
    rows, m = fill_empty_classes(selected, labels, ranking, ClassGroups.build(labels, 3), num_classes=3)
    assert m == 30  # max(30, 39 // 9 = 4)
    assert sorted(rows.tolist()) == list(range(30, 39))  # all of each smaller class


# ----------------------------------------------------------------------------- the whole selection


@pytest.fixture()
def hand_made():
    """12 rows, 3 classes, 2 classifiers given as fixed log-probabilities; row 11 unlabelled."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1])
    a = _log(
        [
            [0.9, 0.05, 0.05],
            [0.85, 0.1, 0.05],
            [0.8, 0.1, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.85, 0.05],
            [0.05, 0.9, 0.05],
            [0.1, 0.8, 0.1],
            [0.45, 0.5, 0.05],
            [0.6, 0.3, 0.1],
            [0.5, 0.1, 0.4],
            [0.7, 0.2, 0.1],
            [0.3, 0.3, 0.4],
        ]
    )
    b = _log(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.85, 0.1, 0.05],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.05, 0.9, 0.05],
            [0.3, 0.6, 0.1],
            [0.1, 0.85, 0.05],
            [0.5, 0.2, 0.3],
            [0.7, 0.1, 0.2],
            [0.6, 0.1, 0.3],
            [0.3, 0.3, 0.4],
        ]
    )
    features = np.zeros((12, 4), np.float16)
    features[:, 0] = 1
    config = SelectConfig(classifiers=("zeroshot", "linear"), criteria=("consistency",))
    return features, labels, {"zeroshot": _fixed(a), "linear": _fixed(b)}, config


def test_selection_is_the_intersection_and_unlabelled_rows_are_counted(hand_made):
    features, labels, extra, config = hand_made
    res = select_samples(features, labels, config=config, extra_classifiers=extra)
    za, kb = res.masks["zeroshot/consistency"], res.masks["linear/consistency"]
    assert za.tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert kb.tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert res.unlabelled == 1 and not res.selected[11]
    intersection = za & kb
    assert (res.selected[~res.filled] == intersection[~res.filled]).all()
    assert res.noise_score[11] == 1.0 and (res.noise_score[intersection] == 0).all()
    assert (res.noise_score[~intersection] > 0).all()
    assert res.counts["intersection"] == 7 and res.counts["final"] == res.selected.sum()
    for arrays in (res.scores, res.loss_scores, res.confidences):
        assert all(np.isfinite(v).all() for v in arrays.values())


def test_empty_class_is_filled_by_highest_zeroshot_loss_score(hand_made):
    features, labels, extra, config = hand_made
    res = select_samples(features, labels, config=config, extra_classifiers=extra)
    # class 2 fails consistency everywhere; m = max(min(3 selected in class 0, 4 in class 1), 11 // 9) = 3
    assert res.filled.tolist() == [0] * 8 + [1, 1, 1, 0]
    assert res.per_class == {
        **res.per_class,
        "empty_before_fill": 1,
        "filled_classes": 1,
        "fill_m": 3,
        "min": 3,
        "max": 4,
    }
    off = select_samples(
        features, labels, config=SelectConfig(**{**config.to_dict(), "fill_empty": False}), extra_classifiers=extra
    )
    assert not off.selected[8:11].any()


def test_fill_in_ranks_by_zeroshot_even_when_listed_second():
    labels = np.array([0, 0, 1, 1, 1, 1])  # knn empties class 1; m = max(2, 6 // 4) = 2
    knn = _log([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.65, 0.35], [0.9, 0.1]])  # knn ranks rows 2, 4
    zeroshot = _log([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])  # zero-shot: 5, 3
    feats = np.ones((6, 2), np.float16)
    config = SelectConfig(classifiers=("linear", "zeroshot"), criteria=("consistency",))
    both = select_samples(
        feats, labels, config=config, extra_classifiers={"linear": _fixed(knn), "zeroshot": _fixed(zeroshot)}
    )
    assert np.flatnonzero(both.filled).tolist() == [3, 5]
    assert both.per_class["fill_ranked_by"] == "zeroshot/loss_score" and both.per_class["fill_m"] == 2
    alone = select_samples(
        feats,
        labels,
        config=SelectConfig(classifiers=("linear",), criteria=("consistency",)),
        extra_classifiers={"linear": _fixed(knn)},
    )
    assert np.flatnonzero(alone.filled).tolist() == [2, 4]
    assert alone.per_class["fill_ranked_by"] == "linear/loss_score"


def test_degenerate_classes_pass_the_loss_criterion():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 2, 2])
    logp = _log(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.2, 0.7, 0.1],
            [0.85, 0.1, 0.05],
            [0.1, 0.8, 0.1],
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.2, 0.2, 0.6],
            [0.2, 0.2, 0.6],
        ]
    )
    config = SelectConfig(classifiers=("zeroshot",))
    res = select_samples(
        np.ones((9, 2), np.float16), labels, config=config, extra_classifiers={"zeroshot": _fixed(logp)}
    )
    assert res.classifier_info["zeroshot"]["degenerate_classes"] == 2  # one row; all equal
    assert res.masks["zeroshot/loss"][6:].all()
    assert res.masks["zeroshot/consistency"][6:].tolist() == [False, True, True]
    assert res.selected[7:].all() and np.isfinite(res.noise_score).all()


def test_end_to_end_with_builtin_classifiers_streams_and_exports(tmp_path):
    from benchmarks.common import clip_like_features

    feats, labels, truth, text, _ = clip_like_features(1500, 8, 24, noise="mix", rate=0.4, spread=0.9, seed=4)
    labels = labels.astype(np.int64)
    labels[:10] = -1
    config = SelectConfig(device="cpu")
    res = select_samples(feats, labels, text_features=text, true_labels=truth, config=config, probs_dir=tmp_path)
    small = select_samples(
        feats,
        labels,
        text_features=text[:, 0],
        true_labels=truth,
        probs_dir=None,
        config=SelectConfig(device="cpu", block_rows=97),
    )
    assert (small.selected == res.selected).all()
    assert res.unlabelled == 10 and not res.selected[:10].any()
    assert res.metrics["precision"] > 0.9 and 0 < res.metrics["recall"] <= 1
    assert set(res.timings) >= {"prepare", "linear_fit", "score:zeroshot", "score:linear", "gmm", "select"}
    probs = np.load(tmp_path / "probs_linear.npy")
    assert probs.shape == (1500, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == res.predictions["linear"]).all()
    assert res.summary()["config"]["classifiers"] == ["zeroshot", "linear"]


def test_out_of_fold_linear_in_the_pipeline():
    from benchmarks.common import clip_like_features

    feats, labels, truth, text, _ = clip_like_features(900, 6, 16, noise="sym", rate=0.3, seed=6)
    res = select_samples(
        feats, labels, text_features=text, true_labels=truth, config=SelectConfig(device="cpu", linear_folds=3)
    )
    assert len(res.classifier_info["linear"]["fit"]) == 3 and len(res.linear_models) == 3
    assert res.metrics["precision"] > 0.9


def test_selection_metrics_and_accuracy_by_hand():
    selected = np.array([1, 1, 1, 0, 0, 0], bool)
    labels = np.array([0, 1, 2, 0, 1, -1])
    truth = np.array([0, 1, 0, 0, 2, 1])
    m = selection_metrics(selected, labels, truth)
    assert (m["precision"], m["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert m["f1"] == pytest.approx(2 / 3) and m["evaluated"] == 5
    assert selection_metrics(np.zeros(6, bool), labels, truth)["f1"] == 0.0
    assert classifier_accuracy(np.array([0, 1, 1, 0, 2, 1]), np.array([0, 1, 0, -1, 2, 1])) == pytest.approx(0.8)


# ----------------------------------------------------------------------------- bad input


def test_config_validation_lists_choices():
    with pytest.raises(EngineError, match="expected some of consistency, loss"):
        SelectConfig(criteria=("consistency", "margin"))
    with pytest.raises(EngineError, match="zeroshot, linear, knn"):
        SelectConfig(classifiers="zeroshot,clip")
    with pytest.raises(EngineError, match=r"theta_cons: got 1.5, expected a number >= 0.0 and <= 1.0"):
        SelectConfig(theta_cons=1.5)
    with pytest.raises(EngineError, match="theta_gmm"):
        SelectConfig(theta_gmm=-0.1)
    with pytest.raises(EngineError, match="linear_folds"):
        SelectConfig(linear_folds=1)
    with pytest.raises(EngineError, match="repeats"):
        SelectConfig(criteria=("loss", "loss"))
    cfg = SelectConfig(classifiers="zeroshot, linear, knn", theta_cons=1.0)
    assert cfg.classifiers == ("zeroshot", "linear", "knn")
    assert SelectConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_input_is_refused_at_the_boundary():
    feats = np.eye(4, dtype=np.float16)[[0, 1, 2, 3, 0, 1]]
    labels = np.array([0, 1, 2, 3, 0, 1])
    text = np.eye(4, dtype=np.float32)
    with pytest.raises(EngineError, match="engine prompts"):
        select_samples(feats, labels)
    with pytest.raises(EngineError, match=r"labels: got values up to 3, but text_features has 3 classes"):
        select_samples(feats, labels, text_features=text[:3, :])
    with pytest.raises(EngineError, match="num_classes: got 5, but text_features has 4"):
        select_samples(feats, labels, text_features=text, num_classes=5)
    with pytest.raises(EngineError, match="features: got shape"):
        select_samples(np.zeros((0, 4), np.float16), np.zeros(0, np.int64), text_features=text)
    with pytest.raises(EngineError, match=r"labels: got values in \[-2, 1\]"):
        select_samples(feats, np.array([0, 1, -2, 1, 0, 1]), text_features=text)
    with pytest.raises(EngineError, match="text_features: got shape"):
        select_samples(feats, labels, text_features=np.eye(4, 5, dtype=np.float32))
    with pytest.raises(EngineError, match="knn needs neighbors"):
        select_samples(feats, labels, text_features=text, config=SelectConfig(classifiers=("zeroshot", "knn")))
    with pytest.raises(EngineError, match="not in config.classifiers"):
        select_samples(feats, labels, text_features=text, extra_classifiers={"knn": _fixed(np.zeros((6, 4)))})
    bad = SelectConfig(classifiers=("knn",))
    with pytest.raises(EngineError, match=r"classifier knn: rows 0:6 gave shape \(6, 3\)"):
        select_samples(
            feats, labels, text_features=text, config=bad, extra_classifiers={"knn": _fixed(np.zeros((6, 3)))}
        )
    with pytest.raises(EngineError, match="NaN"):
        select_samples(
            feats, labels, text_features=text, config=bad, extra_classifiers={"knn": _fixed(np.full((6, 4), np.nan))}
        )


def test_knn_classifier_from_neighbor_lists_and_as_an_extra_classifier():
    from benchmarks.common import clip_like_features
    from engine.classifiers import knn_classifier

    feats, labels, truth, text, _ = clip_like_features(600, 5, 16, noise="sym", rate=0.3, seed=8)
    x = feats.astype(np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1)[:, :10]
    neighbors = (np.take_along_axis(sims, ids, 1), ids)
    config = SelectConfig(classifiers=("zeroshot", "linear", "knn"), device="cpu")
    res = select_samples(feats, labels, text_features=text, true_labels=truth, config=config, neighbors=neighbors)
    assert (
        len(res.masks) == 5
        and "knn/vote" in res.masks
        and res.classifier_info["knn"]
        == {
            **res.classifier_info["knn"],
            "source": "built-in",
            "k": 10,
        }
    )
    assert res.metrics["precision"] > 0.9
    extra = select_samples(
        feats,
        labels,
        text_features=text,
        true_labels=truth,
        config=config,
        extra_classifiers={"knn": knn_classifier(*neighbors, labels, 5)},
    )
    assert extra.classifier_info["knn"]["source"] == "extra_classifiers"
    np.testing.assert_array_equal(extra.selected, res.selected)


@pytest.mark.gpu_test
def test_selection_on_gpu_matches_cpu():
    from benchmarks.common import clip_like_features

    feats, labels, truth, text, _ = clip_like_features(20_000, 50, 64, noise="mix", rate=0.4, spread=0.9, seed=9)
    cpu = select_samples(feats, labels, text_features=text, config=SelectConfig(device="cpu"))
    gpu = select_samples(feats, labels, text_features=text, config=SelectConfig(device="cuda"))
    assert (cpu.selected == gpu.selected).mean() >= 0.995


# ----------------------------------------------------------------------------- many small classes


def _small_class_scores(seed=0, groups=200):
    """Normalised-loss-like values of classes with 20-60 rows, as at 1,000 classes: bimodal
    (clean and noisy), skewed unimodal, or uniform."""
    rng = np.random.default_rng(seed)
    values, group = [], []
    for k in range(groups):
        n = int(rng.integers(20, 61))
        noisy = int(rng.binomial(n, 0.4))
        v = [np.r_[rng.beta(8, 2, n - noisy), rng.beta(2, 6, noisy)], rng.beta(5, 2, n), rng.random(n)][k % 3]
        values.append((v - v.min()) / (v.max() - v.min()))
        group.append(np.full(n, k))
    return np.concatenate(values), np.concatenate(group)


def test_small_class_mixtures_follow_sklearn_from_the_same_start_and_agree_with_default_fits():
    """20-60 rows a class: per class the same EM as GaussianMixture from the same start (posteriors
    to 1e-9), and >= 97% of selections equal to default GaussianMixture(2) fits (k-means++ starts
    may land in another local optimum on so few values; measured 99.6%)."""
    mixture = pytest.importorskip("sklearn.mixture")
    values, group = _small_class_scores()
    fit = fit_mixtures(values, group, num_groups=200)
    agree = 0
    for k in range(200):
        raw = values[group == k]
        same = _sklearn_mixture_from_our_init(np.sort(raw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = mixture.GaussianMixture(n_components=2, random_state=0).fit(raw[:, None])
        post = same.predict_proba(raw[:, None])[:, np.argmax(same.means_[:, 0])]
        np.testing.assert_allclose(fit.posterior[group == k], post, atol=1e-9)
        post_default = default.predict_proba(raw[:, None])[:, np.argmax(default.means_[:, 0])]
        agree += ((post_default >= 0.5) == (fit.posterior[group == k] >= 0.5)).sum()
    assert agree / len(values) >= 0.97
    assert np.isfinite(fit.posterior).all()


# ----------------------------------------------------------------------------- how classifiers did


def test_label_agreement_and_kappa_by_hand():
    from engine.select import label_agreement

    labels = np.array([0, 0, 1, 1, -1])
    got = label_agreement(np.array([0, 1, 1, 1, 0]), labels, 2)
    # agreement 3/4; chance: labels (1/2, 1/2), predictions (1/4, 3/4) -> 1/2
    assert got == {"agreement": 0.75, "chance": 0.5, "kappa": 0.5}
    assert label_agreement(np.zeros(5, int), labels, 2)["kappa"] == 0.0


def test_summary_warns_about_a_capped_fit_and_chance_agreement():
    from benchmarks.features import clip_features

    feats, labels, _, text, _ = clip_features(1500, 10, 32, noise="sym", rate=0.3, seed=2)
    ok = select_samples(feats, labels, text_features=text, config=SelectConfig(device="cpu"))
    assert ok.warnings == []
    assert ok.classifier_info["linear"]["fit"][0]["converged"]
    assert ok.classifier_info["zeroshot"]["labels"]["kappa"] > 0.1
    shuffled = np.random.default_rng(0).permutation(10)  # prompts of other classes than the labels
    bad = select_samples(
        feats, labels, text_features=text[shuffled], config=SelectConfig(device="cpu", linear_max_iter=3)
    )
    assert any(w.startswith("linear: hit its iteration cap (3)") for w in bad.warnings)
    assert any(w.startswith("zeroshot: agrees with the given labels") for w in bad.warnings)
    assert bad.summary()["warnings"] == bad.warnings

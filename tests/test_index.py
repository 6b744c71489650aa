"""engine.index against slow, obvious references on small seeded data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from benchmarks.common import clip_like_features
from engine.classifiers import knn_classifier, knn_log_probs
from engine.index import (
    FLAT_MAX_ROWS,
    IndexConfig,
    _drop_self,
    build_index,
    choose_index,
    class_agreement,
    exact_search,
    image_class_similarity,
    index_is_stale,
    knn_all,
    knn_diagnostics,
    knn_graph,
    label_confusion,
    load_index,
    neighbor_agreement,
    neighbor_majority,
    query_neighbors,
    recall_at_k,
    save_index,
    save_knn_graph,
    search_index,
    text_class_similarity,
    top_confusable_pairs,
    top_label_swaps,
)
from engine.runtime import EngineError


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, dim, centres, spread, seed):
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    y = rng.integers(0, centres, n)
    return unit(c[y] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)), y


@pytest.fixture(scope="module")
def dup_features():
    """400 x 16 unit rows where rows 0..39 are copied to 40..79 and row 80 appears 4 times."""
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((400, 16)))
    x[40:80] = x[0:40]
    x[81:84] = x[80]
    return x


def brute_knn_values(x, k, exclude_self=True):
    s = x.astype(np.float64) @ x.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return -np.sort(-s, axis=1)[:, :k]


# ---------------------------------------------------------------------------------------------
# search


def test_exact_matches_brute_force_with_ties(dup_features):
    x = dup_features
    index = build_index(x, IndexConfig(kind="flat"), device="cpu")
    assert index.info.kind == "flat"
    sims, ids = knn_all(index, x, k=6, block_rows=97)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and sims.shape == ids.shape == (400, 6)
    np.testing.assert_allclose(sims, brute_knn_values(x, 6), atol=1e-5)
    rows = np.arange(400)[:, None]
    assert not (ids == rows).any()
    # ids are valid ties: the returned similarity is the true one of that pair
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[ids]), atol=1e-5)
    assert all(len(set(r)) == 6 for r in ids.tolist())
    # a duplicated row finds its copy first, at similarity 1
    assert (ids[:40, 0] == np.arange(40, 80)).all() and (ids[40:80, 0] == np.arange(40)).all()
    assert set(ids[80, :3].tolist()) == {81, 82, 83}


def test_exclude_self_with_duplicates(dup_features):
    x = dup_features
    index = build_index(x, IndexConfig(kind="flat"), device="cpu")
    sims, ids = knn_all(index, x, k=2)
    for row in (80, 81, 82, 83):  # four copies: both neighbors are other copies
        assert row not in ids[row] and set(ids[row]) <= {80, 81, 82, 83}
        np.testing.assert_allclose(sims[row], 1.0, atol=1e-5)
    s_in, i_in = knn_all(index, x, k=3, exclude_self=False)
    np.testing.assert_allclose(s_in, brute_knn_values(x, 3, exclude_self=False), atol=1e-5)
    s1, i1 = query_neighbors(index, x, 80, k=2)
    assert 80 not in i1 and set(i1) <= {81, 82, 83}


def test_drop_self_by_id_and_when_absent():
    sims = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 1.0]], np.float32)
    ids = np.array([[7, 3, 9], [5, 6, 8]])
    s, i = _drop_self(sims, ids, np.array([3, 4]))  # row 3 second; row 4 absent -> drop last
    assert i.tolist() == [[7, 9], [5, 6]] and s.shape == (2, 2)


def test_exact_search_blocks_and_recall():
    x, _ = clustered(1500, 24, 10, 0.8, seed=1)
    q = x[:50]
    s, i = exact_search(x, q, k=5, block_rows=128)
    ref = -np.sort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_allclose(s, ref, atol=1e-5)
    assert recall_at_k(i, i) == 1.0
    assert recall_at_k(np.full_like(i, -1), i) == 0.0


def test_ivf_recall_floor():
    """IVF with calibrated nprobe on 20,000 x 64 clustered rows: recall@10 >= 0.88 over all rows."""
    x, _ = clustered(20_000, 64, 40, 1.2, seed=2)
    x16 = x.astype(np.float16)
    index = build_index(x16, IndexConfig(kind="ivf", seed=3), device="cpu")
    p = index.info.params
    assert index.info.kind == "ivf" and p["nlist"] == 256 and p["factory"] == "IVF256,SQfp16"
    assert p["recall_at_10"] >= 0.9 and p["nprobe"] >= 1
    sims, ids = knn_all(index, x16, k=10)
    _, exact = knn_all(build_index(x16, IndexConfig(kind="flat"), device="cpu"), x16, k=10)
    recall = recall_at_k(ids, exact)
    assert recall >= 0.88, recall
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_hnsw_builds_and_calibrates():
    x, _ = clustered(3000, 32, 20, 1.0, seed=4)
    index = build_index(x, IndexConfig(kind="hnsw", hnsw_m=16, storage="fp32"), device="cpu")
    assert index.info.kind == "hnsw" and index.info.params["recall_at_10"] >= 0.9
    sims, ids = knn_all(index, x, k=5)
    assert not (ids == np.arange(3000)[:, None]).any()


def test_save_load_roundtrip_and_staleness(tmp_path, dup_features):
    x, _ = clustered(3000, 32, 20, 1.0, seed=5)
    keys = np.array([f"k{i:05d}" for i in range(3000)])
    index = build_index(x, IndexConfig(kind="ivf", nlist=16, nprobe=4), keys=keys, device="cpu")
    assert index.info.params["nprobe"] == 4
    path = save_index(index, tmp_path / "sub" / "features.faiss")
    loaded = load_index(path)
    assert loaded.info == index.info
    a = search_index(index, x[:20], k=5)
    b = search_index(loaded, x[:20], k=5)
    np.testing.assert_array_equal(a[1], b[1])
    assert not index_is_stale(loaded, x, keys=keys)
    assert index_is_stale(loaded, x, keys=keys[::-1].copy())
    assert index_is_stale(loaded, x[:2999])
    with pytest.raises(EngineError, match="does not exist"):
        load_index(tmp_path / "missing.faiss")
    with pytest.raises(EngineError, match="rebuild"):
        knn_all(loaded, dup_features)


def test_auto_rule():
    assert choose_index(FLAT_MAX_ROWS, 512)[0] == "flat"
    assert choose_index(FLAT_MAX_ROWS + 1, 512)[0] == "ivf"
    kind, params = choose_index(1_000_000, 512)
    assert kind == "ivf" and params["nlist"] == 2048 and params["factory"] == "IVF2048,SQfp16"
    assert choose_index(200_000, 512)[1]["nlist"] == 1024
    assert choose_index(5000, 8, IndexConfig(kind="ivf"))[1]["nlist"] == 64  # capped at N / 40


def test_bad_input_is_reported():
    x, _ = clustered(100, 8, 3, 1.0, seed=6)
    with pytest.raises(EngineError, match="auto, flat, ivf, hnsw"):
        IndexConfig(kind="annoy")
    with pytest.raises(EngineError, match="fp16, fp32, sq8"):
        IndexConfig(storage="pq")
    with pytest.raises(EngineError, match="float16 or float32"):
        build_index(x.astype(np.float64), device="cpu")
    with pytest.raises(EngineError, match="unit-norm"):
        build_index(x * 2, device="cpu")
    index = build_index(x, device="cpu")
    with pytest.raises(EngineError, match="at most N - 1 = 99"):
        knn_all(index, x, k=100)
    with pytest.raises(EngineError, match="row"):
        query_neighbors(index, x, 100)
    with pytest.raises(EngineError, match="labels"):
        image_class_similarity(x, np.full(100, 5), 3)
    with pytest.raises(EngineError, match="ids"):
        neighbor_agreement(np.array([[0, 7]]), np.array([0]))
    with pytest.raises(EngineError, match="labels"):
        knn_log_probs(np.ones((1, 2)), np.array([[0, 1]]), np.array([0, 9]), 3)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="device"):
            build_index(x, device="cuda")


# ---------------------------------------------------------------------------------------------
# class similarity


def test_text_class_similarity_matches_reference():
    rng = np.random.default_rng(7)
    text = unit(rng.standard_normal((5 * 4, 12))).reshape(5, 4, 12)
    mask = np.ones((5, 4), bool)
    mask[1, 2:] = False
    mask[3, 1:] = False
    got = text_class_similarity(text.astype(np.float16), mask)
    vecs = []
    for c in range(5):
        m = np.mean([text[c, p] for p in range(4) if mask[c, p]], axis=0)
        vecs.append(m / np.linalg.norm(m))
    ref = np.array([[a @ b for b in vecs] for a in vecs])
    np.testing.assert_allclose(got, ref, atol=2e-3)
    with pytest.raises(EngineError, match="no valid prompt"):
        text_class_similarity(text, np.zeros((5, 4), bool))


def test_image_class_similarity_matches_reference():
    x, y = clustered(700, 16, 4, 1.0, seed=8)
    labels = y.copy()
    labels[::7] = -1
    got = image_class_similarity(x, labels, 5, block_rows=64)  # class 4 has no sample
    cents = []
    for c in range(4):
        s = sum(x[i].astype(np.float64) for i in range(700) if labels[i] == c)
        cents.append(s / np.linalg.norm(s))
    ref = np.array([[a @ b for b in cents] for a in cents])
    np.testing.assert_allclose(got[:4, :4], ref, atol=1e-5)
    assert np.isnan(got[4]).all() and np.isnan(got[:, 4]).all()
    pairs = top_confusable_pairs(got, top=3)
    slow = sorted(((ref[a, b], a, b) for a in range(4) for b in range(a + 1, 4)), key=lambda t: -t[0])[:3]
    assert [(a, b) for a, b, _ in pairs] == [(a, b) for _, a, b in slow]
    assert all(a < b for a, b, _ in pairs)


# ---------------------------------------------------------------------------------------------
# agreement, confusion, swaps


@pytest.fixture(scope="module")
def small_neighbors():
    rng = np.random.default_rng(9)
    n, k, c = 300, 5, 6
    ids = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    ids[rng.random((n, k)) < 0.05] = -1
    labels = rng.integers(0, c, n)
    labels[rng.random(n) < 0.1] = -1
    sims = -np.sort(-rng.uniform(0.2, 1.0, (n, k)), axis=1).astype(np.float32)
    sims[ids < 0] = -np.inf
    return sims, ids, labels, c


def test_agreement_and_confusion_match_loops(small_neighbors):
    _, ids, labels, c = small_neighbors
    got = neighbor_agreement(ids, labels)
    maj = neighbor_majority(ids, labels, c)
    conf = label_confusion(labels, maj, c)
    ref_conf = np.zeros((c, c), int)
    for i in range(len(labels)):
        nl = [labels[j] for j in ids[i] if j >= 0 and labels[j] >= 0]
        if labels[i] < 0 or not nl:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(sum(v == labels[i] for v in nl) / len(nl))
        if not nl:
            assert maj[i] == -1
            continue
        counts = {v: nl.count(v) for v in nl}
        best = max(counts.values())
        assert maj[i] == min(v for v, n in counts.items() if n == best)
        if labels[i] >= 0:
            ref_conf[labels[i], maj[i]] += 1
    np.testing.assert_array_equal(conf, ref_conf)
    per_class = class_agreement(got, labels, c)
    for cls in range(c):
        vals = [got[i] for i in range(len(labels)) if labels[i] == cls and not np.isnan(got[i])]
        assert per_class[cls] == pytest.approx(np.mean(vals))
    swaps = top_label_swaps(labels, maj, top=4)
    off = [(conf[a, b], a, b) for a in range(c) for b in range(c) if a != b and conf[a, b] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    assert swaps == [(a, b, n) for n, a, b in off[:4]]


def test_swap_table_recovers_planted_hard_noise():
    x, labels, true, _, partner = clip_like_features(5000, 10, 64, noise="hard", rate=0.25, seed=10, dtype=np.float16)
    index = build_index(x, device="cpu")
    _, ids = knn_all(index, x, k=10)
    diag = knn_diagnostics(ids, labels, 10, top=10)
    assert {(a, b) for a, b, _ in diag.swaps} == {(a, int(partner[a])) for a in range(10)}
    clean = labels == true
    assert np.nanmean(diag.agreement[clean]) > np.nanmean(diag.agreement[~clean]) + 0.3
    assert diag.class_agreement.shape == (10,) and 0 < diag.mean_agreement < 1


# ---------------------------------------------------------------------------------------------
# kNN classifier and graph


def test_knn_log_probs_match_reference(small_neighbors):
    """Soft votes smoothed toward the class prior (Dirichlet, alpha pseudo-votes), a row never its own
    neighbor: against a loop."""
    sims, ids, labels, c = small_neighbors
    ids = ids.copy()
    ids[0, 0] = 0  # a row listing itself: dropped by the classifier
    got = knn_log_probs(sims, ids, labels, c, tau=0.1, alpha=2.0, rows=np.arange(len(ids)))
    assert got.shape == (len(ids), c) and got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)
    prior = np.bincount(labels[labels >= 0], minlength=c) / (labels >= 0).sum()
    for i in range(len(ids)):
        ok = [(s, j) for s, j in zip(sims[i], ids[i]) if j >= 0 and j != i and labels[j] >= 0 and np.isfinite(s)]
        votes = np.zeros(c)
        if ok:
            top = max(s for s, _ in ok)
            for s, j in ok:
                votes[labels[j]] += np.exp((s - top) / 0.1)
        np.testing.assert_allclose(got[i], np.log((votes + 2.0 * prior) / (votes.sum() + 2.0)), atol=1e-4)
    fn = knn_classifier(sims, ids, labels, c, tau=0.1, alpha=2.0)
    blocks = np.concatenate([fn(a, min(a + 64, len(ids))) for a in range(0, len(ids), 64)])
    np.testing.assert_allclose(blocks, got, atol=1e-6)


def test_knn_graph_format(tmp_path, dup_features):
    x = dup_features
    sims, ids = knn_all(build_index(x, device="cpu"), x, k=4)
    g = knn_graph(sims, ids)
    assert isinstance(g, sp.csr_matrix) and g.shape == (400, 400) and g.nnz == 400 * 4
    assert (np.diff(g.indptr) == 4).all()
    data = g.data.reshape(400, 4)
    assert (np.diff(data, axis=1) >= 0).all()
    assert not (g.indices.reshape(400, 4) == np.arange(400)[:, None]).any()
    np.testing.assert_allclose(data, np.sqrt(np.maximum(0, 2 - 2 * sims)), atol=1e-6)
    assert data[0, 0] == 0.0 and g.indices[0] == 40  # the duplicate, an explicit zero
    path = save_knn_graph(g, tmp_path / "knn.npz")
    back = sp.load_npz(path)
    assert back.nnz == g.nnz and (back != g).nnz == 0
    with pytest.raises(EngineError, match="exclude_self"):
        knn_graph(*knn_all(build_index(x, device="cpu"), x, k=4, exclude_self=False))

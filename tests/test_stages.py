import csv
import json

import numpy as np
import pytest

from benchmarks.common import clip_like_features
from engine.cache import Cache
from engine.importer import import_npz
from engine.results import IndexGroup, Neighbors, Selection, Training
from engine.runtime import EngineError
from engine.stages import predict_from_cache, train_from_cache, write_table
from engine.train import TrainConfig, load_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache(tmp_path, name, n, seed, noise="sym", rate=0.4):
    feats, labels, true, text, _ = clip_like_features(n, 8, 32, noise=noise, rate=rate, seed=0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    pick = rng.permutation(n)
    path = tmp_path / f"{name}.npz"
    np.savez(
        path,
        features=feats[pick],
        labels=labels[pick],
        true_labels=true[pick],
        text_features=text,
        keys=np.array([f"{name}{i}" for i in range(n)]),
    )
    import_npz(str(path), str(tmp_path / f"{name}.zarr"), model_name="synthetic-backbone")
    return str(tmp_path / f"{name}.zarr")


def _store_selection(cache, selected):
    """A selection group holding just `selected` (N,) bool, as if `engine select` had chosen it."""
    n = len(selected)
    Selection(
        selected=selected, filled=np.zeros(n, bool), noise_score=np.zeros(n, np.float32), attrs={"config": {}}
    ).write(cache)


def test_train_needs_a_selection(tmp_path):
    path = _cache(tmp_path, "a", 200, 0)
    with pytest.raises(EngineError, match="engine select"):
        Selection.read(Cache(path))


def test_train_predict_round_trip_with_baselines(tmp_path):
    train = _cache(tmp_path, "train", 1500, 0)
    test = _cache(tmp_path, "test", 400, 1, noise="none", rate=0.0)
    cache = Cache(train, mode="a")
    selected = cache.labels() == cache.true_labels()  # an oracle selection is enough for plumbing
    _store_selection(cache, selected)
    out = tmp_path / "head.pt"
    cfg = TrainConfig(epochs=3, lr=0.1, seed=0, device="cpu")
    summary = train_from_cache(train, cfg, eval_cache=test, out=str(out), baselines=True)
    assert [row["run"] for row in summary["table"]] == ["noisy", "selection", "mixfix"]
    assert summary["eval_acc"] > 0.5
    lines = [json.loads(x) for x in open(tmp_path / "head.metrics.jsonl")]
    assert len(lines) == 9 and {x["run"] for x in lines} == {"noisy", "selection", "mixfix"}
    head = load_head(out)
    assert head.num_classes == 8 and head.feature_identity == Cache(train).identity
    trained = Training.read(Cache(train))
    assert trained.labels.shape == (1500,) and trained.attrs["eval_acc"] == summary["eval_acc"]
    pred = predict_from_cache(str(out), test, out=str(tmp_path / "p.csv"))
    assert abs(pred["accuracy"] - summary["eval_acc"]) < 1e-6
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 400 and set(rows[0]) == {"key", "label", "pred", "conf", "true_label"}


def test_eval_cache_from_another_model_is_refused(tmp_path):
    train = _cache(tmp_path, "train", 300, 0)
    other_feats = np.random.default_rng(0).standard_normal((50, 32))
    np.savez(tmp_path / "o.npz", features=other_feats, labels=np.zeros(50, int))
    import_npz(str(tmp_path / "o.npz"), str(tmp_path / "o.zarr"))
    cache = Cache(train, mode="a")
    _store_selection(cache, np.ones(300, bool))
    with pytest.raises(EngineError, match="same model"):
        train_from_cache(
            train, TrainConfig(epochs=1, device="cpu"), eval_cache=str(tmp_path / "o.zarr"), out=str(tmp_path / "h.pt")
        )


def test_write_table_csv_and_bad_suffix(tmp_path):
    write_table(str(tmp_path / "t.csv"), {"key": np.array(["a", "b"], dtype=object), "x": np.array([1, 2])})
    assert open(tmp_path / "t.csv").read().splitlines() == ["key,x", "a,1", "b,2"]
    with pytest.raises(EngineError, match="csv or .parquet"):
        write_table(str(tmp_path / "t.txt"), {"x": np.array([1])})


@pytest.fixture(scope="module")
def hard_noise_cache(tmp_path_factory):
    """A real shapes cache: 10 classes, 40% hard noise (flips to the close partner only)."""
    from engine.embed import EmbedConfig, embed_shards
    from engine.synthetic import ShapesConfig, write_shards

    root = tmp_path_factory.mktemp("hard")
    made = write_shards(
        root / "shards", ShapesConfig(classes=10, per_shard=150, shards=2, noise="hard", rate=0.4, seed=3)
    )
    cache = str(root / "c.zarr")
    embed_shards(
        made["shards"],
        cache,
        EmbedConfig(classes="shapes:10", true_label_key="true_cls", workers=0),
        show_progress=False,
    )
    return cache


def test_diagnose_recovers_planted_hard_noise_pairs(hard_noise_cache, tmp_path):
    from engine.stages import diagnose_from_cache, neighbors_from_cache
    from engine.synthetic import class_names, partners

    summary = diagnose_from_cache(hard_noise_cache, k=10, top=6, export_knn=str(tmp_path / "knn.npz"))
    names = class_names(10)
    partner = {names[a]: names[b] for a, b in enumerate(partners(10))}
    swaps = summary["swaps"][:4]
    assert swaps and all(partner[s["label"]] == s["neighbors_say"] for s in swaps), swaps
    assert 0 < summary["agreement_mean"] < 1
    stored = Neighbors.read(Cache(hard_noise_cache))
    assert stored.ids.shape == (300, 10) and stored.k == 10
    import scipy.sparse

    graph = scipy.sparse.load_npz(tmp_path / "knn.npz")
    assert graph.shape == (300, 300) and graph.nnz == 3000
    key = Cache(hard_noise_cache).keys()[7]
    near = neighbors_from_cache(hard_noise_cache, key, k=5)
    assert len(near["neighbors"]) == 5 and key not in [n["key"] for n in near["neighbors"]]
    sims = [n["similarity"] for n in near["neighbors"]]
    assert sims == sorted(sims, reverse=True)


def test_stored_index_is_reused_until_rows_change(hard_noise_cache):
    from engine.index import IndexConfig
    from engine.stages import index_from_cache, load_cached_index

    index_from_cache(hard_noise_cache, IndexConfig(kind="flat"))
    cache = Cache(hard_noise_cache)
    written = IndexGroup.read(cache).attrs["written"]
    load_cached_index(cache, cache.load_features())
    assert IndexGroup.read(Cache(hard_noise_cache)).attrs["written"] == written  # not rebuilt


def test_select_on_a_real_shapes_cache_then_cli_table(hard_noise_cache, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "selection.csv"
    r = CliRunner().invoke(
        cli,
        ["select", "--cache", hard_noise_cache, "--out", str(out), "--json", "--export-probs", str(tmp_path / "probs")],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    m = summary["metrics"]
    assert m["precision"] > 0.8 and m["recall"] > 0.5, m
    assert summary["counts"]["final"] <= min(v for k, v in summary["counts"].items() if "/" in k) + summary[
        "counts"
    ].get("filled", 0)
    rows = list(csv.DictReader(open(out)))
    cache = Cache(hard_noise_cache)
    assert [row["key"] for row in rows] == cache.keys().tolist()
    assert list(rows[0])[:3] == ["key", "label", "selected"]
    selected = Selection.read(cache).selected
    assert [row["selected"] == "True" for row in rows] == selected.tolist()
    probs = np.load(tmp_path / "probs" / "probs_zeroshot.npy")
    assert probs.shape == (300, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_select_with_knn_and_bad_options(hard_noise_cache):
    from click.testing import CliRunner

    from cli.main import cli

    r = CliRunner().invoke(
        cli, ["select", "--cache", hard_noise_cache, "--classifiers", "zeroshot,linear,knn", "--json"]
    )
    assert r.exit_code == 0, r.output
    with_knn = json.loads(r.stdout)
    assert "knn/vote" in with_knn["counts"] and "knn/consistency" not in with_knn["counts"]
    without = json.loads(CliRunner().invoke(cli, ["select", "--cache", hard_noise_cache, "--json"]).stdout)
    # the knn vote only vetoes rows its neighbors contradict: adding it costs (almost) no recall
    assert with_knn["metrics"]["f1"] >= without["metrics"]["f1"] - 0.02, (with_knn["metrics"], without["metrics"])
    r = CliRunner().invoke(cli, ["select", "--cache", hard_noise_cache, "--classifiers", "zeroshot,forest"])
    assert r.exit_code == 2 and "forest" in r.stderr and "zeroshot" in r.stderr
    r = CliRunner().invoke(cli, ["select", "--cache", hard_noise_cache, "--theta-cons", "1.5"])
    assert r.exit_code == 2 and "theta_cons" in r.stderr


def test_select_without_text_names_engine_prompts(tmp_path):
    np.savez(tmp_path / "f.npz", features=np.random.default_rng(0).standard_normal((40, 8)), labels=np.arange(40) % 4)
    import_npz(str(tmp_path / "f.npz"), str(tmp_path / "c.zarr"))
    from engine.select import SelectConfig
    from engine.stages import select_from_cache

    with pytest.raises(EngineError, match="engine prompts"):
        select_from_cache(str(tmp_path / "c.zarr"), SelectConfig())
    summary = select_from_cache(str(tmp_path / "c.zarr"), SelectConfig(classifiers=("linear",)))
    assert summary["rows"] == 40

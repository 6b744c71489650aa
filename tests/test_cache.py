"""engine.cache (read view, result-group storage), engine.append (the append protocol) and
engine.results (typed result groups), tested directly on small stores."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine import cache as cache_module
from engine.append import CacheWriter
from engine.cache import RESULTS, Cache
from engine.results import ClassifierResult, Diagnostics, Neighbors, PairResult, Selection, Training
from engine.runtime import EngineError

DIM = 8


def _new(path, shards=("a.tar", "b.tar", "c.tar")) -> tuple[CacheWriter, dict]:
    writer = CacheWriter(str(path), create=True)
    writer.initialise({"model": "test", "pretrained": "none", "embed_dim": DIM}, dim=DIM, precision="fp32")
    return writer, writer.register_shards(list(shards))


def _stage(writer: CacheWriter, index: dict, url: str, n: int, *, first_key: int = 0) -> np.ndarray:
    rng = np.random.default_rng(first_key)
    feats = rng.standard_normal((n, DIM)).astype(np.float16)
    writer.stage_shard(
        index[url],
        features=feats,
        keys=[f"{url}-{first_key + i}" for i in range(n)],
        labels=np.arange(n) % 3,
        true_labels=np.full(n, -1),
        positions=np.arange(n),
        outcome={"url": url, "bad": [], "samples": n},
    )
    return feats


def test_rows_land_in_plan_order_whatever_order_shards_are_staged(tmp_path):
    writer, index = _new(tmp_path / "c.zarr")
    c = _stage(writer, index, "c.tar", 4, first_key=20)
    a = _stage(writer, index, "a.tar", 3, first_key=0)
    plan = [index["a.tar"], index["b.tar"], index["c.tar"]]
    assert [d["url"] for d in writer.consolidate(plan)] == ["a.tar"]  # b is missing: the prefix stops
    b = _stage(writer, index, "b.tar", 2, first_key=10)
    assert [d["url"] for d in writer.consolidate(plan)] == ["b.tar", "c.tar"]
    writer.trim()
    view = Cache(str(tmp_path / "c.zarr"))
    np.testing.assert_array_equal(view.load_features(), np.concatenate([a, b, c]))
    assert view.keys().tolist()[:4] == ["a.tar-0", "a.tar-1", "a.tar-2", "b.tar-10"]
    assert [s["status"] for s in view.manifest["shards"]] == ["done"] * 3
    assert view.provenance()[0].tolist() == [0] * 3 + [1] * 2 + [2] * 4
    assert view.row_of("c.tar-21") == 6 and view.features_at(np.array([6])).tolist() == c[1:2].tolist()
    blocks = list(view.iter_features(block_rows=4))
    assert [start for start, _ in blocks] == [0, 4, 8] and sum(len(b) for _, b in blocks) == 9


def test_rows_beyond_the_manifest_and_uncommitted_staging_are_never_read(tmp_path):
    writer, index = _new(tmp_path / "c.zarr")
    _stage(writer, index, "a.tar", 3)
    writer.consolidate()
    # a killed append: rows written past manifest["rows"], and a staging group never committed
    images = writer.root["images"]
    images["features"].resize((5, DIM))
    images["features"][3:5] = np.ones((2, DIM), np.float16)
    staging = writer.root["staging"].create_group("deadbeef-x")
    staging.attrs.put({"committed": False, "shard": index["b.tar"]})
    view = Cache(str(tmp_path / "c.zarr"))
    assert view.num_rows == 3 and view.load_features().shape == (3, DIM)
    assert CacheWriter(str(tmp_path / "c.zarr")).consolidate() == []  # nothing committed to apply
    writer.trim()
    assert Cache(str(tmp_path / "c.zarr")).root["images/features"].shape == (3, DIM)


def test_a_mistyped_path_is_an_error_not_a_new_directory(tmp_path):
    with pytest.raises(EngineError, match="not a feature cache"):
        Cache(str(tmp_path / "nope.zarr"))
    assert not (tmp_path / "nope.zarr").exists()
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs.put({"format": "something else"})
    with pytest.raises(EngineError, match="not an engine cache"):
        Cache(str(tmp_path / "other.zarr"))


# ----------------------------------------------------------------------------- result groups


def _selection(n: int, seed: int = 0) -> Selection:
    rng = np.random.default_rng(seed)
    score = rng.random(n).astype(np.float32)
    return Selection(
        selected=score > 0.5,
        filled=np.zeros(n, bool),
        noise_score=1 - score,
        pairs={"zeroshot/consistency": PairResult(score, score > 0.5)},
        classifiers={"zeroshot": ClassifierResult(rng.integers(0, 3, n).astype(np.int32), score, score)},
        attrs={"counts": {"final": int((score > 0.5).sum())}},
    )


@pytest.fixture
def rows(tmp_path):
    writer, index = _new(tmp_path / "c.zarr")
    _stage(writer, index, "a.tar", 6)
    writer.consolidate()
    return str(tmp_path / "c.zarr")


def test_selection_round_trip_owns_its_names(rows):
    stored = _selection(6)
    stored.write(Cache(rows, mode="a"))
    back = Selection.read(Cache(rows))
    np.testing.assert_array_equal(back.selected, stored.selected)
    np.testing.assert_array_equal(back.pairs["zeroshot/consistency"].score, stored.pairs["zeroshot/consistency"].score)
    assert back.attrs["counts"] == stored.attrs["counts"] and back.attrs["complete"]
    assert list(back.table_columns()) == [
        "selected",
        "filled",
        "noise_score",
        "zeroshot/consistency/score",
        "zeroshot/consistency/pass",
        "zeroshot/prediction",
        "zeroshot/confidence",
        "zeroshot/loss_score",
    ]


def test_replacing_a_group_is_all_or_nothing(rows, monkeypatch):
    cache = Cache(rows, mode="a")
    _selection(6, seed=1).write(cache)
    first = cache.group_path("selection")

    def killed(group):
        group.create_array("selected", data=np.zeros(6, bool))
        raise KeyboardInterrupt  # a kill in the middle of writing the new group

    with pytest.raises(KeyboardInterrupt):
        cache.replace_group("selection", killed, {})
    again = Cache(rows)
    assert again.group_path("selection") == first
    np.testing.assert_array_equal(Selection.read(again).selected, _selection(6, seed=1).selected)
    # the debris stays until it is older than STALE_GROUP_S, then the next replace removes it
    debris = [g for g in again.root.group_keys() if g.startswith("selection.") and g != first]
    assert len(debris) == 1
    _selection(6, seed=2).write(cache)
    assert debris[0] in Cache(rows).root
    monkeypatch.setattr(cache_module, "STALE_GROUP_S", -1)
    _selection(6, seed=3).write(cache)
    names = [g for g in Cache(rows).root.group_keys() if g.startswith("selection")]
    assert names == [Cache(rows).group_path("selection")]  # the old one and the debris are gone


def test_read_only_caches_and_reserved_names_refuse_writes(rows):
    with pytest.raises(EngineError, match="read-only"):
        _selection(6).write(Cache(rows))
    with pytest.raises(EngineError, match="not a result group name"):
        Cache(rows, mode="a").replace_group("images", lambda group: None, {})


def test_a_group_covering_other_rows_names_the_command_that_refreshes_it(rows):
    _selection(4).write(Cache(rows, mode="a"))
    with pytest.raises(EngineError, match=r"cover 4 rows but the cache has 6; rerun `engine select"):
        Selection.read(Cache(rows))
    Training(labels=np.zeros(5, np.int32), selection=np.ones(5, bool)).write(Cache(rows, mode="a"))
    with pytest.raises(EngineError, match="rerun `engine train"):
        Training.read(Cache(rows))


def test_groups_written_before_the_pointers_still_read_and_an_old_selection_asks_for_a_rerun(rows):
    cache = Cache(rows, mode="a")
    legacy = cache.root.create_group("diagnostics")
    for name, value in (
        ("agreement", np.ones(6, np.float32)),
        ("majority", np.zeros(6, np.int64)),
        ("class_agreement", np.ones(3)),
        ("image_similarity", np.eye(3, dtype=np.float32)),
    ):
        legacy.create_array(name, data=value)
    legacy.attrs.put({"k": 10, "complete": True})
    old_selection = cache.root.create_group("selection")
    old_selection.create_array("selected", data=np.ones(6, bool))
    old_selection.attrs.put({"complete": True})
    view = Cache(rows)
    assert RESULTS not in view.root and Diagnostics.read(view).attrs["k"] == 10
    with pytest.raises(EngineError, match="another engine version.*rerun `engine select"):
        Selection.read(view)
    _selection(6).write(cache)  # replaces the legacy group
    assert Selection.read(Cache(rows)).selected.shape == (6,) and "selection" not in Cache(rows).root


def test_neighbors_are_current_only_for_the_rows_they_were_computed_on(rows):
    from engine.index import row_fingerprint

    cache = Cache(rows, mode="a")
    ids = np.tile(np.arange(1, 4), (6, 1)) % 6
    Neighbors(
        ids=ids,
        similarities=np.ones((6, 3), np.float32),
        k=3,
        fingerprint=row_fingerprint(cache.load_features(), keys=cache.keys()),
        index="flat",
    ).write(cache)
    assert Neighbors.current(Cache(rows), k=3) is not None
    assert Neighbors.current(Cache(rows), k=2) is None and Neighbors.current(Cache(rows), k=2, at_least=True)
    assert Neighbors.current(Cache(rows), k=4, at_least=True) is None
    Cache(rows, mode="a").open_group("knn").attrs.update({"fingerprint": "other rows"})
    assert Neighbors.current(Cache(rows), k=3) is None
    Cache(rows, mode="a").remove_group("knn")
    assert not Cache(rows).has_group("knn")

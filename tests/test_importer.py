import numpy as np
import pytest

from engine.cache import Cache
from engine.importer import import_npz
from engine.runtime import EngineError


def _npz(tmp_path, name="f.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_import_round_trip_normalises_and_keeps_text(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 8)).astype(np.float32)
    feats[:10] /= np.linalg.norm(feats[:10], axis=1, keepdims=True)
    labels = rng.integers(0, 3, 50)
    text = rng.standard_normal((3, 8))
    path = _npz(
        tmp_path,
        features=feats,
        labels=labels,
        keys=np.array([f"k{i}" for i in range(50)]),
        true_labels=labels,
        text_features=text,
        class_names=np.array(["a", "b", "c"]),
    )
    summary = import_npz(path, str(tmp_path / "c.zarr"))
    assert summary["rows"] == 50 and summary["renormalised"] == 40
    cache = Cache(tmp_path / "c.zarr")
    got = cache.load_features().astype(np.float32)
    ref = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    assert np.abs(got - ref).max() < 1e-3
    assert cache.labels().tolist() == labels.tolist() and cache.keys()[3] == "k3"
    t, mask = cache.text_features()
    assert t.shape == (3, 1, 8) and mask.all() and cache.class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"features": np.ones((4, 3))}, "must hold 'features' and 'labels'"),
        ({"features": np.ones(4), "labels": np.zeros(4, int)}, r"expected shape \(N, D\)"),
        ({"features": np.ones((4, 3)), "labels": np.zeros(5, int)}, r"expected shape \(4,\), got \(5,\)"),
        ({"features": np.ones((4, 3)), "labels": np.zeros(4)}, "expected integers"),
        ({"features": np.ones((4, 3)), "labels": np.array([0, 1, -3, 0])}, ">= -1"),
        ({"features": np.ones((2, 3)), "labels": np.zeros(2, int), "keys": np.array(["a", "a"])}, "unique"),
        ({"features": np.ones((2, 3)), "labels": np.array([0, 5]), "text_features": np.ones((2, 3))}, "only 2 classes"),
        ({"features": np.ones((2, 3)), "labels": np.zeros(2, int), "text_features": np.ones((2, 4))}, r"\(C, P, 3\)"),
        ({"features": np.array([[1.0, np.nan]]), "labels": np.zeros(1, int)}, "NaN"),
        ({"features": np.zeros((2, 3)), "labels": np.zeros(2, int)}, "all zeros"),
    ],
)
def test_import_validation_names_what_was_received(tmp_path, arrays, match):
    with pytest.raises(EngineError, match=match):
        import_npz(_npz(tmp_path, **arrays), str(tmp_path / "c.zarr"))


def test_import_refuses_existing_cache(tmp_path):
    path = _npz(tmp_path, features=np.ones((2, 3)), labels=np.zeros(2, int))
    import_npz(path, str(tmp_path / "c.zarr"))
    with pytest.raises(EngineError, match="already exists"):
        import_npz(path, str(tmp_path / "c.zarr"))

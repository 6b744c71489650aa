import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from engine import synthetic
from engine.runtime import EngineError


def test_classes_have_close_partners():
    classes = synthetic.class_list()
    assert len(classes) == len(set(classes)) >= 20
    partner = synthetic.partners(len(classes))
    assert (partner[partner] == np.arange(len(classes))).all()
    kinds = set()
    for k, (colour, shape) in enumerate(classes):
        pc, ps = classes[partner[k]]
        assert (pc == colour) != (ps == shape), "partners differ in exactly one attribute"
        kinds.add(tuple(sorted((shape, ps))) if pc == colour else tuple(sorted((colour, pc))))
    assert {("circle", "ellipse"), ("rectangle", "square"), ("orange", "red")} <= kinds


def test_shards_round_trip_through_webdataset(shapes_dir, shard_paths):
    samples = list(wds.WebDataset(shard_paths, shardshuffle=False))
    assert len(samples) == 120
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    for s in samples[:5]:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (64, 64) and img.mode == "RGB"
        assert 0 <= int(s["cls"]) < 20 and 0 <= int(s["true_cls"]) < 20
    assert (shapes_dir / "classes.json").is_file()


def test_deterministic_for_a_seed():
    cfg = synthetic.ShapesConfig(classes=20, per_shard=5, shards=1, seed=3)
    a = list(synthetic.shard_samples(cfg, 0))
    b = list(synthetic.shard_samples(cfg, 0))
    assert [x["jpg"] for x in a] == [x["jpg"] for x in b]
    c = list(synthetic.shard_samples(synthetic.ShapesConfig(classes=20, per_shard=5, shards=1, seed=4), 0))
    assert [x["jpg"] for x in a] != [x["jpg"] for x in c]


@pytest.mark.parametrize("noise", ["sym", "hard", "mix"])
def test_noise_rates_come_out_as_asked(noise):
    rng = np.random.default_rng(0)
    true = rng.integers(0, 20, size=40000)
    given = synthetic.noisy_labels(true, num_classes=20, noise=noise, rate=0.4, rng=rng)
    flipped = given != true
    partner = synthetic.partners(20)
    expected = {"sym": 0.4 * 19 / 20, "hard": 0.4, "mix": 0.2 + 0.2 * 19 / 20}[noise]
    assert abs(flipped.mean() - expected) < 0.01
    to_partner = (given == partner[true]).mean()
    if noise == "hard":
        assert abs(to_partner - 0.4) < 0.01
    if noise == "sym":  # uniform: only 1/20 of corrupted samples land on the partner
        assert to_partner < 0.04


def test_no_noise_and_bad_options():
    true = np.arange(20)
    assert (
        synthetic.noisy_labels(true, num_classes=20, noise="none", rate=0.9, rng=np.random.default_rng(0)) == true
    ).all()
    with pytest.raises(EngineError, match="noise"):
        synthetic.ShapesConfig(noise="flip")
    with pytest.raises(EngineError, match="rate"):
        synthetic.ShapesConfig(rate=1.5)
    with pytest.raises(EngineError, match="classes"):
        synthetic.ShapesConfig(classes=500)

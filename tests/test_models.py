import shutil
import time

import numpy as np
import pytest
import torch

from engine import models
from engine.runtime import EngineError


def test_unknown_model_lists_choices():
    with pytest.raises(EngineError, match="ViT-B-32") as err:
        models.load_model("ViT-B-3")
    assert "engine models" in str(err.value)


def test_architecture_without_weights_is_refused():
    with pytest.raises(EngineError, match="--pretrained"):
        models.resolve("ViT-B-32", None)


def test_unknown_tag_is_refused():
    with pytest.raises(EngineError, match="laion2b_s34b_b79k"):
        models.resolve("ViT-B-32", "no-such-tag")


def test_unfetchable_weights_fail_fast_naming_pretrained_path(monkeypatch):
    monkeypatch.setattr(models, "_PROBE_HOSTS", ("127.0.0.1", 9))  # nothing listens: offline
    monkeypatch.setattr(models, "_cached_tag_file", lambda cfg: None)
    start = time.perf_counter()
    with pytest.raises(EngineError, match=r"--pretrained /path/to/weights"):
        models.load_model("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - start < 10


def test_shapes_tiny_loads_in_eval_mode_with_identity():
    m = models.load_model("shapes-tiny")
    assert not m.model.training
    assert m.identity["model"] == "shapes-tiny" and len(m.identity["sha256"]) == 64
    assert m.identity["preprocess"]["size"] in (64, [64, 64])
    with torch.inference_mode():
        f = m.model.encode_image(torch.zeros(2, 3, 64, 64), normalize=True)
    assert f.shape == (2, m.embed_dim)


def test_local_checkpoint_file_gets_its_own_identity(tmp_path):
    src = models.BUNDLED["shapes-tiny"] / "open_clip_model.safetensors"
    copy = tmp_path / "mine.safetensors"
    shutil.copy(src, copy)
    a = models.load_model("shapes-tiny")
    b = models.load_model("shapes-tiny", str(copy))
    assert a.identity["sha256"] == b.identity["sha256"]
    assert models.same_model(a.identity, b.identity) is False  # file name differs: recorded as such
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(a.model.encode_image(x), b.model.encode_image(x))


def test_model_folder_and_random_architecture(tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(models.BUNDLED["shapes-tiny"], folder)
    m = models.load_model(str(folder))
    assert m.identity["model"].startswith("local-dir:") and m.embed_dim == 128
    r = models.resolve("RN50", "random")[1]
    assert r["pretrained"] == "random"


def test_shapes_tiny_zero_shot_beats_80_percent_on_fresh_images():
    from engine import synthetic
    from engine.classes import encode_prompts, load_classes

    m = models.load_model("shapes-tiny")
    cs = load_classes("shapes:20")
    text, mask = encode_prompts(cs, m.model, m.tokenizer, device=torch.device("cpu"))
    rng = np.random.default_rng(12345)
    labels = np.arange(200) % 20
    images = torch.stack([m.preprocess(synthetic.draw_image(int(k), rng, num_classes=20)) for k in labels])
    with torch.inference_mode():
        f = m.model.encode_image(images, normalize=True).float()
    sims = torch.einsum("nd,cpd->ncp", f, torch.from_numpy(text).float()) / 0.07
    pred = torch.logsumexp(sims.masked_fill(~torch.from_numpy(mask)[None], -torch.inf), 2).argmax(1).numpy()
    assert (pred == labels).mean() > 0.8

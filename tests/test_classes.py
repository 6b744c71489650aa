import json

import numpy as np
import pytest

from engine.classes import load_classes, parse_class_document
from engine.runtime import EngineError


def test_prompts_are_templates_times_descriptions():
    doc = {
        "templates": ["a photo of a {name}", "a drawing of a {name}"],
        "suffix": ".",
        "classes": [
            {"index": 1, "name": "dog", "descriptions": ["which barks", "with a tail"]},
            {"index": 0, "name": "cat", "aliases": ["kitty"]},
        ],
    }
    cs = parse_class_document(doc)
    assert cs.class_names == ("cat", "dog")
    assert cs.prompts[1] == (
        "a photo of a dog which barks.",
        "a photo of a dog with a tail.",
        "a drawing of a dog which barks.",
        "a drawing of a dog with a tail.",
    )
    assert cs.prompts[0] == ("a photo of a cat.", "a drawing of a cat.", "a photo of a kitty.", "a drawing of a kitty.")
    assert cs.max_prompts == 4


def test_builtins_and_files(tmp_path):
    shapes = load_classes("shapes:10")
    assert shapes.num_classes == 10 and shapes.class_names[0] == "red circle"
    imagenet = load_classes("imagenet1k")
    assert imagenet.num_classes == 1000 and len(imagenet.prompts[0]) >= 10
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"classes": [{"name": "a"}, {"name": "b"}]}))
    assert load_classes(str(path)).class_names == ("a", "b")


@pytest.mark.parametrize(
    "doc,match",
    [
        ({"classes": []}, "non-empty"),
        ({"classes": [{"name": "a", "index": 1}]}, "indices"),
        ({"templates": ["no placeholder"], "classes": [{"name": "a"}]}, "name"),
        ({"classes": [{"index": 0}]}, "no name"),
    ],
)
def test_bad_class_documents(doc, match):
    with pytest.raises(EngineError, match=match):
        parse_class_document(doc)


def test_unknown_builtin_and_missing_file(tmp_path):
    with pytest.raises(EngineError, match="imagenet1k"):
        load_classes("cifar-zzz")
    with pytest.raises(EngineError, match="does not exist"):
        load_classes(str(tmp_path / "missing.json"))


def test_encode_prompts_pads_and_masks():
    import torch

    from engine.classes import encode_prompts
    from engine.models import load_model

    cs = parse_class_document(
        {"classes": [{"name": "red circle", "descriptions": ["round", "a coin"]}, {"name": "blue square"}]}
    )
    m = load_model("shapes-tiny")
    feats, mask = encode_prompts(cs, m.model, m.tokenizer, device=torch.device("cpu"))
    assert feats.shape == (2, 2, m.embed_dim) and feats.dtype == np.float16
    assert mask.tolist() == [[True, True], [True, False]]
    assert np.allclose(np.linalg.norm(feats[mask].astype(np.float32), axis=1), 1, atol=1e-2)
    assert not feats[1, 1].any()


@pytest.mark.parametrize(
    "doc,match",
    [
        ({"classes": ["cat", "dog"]}, "must be an object"),
        ({"templates": ["a {label} of {name}"], "classes": [{"name": "a"}]}, "only placeholder"),
        ({"classes": [{"name": "a", "descriptions": "round"}]}, "list of strings"),
        ({"classes": [{"name": "a", "aliases": [3]}]}, "list of strings"),
    ],
)
def test_wrong_types_are_clear_errors(doc, match):
    with pytest.raises(EngineError, match=match):
        parse_class_document(doc)

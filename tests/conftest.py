"""Shared offline fixtures: tiny shapes shards written by webdataset's TarWriter, in tmp dirs."""
from __future__ import annotations

import os

import pytest
import torch

from engine.synthetic import ShapesConfig, write_shards

torch.set_num_threads(int(os.environ.get("ENGINE_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu_test" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """3 shards x 40 images, 20 classes, 40% mixed noise, with classes.json."""
    out = tmp_path_factory.mktemp("shapes")
    write_shards(out, ShapesConfig(classes=20, per_shard=40, shards=3, noise="mix", rate=0.4, seed=7))
    return out


@pytest.fixture(scope="session")
def shard_paths(shapes_dir):
    return sorted(str(p) for p in shapes_dir.glob("*.tar"))

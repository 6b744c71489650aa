"""Shared offline fixtures: tiny shapes shards written by webdataset's TarWriter, in tmp dirs."""

from __future__ import annotations

import logging
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


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket; env for the ranks."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    import fsspec

    before = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fsspec.filesystem("s3", endpoint_url=endpoint).mkdir("engine-test")
    yield {"FSSPEC_S3_ENDPOINT_URL": endpoint, **CREDENTIALS}
    server.stop()
    if before is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = before
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (deterministic reductions; modules opt in)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

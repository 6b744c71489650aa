"""img2dataset itself, offline, over `file://` URLs with a label column, and its webdataset
output (jpg, txt, json, the _stats.json and .parquet side files, failed downloads absent from
the tars) through `engine embed --label-key json:label`, select and export."""

import glob
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds
from click.testing import CliRunner

from cli.main import cli
from engine.cache import Cache
from engine.synthetic import ShapesConfig, class_file, shard_samples

pytest.importorskip("img2dataset")

DOWNLOAD = """
import sys
from img2dataset import download

if __name__ == "__main__":
    download(
        url_list=sys.argv[1], input_format="csv", url_col="url", caption_col="caption",
        save_additional_columns=["label"], output_format="webdataset", output_folder=sys.argv[2],
        number_sample_per_shard=40, processes_count=1, thread_count=4, resize_mode="no",
        distributor="multiprocessing", enable_wandb=False, timeout=5, retries=0,
        disallowed_header_directives=[],
    )
"""


def _cli(args) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """img2dataset's webdataset output for 60 shapes images (6 classes, 30% symmetric noise) listed
    as file:// URLs, plus one URL to a missing file and one to a file that is no image."""
    root = tmp_path_factory.mktemp("img2dataset")
    images = root / "images"
    images.mkdir()
    config = ShapesConfig(classes=6, per_shard=60, shards=1, noise="sym", rate=0.3, seed=21)
    rows, truth = [], {}
    for i, sample in enumerate(shard_samples(config, 0)):
        (images / f"{i:03d}.jpg").write_bytes(sample["jpg"])
        url = (images / f"{i:03d}.jpg").as_uri()
        rows.append((url, f"shape number {i}", int(sample["cls"])))
        truth[url] = (int(sample["cls"]), int(sample["true_cls"]))
    (images / "broken.jpg").write_text("<html>not an image</html>")
    rows.insert(10, ((images / "missing.jpg").as_uri(), "gone", 1))
    rows.insert(20, ((images / "broken.jpg").as_uri(), "broken", 2))
    urls = root / "urls.csv"
    urls.write_text("url,caption,label\n" + "".join(f"{u},{c},{y}\n" for u, c, y in rows))
    (root / "classes.json").write_text(json.dumps(class_file(6)))
    out = root / "out"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    script = root / "download.py"
    script.write_text(DOWNLOAD)
    done = subprocess.run(
        [sys.executable, str(script), str(urls), str(out)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "out": out, "truth": truth, "rows": rows}


def test_img2dataset_shards_embed_select_and_export(downloaded, tmp_path):
    out, truth = downloaded["out"], downloaded["truth"]
    shards = sorted(glob.glob(str(out / "*.tar")))
    stats = [json.loads(open(p).read()) for p in sorted(glob.glob(str(out / "*_stats.json")))]
    assert shards and glob.glob(str(out / "*.parquet"))  # the side files are there, next to the tars
    assert sum(s["count"] for s in stats) == 62 and sum(s["successes"] for s in stats) == 60
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 60 and all({"jpg", "txt", "json"} <= set(s) for s in samples)

    cache = str(tmp_path / "i2d.zarr")
    _cli(
        ["embed", str(out / "*.tar"), "--cache", cache, "--label-key", "json:label"]
        + ["--classes", str(downloaded["root"] / "classes.json"), "--workers", "0", "--batch-size", "32"]
    )
    opened = Cache(cache)
    keys = opened.keys().tolist()
    assert keys == [s["__key__"] for s in samples]  # every downloaded sample, in shard order
    assert opened.manifest["rows"] == 60 and all(s["status"] == "done" for s in opened.manifest["shards"])
    by_key = {s["__key__"]: json.loads(s["json"]) for s in samples}
    assert opened.labels().tolist() == [truth[by_key[k]["url"]][0] for k in keys]
    assert opened.manifest["bad_samples"] == 0 and opened.manifest["missing_labels"] == 0  # failed downloads: absent

    summary = json.loads(_cli(["select", "--cache", cache, "--device", "cpu", "--json"]))
    assert summary["rows"] == 60 and 0 < summary["counts"]["final"] < 60
    table, clean = tmp_path / "labels.parquet", tmp_path / "clean"
    _cli(["export", "--cache", cache, "--out", str(table), "--shards", str(clean / "{000000..}.tar")])
    exported = list(wds.WebDataset(sorted(glob.glob(str(clean / "*.tar"))), shardshuffle=False))
    assert len(exported) == summary["counts"]["final"]
    source = {s["__key__"]: s for s in samples}
    for sample in exported:  # img2dataset's fields copied byte-for-byte, the label as cls
        original = source[sample["__key__"]]
        assert all(sample[f] == original[f] for f in ("jpg", "txt", "json"))
        assert int(sample["cls"]) == json.loads(original["json"])["label"]

    datasets = pytest.importorskip("datasets")
    labels = datasets.load_dataset("parquet", data_files=str(table), split="train", cache_dir=str(tmp_path / "hf"))
    assert labels["key"] == keys and labels.features["label"].names == list(opened.class_names)

"""`engine pack` on Hugging Face datasets written by `datasets` itself (Parquet files as the Hub
serves them, save_to_disk folders), and the exported label table read back with `datasets`."""

import dataclasses
import glob
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image as PILImage

from cli.main import cli
from engine import hf
from engine.pack import PackConfig, pack_dataset
from engine.runtime import EngineError
from engine.synthetic import ShapesConfig, class_names, shard_samples

datasets = pytest.importorskip("datasets")

CLASSES = class_names(6)
LABEL = {"label_column": "label"}  # the fixtures have two ClassLabel columns: label and clean_label
UNDECODABLE, MISSING_PATH, STORED_PATH, NO_LABEL = 7, 11, 9, 5


def _rows(seed: int, shards: int = 2, per_shard: int = 60) -> dict:
    config = ShapesConfig(classes=6, per_shard=per_shard, shards=shards, noise="sym", rate=0.3, seed=seed)
    samples = [s for shard in range(shards) for s in shard_samples(config, shard)]
    return {
        "image": [{"bytes": s["jpg"], "path": None} for s in samples],
        "label": [int(s["cls"]) for s in samples],
        "clean_label": [int(s["true_cls"]) for s in samples],
        "id": [f"img-{seed}.{i:04d}" for i in range(len(samples))],
    }


def _features():
    from datasets import ClassLabel, Features, Image, Value

    return Features(
        {
            "image": Image(),
            "label": ClassLabel(names=CLASSES),
            "clean_label": ClassLabel(names=CLASSES),
            "id": Value("string"),
        }
    )


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A dataset folder as the Hub serves it: data/train-0000{0,1}-of-00002.parquet (120 rows, row
    groups of 16) and data/test-00000-of-00001.parquet (20 rows); in train, row 7 holds bytes that
    are no image, row 9 an image stored by path (photos/nine.jpg, relative to the folder), row 11
    a path to a missing file, row 5 no label (-1)."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("hub") / "shapes"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "nine.jpg").write_bytes(_jpeg(9))
    rows = _rows(seed=3)
    rows["image"][UNDECODABLE] = {"bytes": b"this is not an image", "path": None}
    rows["image"][STORED_PATH] = {"bytes": None, "path": "photos/nine.jpg"}
    rows["image"][MISSING_PATH] = {"bytes": None, "path": "photos/missing.jpg"}
    rows["label"][NO_LABEL] = -1
    train = Dataset.from_dict(rows, features=_features())
    (root / "data").mkdir()
    for i in range(2):
        train.shard(2, i, contiguous=True).to_parquet(root / f"data/train-{i:05d}-of-00002.parquet", batch_size=16)
    Dataset.from_dict(_rows(seed=4, shards=1, per_shard=20), features=_features()).to_parquet(
        root / "data/test-00000-of-00001.parquet"
    )
    return {"root": root, "rows": rows, "train": train}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict written by save_to_disk: train (60 rows, row 7 not an image) and test (20)."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("saved") / "shapes-disk"
    rows = _rows(seed=5, shards=1)
    rows["image"][UNDECODABLE] = {"bytes": b"GIF89a broken", "path": None}
    train = Dataset.from_dict(rows, features=_features())
    test = Dataset.from_dict(_rows(seed=6, shards=1, per_shard=20), features=_features())
    DatasetDict({"train": train, "test": test}).save_to_disk(str(root))
    return {"root": root, "rows": rows}


def _samples(out) -> list[dict]:
    return list(wds.WebDataset(sorted(glob.glob(os.path.join(out, "*.tar"))), shardshuffle=False))


def _shard_bytes(out) -> dict:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*.tar")))}


def test_parquet_split_round_trip_against_the_rows_datasets_reads(hub, tmp_path):
    out = tmp_path / "out"
    config = PackConfig(split="train", true_label_column="clean_label", per_shard=50, workers=1, batch_size=5)
    summary = pack_dataset(hub["root"], out, config, show_progress=False)
    assert summary["source"] == "hf-parquet" and summary["files"] == 120 and summary["samples"] == 118
    assert summary["hf"] == {
        "split": "train",
        "columns": {"image": "image", "label": "label", "key": None, "true_label": "clean_label"},
        "data_files": 2,
    }
    assert summary["missing_labels"] == 1 and summary["with_true_label"] == 120
    bad = {b["row"]: b["reason"] for b in json.loads((out / "pack.json").read_text())["bad"]}
    assert set(bad) == {UNDECODABLE, MISSING_PATH} and summary["bad"] == 2
    assert "not a decodable image" in bad[UNDECODABLE] and "photos/missing.jpg" in bad[MISSING_PATH]
    assert [s["name"] for s in json.loads((out / "pack.json").read_text())["shards"]] == [
        f"shapes-train-{i:06d}.tar" for i in range(3)
    ]
    # the slow, obvious reference: every row as `datasets` itself reads it, images undecoded
    reference = hub["train"].cast_column("image", datasets.Image(decode=False))
    by_key = {s["__key__"]: s for s in _samples(out)}
    assert len(by_key) == 118
    for row, expected in enumerate(reference):
        key = f"train_{row:06d}"
        if row in bad:
            assert key not in by_key
            continue
        sample = by_key[key]
        stored = expected["image"]["bytes"] or (hub["root"] / expected["image"]["path"]).read_bytes()
        assert sample["jpg"] == stored  # bytes kept as stored (or as the file holds them)
        assert sample.get("cls") == (None if expected["label"] < 0 else str(expected["label"]).encode())
        assert sample["true_cls"] == str(expected["clean_label"]).encode()
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c["name"] for c in classes] == CLASSES and [c["label_name"] for c in classes] == CLASSES


def test_reading_in_small_batches_equals_reading_at_once(hub, saved, tmp_path):
    for root, split in ((hub["root"], "train"), (saved["root"], "train")):
        outs = []
        for batch_size, workers in ((3, 2), (100_000, 1)):  # two worker processes, and one inline
            out = tmp_path / f"{root.name}-{batch_size}"
            config = PackConfig(split=split, per_shard=23, workers=workers, batch_size=batch_size, **LABEL)
            pack_dataset(root, out, config)
            outs.append(out)
        first, second = (json.loads((o / "pack.json").read_text()) for o in outs)
        assert first["fingerprint"] == second["fingerprint"] and first["bad"] == second["bad"]
        assert _shard_bytes(outs[0]) == _shard_bytes(outs[1])


def test_read_batches_never_exceed_the_batch_size_and_cover_the_range(hub):
    source = hf.open_source(hub["root"], split="train", **LABEL)
    spec = source.spec()
    ids = [i for b in hf.read_batches(spec, ["id"], batch_size=1000) for i in b.column(0).to_pylist()]
    assert ids == hub["rows"]["id"]
    for start, stop, size in ((0, 120, 7), (13, 77, 5), (59, 61, 16), (100, 120, 64)):
        batches = list(hf.read_batches(spec, ["id"], start=start, stop=stop, batch_size=size))
        assert all(b.num_rows <= size for b in batches)
        assert [i for b in batches for i in b.column(0).to_pylist()] == ids[start:stop]


def test_save_to_disk_dataset_dict_needs_a_split_and_packs_it(saved, tmp_path):
    with pytest.raises(EngineError, match=r"split: .* has the splits train, test; choose one with --split"):
        pack_dataset(saved["root"], tmp_path / "x", PackConfig(workers=1))
    with pytest.raises(EngineError, match=r"split: got 'valid'; .* has the splits train, test"):
        pack_dataset(saved["root"], tmp_path / "x", PackConfig(split="valid", workers=1))
    summary = pack_dataset(
        saved["root"], tmp_path / "test", PackConfig(split="test", key_column="id", workers=1, **LABEL)
    )
    assert summary["source"] == "hf-arrow" and summary["samples"] == 20 and summary["bad"] == 0
    keys = [s["__key__"] for s in _samples(tmp_path / "test")]
    assert keys == [f"img-6_{i:04d}" for i in range(20)]  # the id column, made safe ('.' and '/' become '_')
    summary = pack_dataset(saved["root"], tmp_path / "train", PackConfig(split="train", workers=1, **LABEL))
    assert summary["samples"] == 59 and summary["bad_examples"][0]["row"] == UNDECODABLE


def test_strict_stops_at_the_first_bad_row(hub, tmp_path):
    with pytest.raises(EngineError, match=rf"--strict: row {UNDECODABLE}: not a decodable image"):
        pack_dataset(hub["root"], tmp_path / "o", PackConfig(split="train", strict=True, workers=1, **LABEL))


def test_resume_skips_finished_shards_and_a_changed_data_file_is_a_new_plan(hub, tmp_path):
    out, config = tmp_path / "out", PackConfig(split="train", per_shard=40, workers=1, **LABEL)
    pack_dataset(hub["root"], out, config)
    before = _shard_bytes(out)
    (out / "shapes-train-000001.tar").unlink()
    again = pack_dataset(hub["root"], out, config)
    assert again["shards"] == {"total": 3, "written": 1, "skipped": 2} and _shard_bytes(out) == before
    copy = tmp_path / "copy"
    (copy / "data").mkdir(parents=True)
    for path in (hub["root"] / "data").iterdir():
        (copy / "data" / path.name).write_bytes(path.read_bytes())
    (copy / "photos").mkdir()
    (copy / "photos/nine.jpg").write_bytes((hub["root"] / "photos/nine.jpg").read_bytes())
    config = PackConfig(split="train", per_shard=40, workers=1, prefix="p", **LABEL)
    pack_dataset(copy, tmp_path / "c", config)
    os.utime(copy / "photos/nine.jpg", ns=(1, 1))  # an image stored by path is part of the plan
    with pytest.raises(EngineError, match="holds output of a different plan"):
        pack_dataset(copy, tmp_path / "c", config)
    os.utime(copy / "data/train-00001-of-00002.parquet", ns=(1, 1))
    with pytest.raises(EngineError, match="data files changed"):
        pack_dataset(copy, tmp_path / "c", config)
    with pytest.raises(EngineError, match=r"split 'train' -> 'test'"):
        pack_dataset(copy, tmp_path / "c", PackConfig(split="test", per_shard=40, workers=1, prefix="p", **LABEL))
    assert pack_dataset(copy, tmp_path / "c", dataclasses.replace(config, overwrite=True))["samples"] == 118


def test_columns_found_from_features_or_named(hub, tmp_path):
    test_file = hub["root"] / "data" / "test-00000-of-00001.parquet"
    with pytest.raises(EngineError, match=r"label-column: the dataset has 2 ClassLabel columns \(label, clean_label\)"):
        hf.open_source(test_file)
    source = hf.open_source(test_file, true_label_column="clean_label")  # the one other ClassLabel is the label
    assert (source.image, source.label, source.split, source.class_names) == ("image", "label", "test", tuple(CLASSES))
    with pytest.raises(EngineError, match=r"image-column: no column 'nope'; the columns are: image, label"):
        hf.open_source(hub["root"], split="test", image_column="nope")
    with pytest.raises(EngineError, match=r"label-column: column 'id' holds string values"):
        hf.open_source(hub["root"], split="test", label_column="id")
    with pytest.raises(EngineError, match=r"shuffle: cannot be combined with --split"):
        PackConfig(split="train", shuffle=0)
    with pytest.raises(EngineError, match=r"shuffle: not available for a Hugging Face dataset"):
        pack_dataset(test_file, tmp_path / "o", PackConfig(shuffle=0))
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    with pytest.raises(EngineError, match=r"label-column: row \d+ has the label [2-5] in 'label', but --class-names"):
        pack_dataset(hub["root"], tmp_path / "o", PackConfig(split="test", class_names=str(names), **LABEL))


def test_a_glob_and_a_single_file_are_roots_too(hub, tmp_path):
    summary = pack_dataset(str(hub["root"] / "data" / "test-*.parquet"), tmp_path / "g", PackConfig(workers=1, **LABEL))
    assert summary["samples"] == 20 and summary["hf"]["split"] == "test"
    single = tmp_path / "cifar.parquet"
    single.write_bytes((hub["root"] / "data/test-00000-of-00001.parquet").read_bytes())
    summary = pack_dataset(single, tmp_path / "s", PackConfig(workers=1, key_column="id", **LABEL))
    assert summary["hf"]["split"] == "train" and summary["samples"] == 20  # no split in the name: `train`
    assert hf.is_dataset(single) and hf.is_dataset(hub["root"]) and not hf.is_dataset(tmp_path / "g")


def test_duplicate_or_empty_ids_are_errors(tmp_path):
    from datasets import Dataset

    rows = _rows(seed=8, shards=1, per_shard=4)
    rows["id"][3] = rows["id"][1]
    Dataset.from_dict(rows, features=_features()).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(EngineError, match=r"keys: 'row 1' and 'row 3' both become the sample key 'img-8_0001'"):
        pack_dataset(tmp_path / "d.parquet", tmp_path / "o", PackConfig(key_column="id", **LABEL))
    rows["id"][3] = ""
    Dataset.from_dict(rows, features=_features()).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(EngineError, match=r"key-column: row 3 has no value in 'id'"):
        pack_dataset(tmp_path / "e.parquet", tmp_path / "o", PackConfig(key_column="id", **LABEL))


def test_underscored_class_names_become_prompt_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"img": Image(), "food": ClassLabel(names=["apple_pie", "baby_back_ribs"])})
    Dataset.from_dict(
        {"img": [{"bytes": _jpeg(i), "path": None} for i in range(3)], "food": [0, 1, 1]}, features
    ).to_parquet(tmp_path / "train-00000-of-00001.parquet")
    pack_dataset(tmp_path, tmp_path / "out", PackConfig(workers=1))
    classes = json.loads((tmp_path / "out/classes.json").read_text())["classes"]
    assert [(c["name"], c["label_name"]) for c in classes] == [
        ("apple pie", "apple_pie"),
        ("baby back ribs", "baby_back_ribs"),
    ]


def _cli(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_pack_embed_select_export_keeps_the_class_names_and_loads_back_with_datasets(hub, tmp_path):
    """As a new user would: a Parquet dataset from the Hub through the command line, and the label
    table back into `datasets`, joined onto the source by key."""
    shards, cache, table = tmp_path / "shards", str(tmp_path / "c.zarr"), str(tmp_path / "labels.parquet")
    out = _cli(
        ["pack", str(hub["root"]), "--split", "train", "--true-label-column", "clean_label"]
        + ["--out", str(shards), "--per-shard", "50", "--workers", "1"]
    )
    assert "packed 118 of 120 rows (split train, 2 data files)" in out and "bad rows: 2" in out
    assert f"bad: row {UNDECODABLE}: not a decodable image" in out and "without a label: 1" in out
    _cli(
        ["embed", str(shards / "*.tar"), "--cache", cache, "--classes", str(shards / "classes.json")]
        + ["--true-label-key", "true_cls", "--workers", "0", "--batch-size", "64"]
    )
    _cli(["select", "--cache", cache, "--device", "cpu"])
    _cli(["export", "--cache", cache, "--out", table])

    labels = datasets.load_dataset("parquet", data_files=table, split="train", cache_dir=str(tmp_path / "hf"))
    for column in ("label", "true_label", "zeroshot/prediction", "linear/prediction"):
        assert labels.features[column] == datasets.ClassLabel(names=CLASSES), column
    assert labels.features["key"] == datasets.Value("string")
    assert labels.features["selected"] == datasets.Value("bool")
    assert len(labels) == 118 and labels.features["label"].int2str(labels[0]["label"]) == labels[0]["class"]
    rows = hub["rows"]
    for entry in labels:
        row = int(entry["key"].rsplit("_", 1)[1])
        assert entry["label"] == rows["label"][row] and entry["true_label"] == rows["clean_label"][row]

    # the docs' join (docs/datasets.md): the selection onto the source rows, by key
    source = datasets.load_dataset(
        "parquet", data_files=str(hub["root"] / "data/train-*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    fixed = dict(zip(labels["key"], labels["selected"]))
    source = source.add_column("selected", [fixed.get(f"train_{i:06d}", False) for i in range(len(source))])
    assert sum(source["selected"]) == sum(labels["selected"]) and not source["selected"][UNDECODABLE]


def test_pyarrow_and_datasets_are_imported_only_when_needed():
    code = "import sys, cli.main, engine.pack, engine.hf, engine.export; print(*(m in sys.modules for m in MODULES))"
    done = subprocess.run(
        [sys.executable, "-c", code.replace("MODULES", "('pyarrow', 'datasets')")],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.stdout.split() == ["False", "False"]

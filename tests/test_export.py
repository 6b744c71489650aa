import contextlib
import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner

from cli.main import cli
from engine.cache import Cache
from engine.embed import EmbedConfig, embed_shards
from engine.export import ShardExportConfig, ShardPattern, export_cache, export_shards, export_table
from engine.results import Selection, Training
from engine.runtime import EngineError
from engine.select import SelectConfig
from engine.stages import select_from_cache, train_from_cache
from engine.synthetic import ShapesConfig, write_shards
from engine.train import TrainConfig


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Own shards (tests move them away and back), one cache embedded with shapes-tiny and selected;
    `untrained` is a copy taken before `trained` got a short MixFix run (which relabels some rows)."""
    root = tmp_path_factory.mktemp("export")
    made = write_shards(
        root / "shards", ShapesConfig(classes=20, per_shard=40, shards=3, noise="mix", rate=0.4, seed=11)
    )
    trained = str(root / "trained.zarr")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_shards(
            made["shards"],
            trained,
            EmbedConfig(classes=made["classes_file"], true_label_key="true_cls", batch_size=64, workers=0),
            show_progress=False,
        )
        select_from_cache(trained, SelectConfig(device="cpu"), show_progress=False)
        untrained = str(root / "untrained.zarr")
        shutil.copytree(trained, untrained)
        train_from_cache(
            trained, TrainConfig(epochs=10, lr=0.1, theta_r=0.5, theta_r2=0.5, device="cpu"), out=str(root / "head.pt")
        )
    finally:
        torch.set_num_threads(before)
    return {"trained": trained, "untrained": untrained, "shards": made["shards"], "root": root}


def _arrays(path):
    cache = Cache(path)
    shard, position = cache.provenance()
    out = {
        "keys": cache.keys().tolist(),
        "labels": cache.labels(),
        "selected": Selection.read(cache).selected,
        "true": cache.true_labels(),
        "shard": shard,
        "position": position,
        "urls": [s["url"] for s in cache.manifest["shards"]],
        "names": cache.class_names,
    }
    if Training.exists(cache):
        trained = Training.read(cache)
        out["mixfix"] = trained.labels
        out["mixfix_selected"] = trained.selection
    return out


def _source_samples(shards):
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def _read_export(out_dir):
    return list(wds.WebDataset(sorted(str(p) for p in out_dir.glob("*.tar")), shardshuffle=False))


@contextlib.contextmanager
def _moved_away(path):
    hidden = str(path) + ".away"
    os.replace(path, hidden)
    try:
        yield
    finally:
        os.replace(hidden, path)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_selected_shards_round_trip_through_webdataset(caches, tmp_path):
    out = tmp_path / "clean"
    r = CliRunner().invoke(
        cli,
        ["export", "--cache", caches["trained"], "--shards", f"{out}/{{000000..}}.tar", "--per-shard", "20", "--json"],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)["shards"]  # stdout holds one JSON object
    a = _arrays(caches["trained"])
    rows = np.flatnonzero(a["selected"])
    assert summary["rows_written"] == len(rows) and summary["written"] == -(-len(rows) // 20)
    assert summary["skipped"] == 0 and summary["samples_per_s"] > 0
    assert sorted(p.name for p in out.glob("*.tar"))[:2] == ["000000.tar", "000001.tar"]
    got = _read_export(out)
    assert [s["__key__"] for s in got] == [a["keys"][i] for i in rows]
    assert [int(s["cls"]) for s in got] == a["mixfix"][rows].tolist()
    assert [int(s["cls_given"]) for s in got] == a["labels"][rows].tolist()
    source = _source_samples(caches["shards"])
    for sample in got:
        original = source[sample["__key__"]]
        assert sample["jpg"] == original["jpg"] and sample["true_cls"] == original["true_cls"]
        meta = {"__url__", "__local_path__"}
        assert set(sample) - meta == set(original) - meta | {"cls_given"}
    assert len(list(wds.WebDataset(str(out / "000000.tar"), shardshuffle=False))) == 20


def test_keep_selected_writes_the_train_groups_labels(caches, tmp_path):
    # MixFix rarely relabels selected rows; a train group that does makes the label source visible
    relabelled = str(tmp_path / "relabelled.zarr")
    shutil.copytree(caches["trained"], relabelled)
    cache = Cache(relabelled, mode="a")
    trained = Training.read(cache)
    labels = trained.labels.copy()
    labels[::2] = (labels[::2] + 1) % 20
    Training(labels=labels, selection=trained.selection, attrs={"config": trained.attrs["config"]}).write(cache)
    export_shards(relabelled, str(tmp_path / "out" / "{0..}.tar"), show_progress=False)
    a = _arrays(relabelled)
    rows = np.flatnonzero(a["selected"])
    got = _read_export(tmp_path / "out")
    assert (labels[rows] != a["labels"][rows]).any()
    assert [int(s["cls"]) for s in got] == labels[rows].tolist()
    assert [int(s["cls_given"]) for s in got] == a["labels"][rows].tolist()


def test_keep_selected_without_train_writes_given_labels(caches, tmp_path):
    summary = export_shards(
        caches["untrained"], str(tmp_path / "c-%04d.tar"), ShardExportConfig(per_shard=1000), show_progress=False
    )
    a = _arrays(caches["untrained"])
    rows = np.flatnonzero(a["selected"])
    got = _read_export(tmp_path)
    assert summary["labels_from"] == "given" and [p.name for p in tmp_path.glob("*.tar")] == ["c-0000.tar"]
    assert [s["__key__"] for s in got] == [a["keys"][i] for i in rows]
    assert [int(s["cls"]) for s in got] == [int(s["cls_given"]) for s in got] == a["labels"][rows].tolist()


def test_keep_all_writes_corrected_labels_and_selected_flag(caches, tmp_path):
    summary = export_shards(
        caches["trained"],
        str(tmp_path / "all" / "{0000..}.tar"),
        ShardExportConfig(keep="all", per_shard=50),
        show_progress=False,
    )
    a = _arrays(caches["trained"])
    got = _read_export(tmp_path / "all")
    assert summary["relabelled"] == int((a["mixfix"] != a["labels"]).sum()) > 0
    assert [s["__key__"] for s in got] == a["keys"]
    assert [int(s["cls"]) for s in got] == a["mixfix"].tolist()
    assert [int(s["cls_given"]) for s in got] == a["labels"].tolist()
    assert [s["selected"] for s in got] == [b"1" if x else b"0" for x in a["selected"]]
    with pytest.raises(EngineError, match="engine train"):
        export_shards(caches["untrained"], str(tmp_path / "x" / "{0..}.tar"), ShardExportConfig(keep="all"))


def test_resume_rewrites_only_missing_or_partial_shards(caches, tmp_path):
    out = tmp_path / "clean"
    pattern, config = f"{out}/{{000000..}}.tar", ShardExportConfig(per_shard=10)
    first = export_shards(caches["trained"], pattern, config, show_progress=False)
    assert first["shards"] >= 3
    names = sorted(p.name for p in out.glob("*.tar"))
    digests = {n: _sha(out / n) for n in names}
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    last, partial = names[-1], names[0]
    (out / last).unlink()
    (out / (last + ".tmp")).write_bytes(b"half a tar")  # left behind by a killed run
    with open(out / partial, "r+b") as handle:
        handle.truncate(1024)
    # a source shard needed only by the finished shards must not even be opened
    a = _arrays(caches["trained"])
    rows = np.flatnonzero(a["selected"])
    needed = {a["urls"][a["shard"][i]] for i in rows[(first["shards"] - 1) * 10 :]} | {
        a["urls"][a["shard"][i]] for i in rows[:10]
    }
    idle = sorted(set(a["urls"]) - needed)
    assert idle, "the plan should leave a source shard unneeded by the shards to rewrite"
    with _moved_away(idle[0]):
        again = export_shards(caches["trained"], pattern, config, show_progress=False)
    assert (again["written"], again["skipped"]) == (2, first["shards"] - 2)
    assert again["rows_written"] == 10 + (len(rows) - (first["shards"] - 1) * 10)
    assert {n: _sha(out / n) for n in names} == digests  # identical bytes
    for n in names[1:-1]:
        assert (out / n).stat().st_mtime_ns == mtimes[n], n
    assert not list(out.glob("*.tmp"))
    recorded = json.loads((out / "export.json").read_text())["shards"]
    assert {n: e["sha256"] for n, e in recorded.items()} == digests
    with pytest.raises(EngineError, match="different plan"):
        export_shards(caches["trained"], pattern, ShardExportConfig(per_shard=40), show_progress=False)
    bigger = export_shards(
        caches["trained"], pattern, ShardExportConfig(per_shard=40, overwrite=True), show_progress=False
    )
    assert sorted(p.name for p in out.glob("*.tar")) == names[: bigger["shards"]]
    assert bigger["written"] == bigger["shards"]


def test_changed_source_shard_is_an_error_and_finished_shards_survive(caches, tmp_path):
    a = _arrays(caches["trained"])
    url = a["urls"][-1]
    samples = list(wds.WebDataset(url, shardshuffle=False))
    with _moved_away(url):
        with wds.TarWriter(url) as sink:
            for i, s in enumerate(samples):
                sink.write({"__key__": s["__key__"] + ("x" if i == 5 else ""), "jpg": s["jpg"], "cls": s["cls"]})
        out = tmp_path / "clean"
        r = CliRunner().invoke(
            cli,
            [
                "export",
                "--cache",
                caches["trained"],
                "--shards",
                f"{out}/{{00..}}.tar",
                "--keep",
                "all",
                "--per-shard",
                "40",
            ],
        )
        os.unlink(url)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "changed since it was embedded" in r.stderr and url in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00.tar", "01.tar", "export.json"]  # no temp left behind
    assert set(json.loads((out / "export.json").read_text())["shards"]) == {"00.tar", "01.tar"}


def test_csv_and_parquet_tables_equal_the_cache(caches, tmp_path):
    import pyarrow.parquet as pq

    a = _arrays(caches["trained"])
    selection = Selection.read(Cache(caches["trained"]))
    export_table(caches["trained"], str(tmp_path / "t.csv"))
    export_cache(caches["trained"], out=str(tmp_path / "t.parquet"), table_format="parquet")
    with open(tmp_path / "t.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    n = len(a["keys"])
    expected_cols = ["key", "label", "class", "selected", "filled", "noise_score"]
    assert len(rows) == n and list(rows[0])[:6] == expected_cols == list(table)[:6]
    last_cols = ["mixfix_label", "mixfix_selected", "true_label", "shard", "position"]
    assert list(rows[0])[-5:] == last_cols == list(table)[-5:]
    assert {"zeroshot/prediction", "linear/consistency/score"} <= set(table)
    assert [r["key"] for r in rows] == table["key"] == a["keys"]
    assert [int(r["label"]) for r in rows] == table["label"] == a["labels"].tolist()
    assert [r["class"] for r in rows] == table["class"] == [a["names"][y] for y in a["labels"]]
    assert [r["selected"] == "True" for r in rows] == table["selected"] == a["selected"].tolist()
    assert [int(r["mixfix_label"]) for r in rows] == table["mixfix_label"] == a["mixfix"].tolist()
    assert table["mixfix_selected"] == a["mixfix_selected"].tolist()
    assert [int(r["true_label"]) for r in rows] == table["true_label"] == a["true"].tolist()
    assert [r["shard"] for r in rows] == table["shard"] == [a["urls"][s] for s in a["shard"]]
    assert [int(r["position"]) for r in rows] == table["position"] == a["position"].tolist()
    assert np.allclose([float(r["noise_score"]) for r in rows], selection.noise_score)
    assert table["zeroshot/prediction"] == selection.classifiers["zeroshot"].prediction.tolist()
    untrained = export_table(caches["untrained"], str(tmp_path / "u.csv"))
    assert "mixfix_label" not in untrained["columns"] and "true_label" in untrained["columns"]


def test_parquet_table_loads_with_datasets_with_class_labels(caches, tmp_path):
    """`datasets.load_dataset("parquet", ...)` reads the table with its class-index columns as
    ClassLabel carrying the cache's class names, every other column with its own type."""
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    a = _arrays(caches["trained"])
    out = str(tmp_path / "t.parquet")
    export_table(caches["trained"], out)
    loaded = datasets.load_dataset("parquet", data_files=out, split="train", cache_dir=str(tmp_path / "hf"))
    names = datasets.ClassLabel(names=list(a["names"]))
    class_columns = ["label", "zeroshot/prediction", "linear/prediction", "mixfix_label", "true_label"]
    assert all(loaded.features[c] == names for c in class_columns)
    assert loaded.features["selected"] == datasets.Value("bool")
    assert loaded.features["noise_score"] == datasets.Value("float32")
    assert loaded.features["key"] == loaded.features["shard"] == datasets.Value("string")
    assert loaded["mixfix_label"] == a["mixfix"].tolist() and loaded["key"] == a["keys"]
    assert [names.int2str(y) for y in loaded["label"]] == loaded["class"]
    assert list(pq.read_table(out).to_pydict()) == list(loaded.features)  # the same columns, in order


def test_train_older_than_selection_is_refused(caches, tmp_path):
    stale = str(tmp_path / "stale.zarr")
    shutil.copytree(caches["trained"], stale)
    cache = Cache(stale, mode="a")
    stored = Selection.read(cache)
    stored.attrs = {k: v for k, v in stored.attrs.items() if k not in ("complete", "written")}
    stored.write(cache)
    with pytest.raises(EngineError, match="predate its selection.*engine train"):
        export_table(stale, str(tmp_path / "t.csv"))


def _one_line_error(args):
    r = CliRunner().invoke(cli, ["export", *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("engine: error: ")
    return r.stderr


def test_cli_errors_are_one_line_and_name_the_problem(caches, tmp_path):
    missing = caches["shards"][1]
    out = tmp_path / "clean"
    with _moved_away(missing):
        err = _one_line_error(["--cache", caches["trained"], "--shards", f"{out}/{{0000..}}.tar", "--per-shard", "5"])
    assert missing in err and "no longer there" in err
    assert not out.exists()  # checked before any writing: no folder, no export.json, no shard
    bare = str(tmp_path / "bare.zarr")
    shutil.copytree(caches["untrained"], bare)
    Cache(bare, mode="a").remove_group("selection")
    err = _one_line_error(["--cache", bare, "--out", str(tmp_path / "t.csv")])
    assert "no selection" in err and "engine select" in err
    err = _one_line_error(["--cache", caches["trained"], "--format", "csv", "--out", str(tmp_path / "t.parquet")])
    assert "t.parquet" in err and "--format csv" in err
    assert not (tmp_path / "t.parquet").exists()
    err = _one_line_error(["--cache", caches["trained"], "--out", str(tmp_path / "t.txt")])
    assert "t.txt" in err and ".csv or .parquet" in err
    assert "nothing to do" in _one_line_error(["--cache", caches["trained"]])
    source = caches["shards"][0]
    before = _sha(source)
    err = _one_line_error(
        ["--cache", caches["trained"], "--shards", source.replace("000000", "{000000..}"), "--overwrite"]
    )
    assert "source shards" in err and _sha(source) == before
    assert "one numbered field" in _one_line_error(["--cache", caches["trained"], "--shards", str(out / "x.tar")])


def test_shard_patterns():
    assert [ShardPattern.parse("o/{000000..}.tar").name(i) for i in (0, 12)] == ["000000.tar", "000012.tar"]
    assert ShardPattern.parse("o/clean-%06d.tar").path(3).as_posix() == "o/clean-000003.tar"
    closed = ShardPattern.parse("o/s-{0005..0006}.tar")
    assert closed.name(0) == "s-0005.tar"
    closed.check_capacity(2)
    with pytest.raises(EngineError, match="names 2 shards but the export needs 3"):
        closed.check_capacity(3)
    for bad in ("o/{0..}/x.tar", "o/x.tar", "o/{0..}-%d.tar", "o/{0..}.tgz"):
        with pytest.raises(EngineError, match="shards: got"):
            ShardPattern.parse(bad)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_overwrite_checks_sources_before_removing_the_old_export(caches, tmp_path):
    out = tmp_path / "clean"
    pattern = f"{out}/{{000000..}}.tar"
    export_shards(caches["trained"], pattern, ShardExportConfig(per_shard=10), show_progress=False)
    before = _snapshot(out)
    assert "export.json" in before and len(before) > 3
    missing = caches["shards"][1]
    with _moved_away(missing):
        err = _one_line_error(["--cache", caches["trained"], "--shards", pattern, "--per-shard", "40", "--overwrite"])
    assert missing in err and "no longer there" in err
    assert _snapshot(out) == before  # the old export's shards and export.json, byte for byte


def test_overwrite_replaces_an_unreadable_export_json(caches, tmp_path, caplog):
    out = tmp_path / "clean"
    pattern = f"{out}/{{000000..}}.tar"
    first = export_shards(caches["trained"], pattern, ShardExportConfig(per_shard=10), show_progress=False)
    manifest = out / "export.json"
    manifest.write_text(manifest.read_text()[:100])  # a torn write
    (out / "notes.txt").write_text("not the export's")
    (out / "other.tar").write_bytes(b"not named by the pattern")
    err = _one_line_error(["--cache", caches["trained"], "--shards", pattern, "--per-shard", "40"])
    assert str(manifest) in err and "unreadable" in err and "--overwrite" in err
    with caplog.at_level("WARNING", logger="engine.outputs"):
        again = export_shards(
            caches["trained"], pattern, ShardExportConfig(per_shard=40, overwrite=True), show_progress=False
        )
    assert any(
        "unreadable" in r.getMessage() and "--overwrite: starting again" in r.getMessage() for r in caplog.records
    )
    assert again["shards"] < first["shards"] and again["written"] == again["shards"]
    names = [f"{j:06d}.tar" for j in range(again["shards"])]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["export.json", "notes.txt", "other.tar"])
    recorded = json.loads(manifest.read_text())
    assert recorded["complete"] and {n: e["sha256"] for n, e in recorded["shards"].items()} == {
        n: _sha(out / n) for n in names
    }


def test_misshapen_export_json_is_a_one_line_error(caches, tmp_path):
    out = tmp_path / "clean"
    out.mkdir()
    manifest = out / "export.json"
    args = ["--cache", caches["trained"], "--shards", f"{out}/{{000000..}}.tar"]
    for text in (
        "[]",
        json.dumps({"format": "engine-export", "fingerprint": "x", "shards": {"000000.tar": 5}}),
        json.dumps({"format": "engine-export", "plan": [], "shards": {}}),
    ):
        manifest.write_text(text)
        err = _one_line_error(args)
        assert str(manifest) in err and "expected" in err, text
    assert sorted(p.name for p in out.iterdir()) == ["export.json"]


def test_verify_rewrites_a_same_size_corrupted_shard(caches, tmp_path):
    out = tmp_path / "clean"
    pattern, config = f"{out}/{{000000..}}.tar", ShardExportConfig(per_shard=10)
    first = export_shards(caches["trained"], pattern, config, show_progress=False)
    victim = out / "000001.tar"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[1024] ^= 0xFF  # inside the first sample's data: same size, other bytes
    victim.write_bytes(bytes(bad))
    fast = export_shards(caches["trained"], pattern, config, show_progress=False)
    assert (fast["written"], fast["skipped"]) == (0, first["shards"])  # the size check alone passes it
    checked = export_shards(
        caches["trained"], pattern, ShardExportConfig(per_shard=10, verify=True), show_progress=False
    )
    assert (checked["written"], checked["skipped"]) == (1, first["shards"] - 1)
    assert victim.read_bytes() == good
    recorded = json.loads((out / "export.json").read_text())
    assert recorded["complete"] and recorded["shards"]["000001.tar"]["sha256"] == _sha(victim)


def test_failed_table_write_leaves_the_previous_table(caches, tmp_path, monkeypatch):
    import engine.stages

    table = tmp_path / "t.csv"
    export_table(caches["trained"], str(table))
    before = table.read_bytes()
    real = engine.stages.write_table

    def write_then_fail(path, columns, **options):
        real(path, columns, **options)
        raise OSError("disk full")

    monkeypatch.setattr(engine.stages, "write_table", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_table(caches["untrained"], str(table))
    assert table.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_shard_patterns_name_files_without_spaces_in_sort_order(caches, tmp_path):
    with pytest.raises(EngineError, match="spaces.*%05d"):
        ShardPattern.parse("o/x-%5d.tar")
    ShardPattern.parse("o/{0..}.tar").check_capacity(10)
    ShardPattern.parse("o/{000000..}.tar").check_capacity(11)
    ShardPattern.parse("o/x-%03d.tar").check_capacity(1000)
    for spec in ("o/{0..}.tar", "o/x-%d.tar", "o/{5..}.tar"):
        with pytest.raises(EngineError, match="would not sort"):
            ShardPattern.parse(spec).check_capacity(11)
    out = tmp_path / "clean"
    err = _one_line_error(["--cache", caches["trained"], "--shards", f"{out}/{{0..}}.tar", "--per-shard", "5"])
    assert "{000000..}" in err and not out.exists()


def test_cli_verify_flag_reaches_the_export(monkeypatch):
    from click.testing import CliRunner

    import engine.export as export_module
    from cli.main import cli

    seen = {}

    def fake_export_cache(cache, **kwargs):
        seen.update(kwargs)
        raise export_module.EngineError("stop here")

    monkeypatch.setattr(export_module, "export_cache", fake_export_cache)
    result = CliRunner().invoke(cli, ["export", "--cache", "x.zarr", "--shards", "o/{000000..}.tar", "--verify"])
    assert result.exit_code == 2 and seen["config"].verify is True

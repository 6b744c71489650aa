import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from engine.classes import load_classes
from engine.pack import PackConfig, encode_image, make_key, pack_dataset, read_list
from engine.reader import check_end_of_archive, decode_image
from engine.runtime import EngineError


def _image(seed: int, size=(20, 16), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _save(path, seed: int, fmt: str, **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    _image(seed, **kw).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _samples(out) -> list[dict]:
    """Every sample of OUT's shards, in shard order, through webdataset's own reader."""
    urls = sorted(glob.glob(os.path.join(out, "*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder: 2 classes, JPEG and PNG files, a BMP, a JPEG named .png, a file name
    with dots, a truncated JPEG, a text file named .jpg and a non-image file."""
    root = tmp_path / "pets"
    sources = {}
    for i in range(4):
        sources[f"alpha/a{i}.jpg"] = _save(root / f"alpha/a{i}.jpg", i, "JPEG")
        sources[f"beta_gamma/b{i}.png"] = _save(root / f"beta_gamma/b{i}.png", 10 + i, "PNG")
    sources["alpha/img.v2.jpg"] = _save(root / "alpha/img.v2.jpg", 20, "JPEG")
    sources["alpha/really_jpeg.png"] = _save(root / "alpha/really_jpeg.png", 21, "JPEG")
    sources["beta_gamma/sub/odd.bmp"] = _save(root / "beta_gamma/sub/odd.bmp", 22, "BMP")
    (root / "alpha/truncated.jpg").write_bytes(sources["alpha/a0.jpg"][:300])
    (root / "beta_gamma/text.jpg").write_text("this is not an image\n")
    (root / "beta_gamma/notes.txt").write_text("ignored: no image extension\n")
    return root, sources


def test_image_folder_round_trip(folder, tmp_path):
    root, sources = folder
    out = tmp_path / "out"
    summary = pack_dataset(root, out, PackConfig(per_shard=3, workers=2), show_progress=False)
    samples = _samples(out)
    by_key = {s["__key__"]: s for s in samples}
    assert len(samples) == len(by_key) == summary["samples"] == len(sources) == 11
    assert set(by_key) == {make_key(p) for p in sources} and "alpha_img_v2" in by_key
    for rel, data in sources.items():
        sample = by_key[make_key(rel)]
        assert int(sample["cls"]) == (0 if rel.startswith("alpha/") else 1)
        if rel.endswith(".bmp"):  # converted, losslessly
            assert "png" in sample and sample["png"] != data
            assert np.array_equal(_pixels(sample["png"]), _pixels(data))
        else:  # stored byte for byte, under the extension its magic bytes say
            ext = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"
            assert sample[ext] == data and set(sample) & {"jpg", "png", "webp"} == {ext}
        decode_image(sample)  # the embed reader accepts it
    assert summary["bad"] == 2 and summary["converted"] == 1 and summary["ignored"] == 1
    manifest = json.loads((out / "pack.json").read_text())
    reasons = {b["path"]: b["reason"] for b in manifest["bad"]}
    assert set(reasons) == {"alpha/truncated.jpg", "beta_gamma/text.jpg"}
    assert all(r.startswith("not a decodable image") for r in reasons.values())
    assert [s["status"] for s in manifest["shards"]] == ["done"] * 5 and manifest["complete"]
    assert sum(s["samples"] for s in manifest["shards"]) == 11
    assert load_classes(str(out / "classes.json")).class_names == ("alpha", "beta gamma")
    assert not list(out.glob("*.partial"))


def _webvision(tmp_path):
    """WebVision-like root (google/qNNNN/*.jpg) with a list, a true list and one missing file."""
    root = tmp_path / "webvision"
    rows = [(f"google/q{q:04d}/{i:08d}.jpg", q) for q in (1, 2) for i in range(3)]
    for n, (rel, _) in enumerate(rows):
        _save(root / rel, n, "JPEG")
    listed = rows + [("google/q0002/99999999.jpg", 1)]
    info = root / "info"
    info.mkdir()
    lines = ["# path label", ""] + [f"{p},{q}" if n == 2 else f"{p} {q}" for n, (p, q) in enumerate(listed)]
    (info / "train_filelist_google.txt").write_text("\n".join(lines) + "\n")
    (info / "true.txt").write_text(f"{rows[0][0]} 5\n{rows[4][0]} 1\n")
    return root, info, rows


def test_list_and_true_list(tmp_path):
    root, info, rows = _webvision(tmp_path)
    out = tmp_path / "out"
    config = PackConfig(
        list_file=str(info / "train_filelist_google.txt"), true_list=str(info / "true.txt"), per_shard=4, workers=1
    )
    summary = pack_dataset(root, out, config, show_progress=False)
    samples = _samples(out)
    assert [s["__key__"] for s in samples] == [make_key(p) for p, _ in rows]  # list order kept
    assert [int(s["cls"]) for s in samples] == [q for _, q in rows]
    truth = {s["__key__"]: int(s["true_cls"]) for s in samples if "true_cls" in s}
    assert truth == {make_key(rows[0][0]): 5, make_key(rows[4][0]): 1}
    assert summary["bad"] == 1 and summary["with_true_label"] == 2 and summary["classes_file"] is None
    bad = summary["bad_examples"][0]
    assert bad["path"] == "google/q0002/99999999.jpg" and bad["reason"].startswith("unreadable")
    assert summary["shards"] == {"total": 2, "written": 2, "skipped": 0}


def test_shuffle_is_a_seeded_permutation(tmp_path):
    root, info, rows = _webvision(tmp_path)
    keys = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        pack_dataset(
            root,
            tmp_path / name,
            PackConfig(list_file=str(info / "train_filelist_google.txt"), shuffle=seed, workers=1),
            show_progress=False,
        )
        keys[name] = [s["__key__"] for s in _samples(tmp_path / name)]
    in_order = [make_key(p) for p, _ in rows]
    assert keys["a"] == keys["b"] and sorted(keys["a"]) == sorted(in_order)
    assert keys["a"] != in_order and keys["a"] != keys["c"]


def test_label_from_name_and_subset(tmp_path):
    root = tmp_path / "animal10n" / "training"
    for n, name in enumerate(["0_00001.jpg", "3_00002.png", "12_00003.jpg", "cat.jpg"]):
        _save(root / name, n, "PNG" if name.endswith(".png") else "JPEG")
    summary = pack_dataset(
        root, tmp_path / "out", PackConfig(label_from_name=r"(\d+)_\d+\.\w+", workers=1), show_progress=False
    )
    assert {s["__key__"]: int(s["cls"]) for s in _samples(tmp_path / "out")} == {
        "0_00001": 0,
        "3_00002": 3,
        "12_00003": 12,
    }
    assert summary["bad"] == 1 and summary["bad_examples"][0]["path"] == "cat.jpg"
    # Clothing1M style: all labels in one list, the split in a key list, clean labels as the true list
    (tmp_path / "noisy_label_kv.txt").write_text("0_00001.jpg 1\n3_00002.png 2\n12_00003.jpg 0\n")
    (tmp_path / "keys.txt").write_text("12_00003.jpg\n0_00001.jpg\nnot_listed.jpg\n")
    summary = pack_dataset(
        root,
        tmp_path / "sub",
        PackConfig(list_file=str(tmp_path / "noisy_label_kv.txt"), subset=str(tmp_path / "keys.txt"), workers=1),
        show_progress=False,
    )
    assert [(s["__key__"], int(s["cls"])) for s in _samples(tmp_path / "sub")] == [("12_00003", 0), ("0_00001", 1)]
    assert summary["bad"] == 1 and summary["bad_examples"][0]["path"] == "not_listed.jpg"


@pytest.mark.parametrize(
    "content,message",
    [
        ("a.jpg 1\nb.jpg\n", r"list\.txt:2: expected 'PATH LABEL'"),
        ("# header\n\na.jpg 1\nb.jpg cat\n", r"list\.txt:4: label 'cat' is not an integer"),
        ("a.jpg -1\n", r"list\.txt:1: label -1 is negative"),
        ("a.jpg 1\n./a.jpg 2\n", r"list\.txt:2: 'a\.jpg' is listed again \(first on line 1\)"),
        ("../outside.jpg 1\n", r"list\.txt:1: path '\.\./outside\.jpg' must be relative to ROOT"),
    ],
)
def test_malformed_list_names_file_and_line(tmp_path, content, message):
    (tmp_path / "list.txt").write_text(content)
    with pytest.raises(EngineError, match=message):
        read_list(tmp_path / "list.txt")


def test_bad_input_is_an_engine_error(tmp_path, folder):
    root, _ = folder
    with pytest.raises(EngineError, match="root: .*missing.* is not a directory"):
        pack_dataset(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(EngineError, match="list: .*nolist.txt.* does not exist"):
        pack_dataset(root, tmp_path / "out", PackConfig(list_file=str(tmp_path / "nolist.txt")))
    with pytest.raises(EngineError, match="out: .* is inside ROOT"):
        pack_dataset(root, root / "shards")
    with pytest.raises(EngineError, match="per-shard: got 0"):
        PackConfig(per_shard=0)
    with pytest.raises(EngineError, match="exactly one"):
        PackConfig(label_from_name=r"\d+")
    (tmp_path / "clash.txt").write_text("alpha/a0.jpg 0\nalpha_a0.png 1\n")
    with pytest.raises(EngineError, match="'alpha/a0.jpg' and 'alpha_a0.png' both become the sample key 'alpha_a0'"):
        pack_dataset(root, tmp_path / "out", PackConfig(list_file=str(tmp_path / "clash.txt")))


def _stamps(out) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def test_resume_rewrites_only_what_is_missing(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    first = pack_dataset(root, out, PackConfig(per_shard=3, workers=1), show_progress=False)
    names = sorted(p.name for p in out.glob("*.tar"))
    original = {n: (out / n).read_bytes() for n in names}
    for n in names:  # back-date, so that any rewrite shows in the mtime
        os.utime(out / n, ns=(1_000_000_000, 1_000_000_000))
    before = _stamps(out)
    (out / names[1]).unlink()
    (out / (names[3] + ".partial")).write_bytes(b"half a shard")  # a killed run's leftover
    again = pack_dataset(root, out, PackConfig(per_shard=3, workers=1), show_progress=False)
    assert again["shards"] == {"total": 5, "written": 1, "skipped": 4}
    after = _stamps(out)
    assert {n for n in names if after[n] != before.get(n)} == {names[1]}
    assert {n: (out / n).read_bytes() for n in names} == original
    assert not list(out.glob("*.partial"))
    assert again["samples"] == first["samples"] and again["bad"] == first["bad"] == 2
    # a different plan into the same folder is refused, then replaces the old shards with --overwrite
    with pytest.raises(EngineError, match=r"different plan \(per_shard 3 -> 4\).*--overwrite"):
        pack_dataset(root, out, PackConfig(per_shard=4, workers=1), show_progress=False)
    replaced = pack_dataset(root, out, PackConfig(per_shard=4, workers=1, overwrite=True), show_progress=False)
    assert replaced["shards"]["total"] == 4 and sorted(p.name for p in out.glob("*.tar")) == names[:4]
    assert len(_samples(out)) == 11


_KILL_SCRIPT = """
import sys
from engine.pack import PackConfig, pack_dataset
pack_dataset(sys.argv[1], sys.argv[2], PackConfig(per_shard=2, workers=1), show_progress=False)
"""


def test_killed_run_leaves_no_half_shard(tmp_path):
    root = tmp_path / "big"
    noise = np.random.default_rng(0).integers(0, 256, size=(384, 384, 3), dtype=np.uint8)
    (root / "c").mkdir(parents=True)
    Image.fromarray(noise).save(root / "c" / "0000.bmp")  # BMP → PNG of noise: slow on purpose
    for i in range(1, 40):
        (root / "c" / f"{i:04d}.bmp").write_bytes((root / "c" / "0000.bmp").read_bytes())
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(root), str(out)])
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("*.tar"))
    assert 0 < len(finished) < 20, "the kill must land mid-run"
    for shard in finished:  # complete archives, or nothing under a final name
        check_end_of_archive(str(shard))
        assert len(list(wds.WebDataset(str(shard), shardshuffle=False))) == 2
    recorded = sum(s["status"] == "done" for s in json.loads((out / "pack.json").read_text())["shards"])
    resumed = pack_dataset(root, out, PackConfig(per_shard=2, workers=2), show_progress=False)
    clean = pack_dataset(root, tmp_path / "clean", PackConfig(per_shard=2, workers=2), show_progress=False)
    assert resumed["samples"] == clean["samples"] == 40 and resumed["shards"]["written"] == 20 - recorded
    assert [p.read_bytes() for p in sorted(out.glob("*.tar"))] == [
        p.read_bytes() for p in sorted((tmp_path / "clean").glob("*.tar"))
    ]


def test_encode_image_formats():
    rgb = _image(1)
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        buffer = io.BytesIO()
        rgb.save(buffer, format=fmt)
        assert encode_image(buffer.getvalue()) == (ext, buffer.getvalue())
    for fmt, mode in (("GIF", "P"), ("TIFF", "CMYK"), ("BMP", "L")):
        buffer = io.BytesIO()
        source = rgb.convert(mode)
        source.save(buffer, format=fmt)
        ext, data = encode_image(buffer.getvalue())
        assert ext == "png" and data[:8] == b"\x89PNG\r\n\x1a\n"
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        assert np.array_equal(_pixels(data), expected)
    with pytest.raises(ValueError, match="not a decodable image"):
        encode_image(b"GIF89a broken")


def test_packed_shards_embed_with_the_same_keys(tmp_path):
    from engine import synthetic
    from engine.cache import Cache
    from engine.embed import EmbedConfig, embed_shards

    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for n in range(30):
        label = n % 3
        path = root / synthetic.class_names(3)[label].replace(" ", "_") / f"{n:03d}.{'jpg' if n % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic.draw_image(label, rng, num_classes=3).save(path)
    out = tmp_path / "out"
    packed = pack_dataset(root, out, PackConfig(per_shard=8, workers=1), show_progress=False)
    assert packed["samples"] == 30 and packed["bad"] == 0
    pack_labels = {s["__key__"]: int(s["cls"]) for s in _samples(out)}
    summary = embed_shards(
        [str(out / "*.tar")],
        str(tmp_path / "feats.zarr"),
        EmbedConfig(classes=packed["classes_file"], batch_size=8, workers=0),
        show_progress=False,
    )
    assert summary["rows"] == 30 and not summary["failed"] and summary["bad_samples"] == 0
    cache = Cache(tmp_path / "feats.zarr")
    assert dict(zip(cache.keys().tolist(), cache.labels().tolist())) == pack_labels
    assert cache.text_features()[0].shape[0] == 3


def test_cli_json_and_one_line_errors(folder, tmp_path):
    root, _ = folder
    runner = CliRunner()
    r = runner.invoke(
        cli, ["pack", str(root), "--out", str(tmp_path / "out"), "--per-shard", "4", "--workers", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # one JSON object, nothing else on stdout
    assert summary["samples"] == 11 and summary["shards"]["total"] == 4 and summary["bad"] == 2
    r = runner.invoke(cli, ["pack", str(root), "--out", str(tmp_path / "out"), "--per-shard", "4", "--workers", "1"])
    assert r.exit_code == 0 and "0 written, 4 skipped" in r.stdout and "next: engine embed" in r.stdout
    for args, needle in (
        (["--per-shard", "0"], "per-shard: got 0"),
        (["--list", str(tmp_path / "nope.txt")], "nope.txt"),
        (["--per-shard", "5"], "different plan"),
    ):
        r = runner.invoke(cli, ["pack", str(root), "--out", str(tmp_path / "out"), *args])
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert r.stdout == ""


def test_subset_paths_may_hold_spaces(tmp_path):
    root = tmp_path / "shots"
    for n, rel in enumerate(["my class/a 1.jpg", "my class/a 2.jpg", "other/b.jpg"]):
        _save(root / rel, n, "JPEG")
    # a bare path with spaces, a `PATH LABEL` line (the label is dropped, as in a kv list), trailing blanks
    (tmp_path / "keys.txt").write_text("my class/a 1.jpg\nother/b.jpg 1\nmy class/a 2.jpg  \n")
    summary = pack_dataset(
        root, tmp_path / "out", PackConfig(subset=str(tmp_path / "keys.txt"), workers=1), show_progress=False
    )
    assert [(s["__key__"], int(s["cls"])) for s in _samples(tmp_path / "out")] == [
        ("my_class_a_1", 0),
        ("other_b", 1),
        ("my_class_a_2", 0),
    ]
    assert summary["bad"] == 0 and summary["files"] == 3


def test_overwrite_gets_past_an_unreadable_manifest(folder, tmp_path, caplog):
    root, _ = folder
    out, clean = tmp_path / "out", tmp_path / "clean"
    pack_dataset(root, clean, PackConfig(per_shard=3, workers=1), show_progress=False)
    pack_dataset(root, out, PackConfig(per_shard=3, workers=1), show_progress=False)
    (out / "pack.json").write_text('{"format": 1, "shards": [')  # cut off mid-write
    (out / "pets-000001.tar").write_bytes(b"stale")
    (out / "pets-000002.tar.partial").write_bytes(b"half a shard")
    with pytest.raises(EngineError, match=r"pack\.json is unreadable .*use --overwrite"):
        pack_dataset(root, out, PackConfig(per_shard=3, workers=1), show_progress=False)
    with caplog.at_level("WARNING", logger="engine.pack"):
        again = pack_dataset(root, out, PackConfig(per_shard=3, workers=1, overwrite=True), show_progress=False)
    assert any("pack.json is unreadable" in r.getMessage() and "--overwrite" in r.getMessage() for r in caplog.records)
    assert again["shards"] == {"total": 5, "written": 5, "skipped": 0} and again["samples"] == 11
    assert not list(out.glob("*.partial"))
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {p.name: p.read_bytes() for p in clean.glob("*.tar")}
    assert json.loads((out / "pack.json").read_text())["complete"]


def test_malformed_manifest_is_a_one_line_error(folder, tmp_path, caplog):
    root, _ = folder
    out = tmp_path / "out"
    runner = CliRunner()
    command = ["pack", str(root), "--out", str(out), "--per-shard", "3", "--workers", "1"]
    assert runner.invoke(cli, command).exit_code == 0
    good = json.loads((out / "pack.json").read_text())
    for change, extra, needle in (
        (lambda m: {**m, "plan": 3}, ["--per-shard", "4"], "'plan' is a number, expected an object"),
        (lambda m: [m], [], "the top level is an array, expected an object"),
        (lambda m: {**m, "shards": [1] + m["shards"][1:]}, [], "shards[0] is a number, expected an object"),
        (lambda m: {**m, "bad": [None]}, [], "bad[0] is null, expected an object"),
    ):
        (out / "pack.json").write_text(json.dumps(change(good)))
        r = runner.invoke(cli, command + extra)
        assert r.exit_code == 2 and r.stdout == "", (r.output, r.exception)
        assert f"{out / 'pack.json'} is not a pack manifest ({needle})" in r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr
    # --overwrite starts again (with a warning); a done record without its counts is rewritten, not trusted
    with caplog.at_level("WARNING", logger="engine.pack"):
        r = runner.invoke(cli, command + ["--overwrite", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["shards"]["written"] == 5, r.output
    assert any("is not a pack manifest" in rec.getMessage() for rec in caplog.records)
    broken = json.loads((out / "pack.json").read_text())
    del broken["shards"][2]["samples"]
    (out / "pack.json").write_text(json.dumps(broken))
    r = runner.invoke(cli, command + ["--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["shards"]["written"] == 1, r.output


def test_negative_shuffle_seed_is_an_engine_error(folder, tmp_path):
    root, _ = folder
    with pytest.raises(EngineError, match=r"^shuffle: got -1, expected a seed of 0 or more$"):
        PackConfig(shuffle=-1)
    r = CliRunner().invoke(cli, ["pack", str(root), "--out", str(tmp_path / "out"), "--shuffle", "-1"])
    assert r.exit_code == 2 and r.stderr == "engine: error: shuffle: got -1, expected a seed of 0 or more\n"
    assert not (tmp_path / "out").exists()


def test_changed_images_change_the_plan(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    config = PackConfig(per_shard=3, workers=1)
    first = pack_dataset(root, out, config, show_progress=False)
    assert pack_dataset(root, out, config, show_progress=False)["shards"]["written"] == 0  # unchanged: nothing to do
    stamp = (root / "alpha/a1.jpg").stat()
    os.utime(root / "alpha/a1.jpg", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 5_000_000_000))  # touched
    with pytest.raises(
        EngineError,
        match=r"different plan \(the files, their labels, or their sizes or "
        r"modification times changed\).*--overwrite",
    ):
        pack_dataset(root, out, config, show_progress=False)
    touched = pack_dataset(root, out, PackConfig(per_shard=3, workers=1, overwrite=True), show_progress=False)
    assert touched["fingerprint"] != first["fingerprint"] and touched["samples"] == first["samples"]
    _save(root / "alpha/truncated.jpg", 30, "JPEG")  # the broken image is fixed
    with pytest.raises(EngineError, match="different plan"):
        pack_dataset(root, out, config, show_progress=False)
    fixed = pack_dataset(root, out, PackConfig(per_shard=3, workers=1, overwrite=True), show_progress=False)
    assert fixed["samples"] == first["samples"] + 1 and fixed["bad"] == first["bad"] - 1


def test_list_option_naming_a_directory(folder, tmp_path):
    root, _ = folder
    with pytest.raises(EngineError, match=r"^list: .* is a directory, expected a file$"):
        pack_dataset(root, tmp_path / "out", PackConfig(list_file=str(tmp_path)))
    with pytest.raises(EngineError, match=r"^subset: .* is a directory, expected a file$"):
        pack_dataset(root, tmp_path / "out", PackConfig(subset=str(root)))


def test_symlink_cycle_is_walked_once(tmp_path):
    root = tmp_path / "linked"
    _save(root / "c/a.jpg", 0, "JPEG")
    _save(root / "c/sub/b.jpg", 1, "JPEG")
    os.symlink(root / "c", root / "c/sub/loop")  # c/sub/loop -> c: a cycle
    summary = pack_dataset(root, tmp_path / "out", PackConfig(workers=1), show_progress=False)
    assert sorted(s["__key__"] for s in _samples(tmp_path / "out")) == ["c_a", "c_sub_b"]
    assert summary["files"] == 2


def test_pool_start_method(monkeypatch):
    import pickle

    from engine import pack

    task = {"index": 0, "path": "/out/x-000000.tar", "root": "/root", "entries": [("a b.jpg", "a_b", 1, None)]}
    assert pickle.loads(pickle.dumps((pack.write_shard, task))) == (pack.write_shard, task)
    monkeypatch.setattr(sys, "platform", "linux")
    assert "torch" in sys.modules and pack._start_method() == "forkserver"  # never fork a process holding torch
    monkeypatch.delitem(sys.modules, "torch")
    assert pack._start_method() == "fork"


_STOP_SCRIPT = """
import sys
from engine.pack import PackConfig, pack_dataset
pack_dataset(sys.argv[1], sys.argv[2], PackConfig(per_shard=2, workers=2), show_progress=False)
"""


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
    """40 noise BMPs (BMP → PNG of noise: slow on purpose) and their clean 2-per-shard pack."""
    base = tmp_path_factory.mktemp("slow")
    root = base / "big"
    noise = np.random.default_rng(0).integers(0, 256, size=(384, 384, 3), dtype=np.uint8)
    (root / "c").mkdir(parents=True)
    Image.fromarray(noise).save(root / "c" / "0000.bmp")
    for i in range(1, 40):
        (root / "c" / f"{i:04d}.bmp").write_bytes((root / "c" / "0000.bmp").read_bytes())
    clean = pack_dataset(root, base / "clean", PackConfig(per_shard=2, workers=1), show_progress=False)
    assert clean["samples"] == 40
    return root, [p.read_bytes() for p in sorted((base / "clean").glob("*.tar"))]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed-job"])
def test_stopped_pool_leaves_no_half_shard(slow_folder, tmp_path, signum):
    """Ctrl-C (SIGINT to the whole process group: workers finish their shard) or a killed job
    (SIGKILL to the group) while 2 workers write: no half shard under a final name, and a rerun
    gives the same bytes as a clean run."""
    root, clean = slow_folder
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOP_SCRIPT, str(root), str(out)], start_new_session=True, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signum)
    assert proc.wait(timeout=60) != 0
    if signum == signal.SIGINT:  # the running shards were finished, nothing half-written is left
        assert not list(out.glob("*.partial"))
    else:  # give the orphaned pool helpers a moment to go
        time.sleep(0.2)
    finished = sorted(out.glob("*.tar"))
    assert 0 < len(finished) < 20, "the stop must land mid-run"
    for shard in finished:
        check_end_of_archive(str(shard))
        assert len(list(wds.WebDataset(str(shard), shardshuffle=False))) == 2
    resumed = pack_dataset(root, out, PackConfig(per_shard=2, workers=2), show_progress=False)
    assert resumed["samples"] == 40 and not list(out.glob("*.partial"))
    assert [p.read_bytes() for p in sorted(out.glob("*.tar"))] == clean


def test_strict_stops_at_the_first_bad_image_and_keeps_nothing_half_written(tmp_path):
    from engine.pack import PackConfig, pack_dataset

    root = tmp_path / "root"
    for k, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            _image(k * 10 + i).save(root / name / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(EngineError, match=r"--strict: b/broken\.jpg: "):
        pack_dataset(root, tmp_path / "out", PackConfig(per_shard=100, workers=1, strict=True), show_progress=False)
    assert not list((tmp_path / "out").glob("*.tar*"))
    relaxed = pack_dataset(root, tmp_path / "out", PackConfig(per_shard=100, workers=1), show_progress=False)
    assert relaxed["bad"] == 1 and relaxed["samples"] == 6

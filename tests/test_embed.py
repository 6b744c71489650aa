import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset as wds

from engine.append import CacheWriter
from engine.cache import Cache
from engine.embed import EmbedConfig, embed_shards, write_prompts
from engine.runtime import EngineError

CFG = EmbedConfig(classes="shapes:20", true_label_key="true_cls", batch_size=16, workers=0)


def _embed(shards, cache, **kw):
    cfg = EmbedConfig(**{**CFG.__dict__, **kw})
    return embed_shards(list(shards), str(cache), cfg, show_progress=False)


def _rows(cache_path):
    c = Cache(cache_path)
    keys = c.keys().tolist()
    order = np.argsort(keys)
    return (np.asarray(keys)[order], c.load_features()[order], c.labels()[order], c.true_labels()[order])


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, shard_paths):
    path = tmp_path_factory.mktemp("clean") / "feats.zarr"
    summary = _embed(shard_paths, path)
    return path, summary


def test_round_trip(clean_cache, shard_paths):
    path, summary = clean_cache
    assert summary["rows"] == 120 and summary["shards"]["done"] == 3 and not summary["failed"]
    cache = Cache(path)
    samples = {s["__key__"]: s for s in wds.WebDataset(shard_paths, shardshuffle=False)}
    keys = cache.keys()
    assert set(keys) == set(samples)
    assert [int(samples[k]["cls"]) for k in keys] == cache.labels().tolist()
    assert [int(samples[k]["true_cls"]) for k in keys] == cache.true_labels().tolist()
    feats = cache.load_features().astype(np.float32)
    assert feats.dtype == np.float32 and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=2e-3)
    shard, position = cache.provenance()
    urls = [s["url"] for s in cache.manifest["shards"]]
    first = list(wds.WebDataset(urls[shard[5]], shardshuffle=False))[position[5]]
    assert first["__key__"] == keys[5]
    text, mask = cache.text_features()
    assert text.shape[:2] == mask.shape and text.shape[0] == 20


@pytest.mark.parametrize("precision,atol", [("fp32", 2e-3), ("bf16", 2e-2)])
def test_features_match_direct_model_call(tmp_path, shard_paths, precision, atol):
    import torch

    from engine.models import load_model
    from engine.reader import decode_image

    path = tmp_path / "c.zarr"
    _embed([shard_paths[0]], path, precision=precision)
    cache = Cache(path)
    assert cache.manifest["precision"] == precision
    m = load_model("shapes-tiny")
    sample = next(iter(wds.WebDataset(shard_paths[0], shardshuffle=False)))
    with torch.inference_mode():  # the reference always in fp32: bf16 must stay close to it
        ref = m.model.encode_image(m.preprocess(decode_image(sample))[None], normalize=True)[0].numpy()
    row = cache.row_of(sample["__key__"])
    assert np.abs(cache.read_features(row, row + 1)[0].astype(np.float32) - ref).max() < atol


def test_cpu_split_leaves_the_model_the_cores_the_workers_do_not_use():
    import torch

    from engine.embed import plan_cpu_split

    cores = len(__import__("os").sched_getaffinity(0))
    workers, threads = plan_cpu_split(None, torch.device("cpu"))
    assert workers == max(1, cores // 2) and 1 <= threads <= max(1, cores - workers)
    assert plan_cpu_split(3, torch.device("cuda"))[1] is None


def test_rerun_skips_and_appends(clean_cache, tmp_path, shard_paths):
    path = tmp_path / "c.zarr"
    _embed(shard_paths[:2], path)
    again = _embed(shard_paths[:2], path)
    assert again["new_rows"] == 0 and again["shards"]["skipped"] == 2 and again["seconds"]["total"] < 1.0
    more = _embed(shard_paths, path)
    assert more["new_rows"] == 40 and more["rows"] == 120
    for a, b in zip(_rows(path), _rows(clean_cache[0])):
        assert np.array_equal(a, b)


def _write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_bad_samples_are_counted_and_skipped(tmp_path, shard_paths):
    samples = list(wds.WebDataset(shard_paths[0], shardshuffle=False))[:10]
    clean = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples]
    clean[2]["jpg"] = b"not a jpeg at all"
    del clean[4]["cls"]
    clean[6] = {"__key__": clean[6]["__key__"], "cls": b"1"}  # no image at all
    shard = tmp_path / "bad.tar"
    _write_shard(shard, clean)
    summary = _embed([str(shard)], tmp_path / "c.zarr")
    assert summary["bad_samples"] == 2 and summary["rows"] == 8 and summary["missing_labels"] == 1
    reasons = {b["key"]: b["reason"] for b in summary["bad_examples"]}
    assert "cannot decode jpg" in reasons[clean[2]["__key__"]] and "no image" in reasons[clean[6]["__key__"]]
    cache = Cache(tmp_path / "c.zarr")
    assert cache.labels()[cache.row_of(clean[4]["__key__"])] == -1
    assert cache.manifest["shards"][0]["bad_count"] == 2
    with pytest.raises(EngineError, match="--strict"):
        _embed([str(shard)], tmp_path / "strict.zarr", strict=True)


def test_truncated_shard_fails_alone_and_is_retried(tmp_path, shard_paths):
    data = open(shard_paths[1], "rb").read()
    broken = tmp_path / "b-1.tar"
    broken.write_bytes(data[: len(data) // 2])
    good = tmp_path / "a-0.tar"
    good.write_bytes(open(shard_paths[0], "rb").read())
    path = tmp_path / "c.zarr"
    summary = _embed([str(good), str(broken)], path)
    assert summary["shards"]["done"] == 1 and len(summary["failed"]) == 1
    assert summary["failed"][0]["url"].endswith("b-1.tar") and summary["rows"] == 40
    assert Cache(path).manifest["shards"][1]["status"] == "failed"
    broken.write_bytes(data)  # the user fixes the file and reruns
    retry = _embed([str(good), str(broken)], path)
    assert retry["shards"]["done"] == 1 and retry["rows"] == 80 and not retry["failed"]


def test_missing_shard_and_empty_spec_fail_before_work(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        _embed([str(tmp_path / "nope.tar")], tmp_path / "c.zarr")
    with pytest.raises(EngineError, match="no shard"):
        _embed([], tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


def test_duplicate_keys_name_both_shards(tmp_path, shard_paths):
    copy = tmp_path / "copy.tar"
    copy.write_bytes(open(shard_paths[0], "rb").read())
    path = tmp_path / "c.zarr"
    _embed([shard_paths[0]], path)
    with pytest.raises(EngineError, match=r"already in shard .*shapes-000000\.tar"):
        _embed([str(copy)], path)
    assert Cache(path).num_rows == 40


def test_a_duplicate_appended_by_another_job_meanwhile_is_still_caught(tmp_path, shard_paths):
    """Two jobs (two Cache objects) on one cache: the second job's rows are appended after the
    first job built its key map, and a shard of the first job repeating one of those keys
    is refused, not appended twice."""
    path = tmp_path / "c.zarr"
    _embed([shard_paths[0]], path)
    first, second = CacheWriter(path), CacheWriter(path)
    first.run_id, second.run_id = "job1", "job2"
    first.key_rows()  # job 1 has looked its keys up once
    index = first.register_shards(["x/a.tar", "x/b.tar"])
    dim = first.dim

    def stage(cache, url, keys):
        n = len(keys)
        cache.stage_shard(
            index[url],
            features=np.ones((n, dim), np.float16),
            keys=keys,
            labels=np.zeros(n, np.int32),
            true_labels=np.zeros(n, np.int32),
            positions=np.arange(n, dtype=np.int32),
            outcome={"url": url, "bad": []},
        )

    stage(second, "x/b.tar", ["job2-only-0", "job2-only-1"])
    second.consolidate()
    stage(first, "x/a.tar", ["fresh", "job2-only-1"])
    with pytest.raises(
        EngineError, match=r"duplicate key 'job2-only-1' in shard x/a\.tar is already in shard x/b\.tar"
    ):
        first.consolidate()
    cache = Cache(path)
    assert cache.num_rows == 42 and sorted(cache.keys().tolist()).count("job2-only-1") == 1


def test_other_model_is_refused(tmp_path, shard_paths):
    import shutil

    from engine.models import BUNDLED

    path = tmp_path / "c.zarr"
    _embed([shard_paths[0]], path)
    other = tmp_path / "other.safetensors"
    shutil.copy(BUNDLED["shapes-tiny"] / "open_clip_model.safetensors", other)
    with pytest.raises(EngineError, match="holds features of shapes-tiny"):
        _embed([shard_paths[1]], path, pretrained=str(other))
    assert Cache(path).num_rows == 40


def test_prompts_leave_image_features_untouched(tmp_path, shard_paths):
    path = tmp_path / "c.zarr"
    _embed([shard_paths[0]], path)
    before = Cache(path).load_features().copy()
    summary = write_prompts(str(path), "shapes:12", device="cpu")
    cache = Cache(path)
    assert summary["classes"] == 12 and cache.text_features()[0].shape[0] == 12
    assert np.array_equal(before, cache.load_features())


def _rows_so_far(path) -> int:
    """Rows of a cache another process is creating (0 until its schema is written)."""
    try:
        return Cache(path).num_rows
    except EngineError:
        return 0


def test_killed_run_resumes_to_the_same_cache(tmp_path, clean_cache, shard_paths):
    path = tmp_path / "killed.zarr"
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "embed",
        *shard_paths,
        "--cache",
        str(path),
        "--classes",
        "shapes:20",
        "--true-label-key",
        "true_cls",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ]
    env = {**os.environ, "ENGINE_TEST_SLOW_WRITE": "0.3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once at least one shard is committed and another is underway
        if (path / "zarr.json").exists() and _rows_so_far(path) >= 40:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Cache(path).num_rows
    assert 0 < partial < 120, partial
    subprocess.run(cmd, check=True, capture_output=True)
    for a, b in zip(_rows(path), _rows(clean_cache[0])):
        assert np.array_equal(a, b)
    cache = Cache(path)
    assert cache.num_rows == 120 and len(set(cache.keys())) == 120
    assert all(s["status"] == "done" for s in cache.manifest["shards"])


def test_shard_without_any_good_sample_is_done_with_zero_rows(tmp_path, shard_paths):
    samples = list(wds.WebDataset(shard_paths[0], shardshuffle=False))[:3]
    bad = [{"__key__": s["__key__"], "jpg": b"garbage", "cls": b"1"} for s in samples]
    shard = tmp_path / "allbad.tar"
    _write_shard(shard, bad)
    path = tmp_path / "c.zarr"
    _embed([shard_paths[1]], path)
    summary = _embed([str(shard)], path)
    assert summary["bad_samples"] == 3 and summary["rows"] == 40 and not summary["failed"]
    assert Cache(path).manifest["shards"][1]["status"] == "done"


def test_strict_stops_with_one_line_and_commits_nothing_of_that_shard(tmp_path, shard_paths):
    from click.testing import CliRunner

    from cli.main import cli

    samples = list(wds.WebDataset(shard_paths[0], shardshuffle=False))[:4]
    rows = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples]
    rows[2]["jpg"] = b"broken"
    shard = tmp_path / "bad.tar"
    _write_shard(shard, rows)
    r = CliRunner().invoke(
        cli,
        [
            "embed",
            str(shard),
            "--cache",
            str(tmp_path / "c.zarr"),
            "--strict",
            "--workers",
            "1",
            "--classes",
            "shapes:20",
        ],
    )
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and "--strict" in r.stderr and rows[2]["__key__"] in r.stderr
    assert Cache(tmp_path / "c.zarr").num_rows == 0


def test_a_mistyped_cache_path_is_an_error_not_a_new_directory(tmp_path):
    from engine.select import SelectConfig
    from engine.stages import select_from_cache

    with pytest.raises(EngineError, match="not a feature cache"):
        select_from_cache(str(tmp_path / "typo.zarr"), SelectConfig())
    assert not (tmp_path / "typo.zarr").exists()


def test_ranks_without_a_rendezvous_address_fail_before_any_work(tmp_path, shard_paths, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(EngineError, match="MASTER_ADDR.*torchrun"):
        embed_shards(shard_paths, str(tmp_path / "c.zarr"), CFG, rank=0, world_size=2)
    assert not (tmp_path / "c.zarr").exists()


def test_staging_debris_of_killed_writers_is_removed_once_its_shard_is_done(tmp_path, shard_paths):
    import zarr

    path = tmp_path / "c.zarr"
    _embed(shard_paths[:1], path)
    sid = Cache(path).manifest["shards"][0]["id"]
    staging = zarr.open_group(str(path), mode="a").require_group("staging")
    staging.create_group(f"{sid}-uncommitted").create_array("keys", shape=(3,), dtype="int32")
    half = staging.create_group(f"{sid}-halfdeleted")
    half.create_array("features", shape=(3, 4), dtype="float16")
    os.remove(path / "staging" / f"{sid}-halfdeleted" / "zarr.json")  # killed inside a delete
    other = staging.create_group("0123456789abcdef-pending")  # a shard not done: kept
    assert sorted(os.listdir(path / "staging")) == sorted(
        [f"{sid}-uncommitted", f"{sid}-halfdeleted", "0123456789abcdef-pending", "zarr.json"]
    )
    summary = _embed(shard_paths[:1], path)
    assert summary["shards"]["skipped"] == 1
    assert sorted(os.listdir(path / "staging")) == ["0123456789abcdef-pending", "zarr.json"]
    assert other is not None and Cache(path).num_rows == 40


def test_a_done_shard_rewritten_under_the_same_name_is_an_error_not_skipped(tmp_path, shard_paths):
    import shutil

    shard = tmp_path / "s.tar"
    shutil.copy(shard_paths[0], shard)
    path = tmp_path / "c.zarr"
    _embed([str(shard)], path)
    before = Cache(path).load_features().copy()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(shard, copy / "s.tar")  # a plain copy (new mtime, same bytes) is the same shard
    os.utime(shard, (0, 0))
    assert _embed([str(shard)], path)["shards"]["skipped"] == 1
    shutil.copy(shard_paths[1], shard)  # other contents under the embedded name
    with pytest.raises(EngineError, match=r"changed since they were embedded.*s\.tar.*new --cache"):
        _embed([str(shard)], path)
    np.testing.assert_array_equal(Cache(path).load_features(), before)


def test_the_manifest_is_written_per_consolidation_not_per_shard(tmp_path, shard_paths, monkeypatch):
    import engine.embed as embed_module

    writes = []
    original = CacheWriter._write_manifest
    monkeypatch.setattr(CacheWriter, "_write_manifest", lambda self, m: (writes.append(1), original(self, m)))
    counts = {}
    for every in (0.0, 3600.0):
        monkeypatch.setattr(embed_module, "CONSOLIDATE_EVERY_S", every)
        writes.clear()
        path = tmp_path / f"c{int(every)}.zarr"
        _embed(shard_paths, path)
        counts[every] = len(writes)
        assert Cache(path).num_rows == 120 and [s["status"] for s in Cache(path).manifest["shards"]] == ["done"] * 3
    assert counts[3600.0] == counts[0.0] - 1  # 3 shards: 3 appends each alone, or 1 at the first + 1 at the end


# ----------------------------------------------------------------------------- decoding at the hardware limit


def _photos(n: int, size=(500, 375), seed=0) -> list[bytes]:
    """Photo-like JPEGs: crops and flips of scikit-learn's sample photographs, resized to `size`."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    bases = [Image.fromarray(a) for a in load_sample_images().images]
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        base = bases[int(rng.integers(len(bases)))]
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = base.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def test_reduced_decoding_keeps_both_sides_and_the_features():
    """Draft decoding of photos at the bundled model's 64 px: both sides stay >= the draft size, PNGs
    are untouched, and the features stay within cosine 0.995 of full decoding (mean over photos of
    three sizes; measured 0.9995)."""
    import io

    import torch
    from PIL import Image

    from engine import models
    from engine.embed import draft_size
    from engine.reader import decode_image

    loaded = models.load_model("shapes-tiny", None, device="cpu")
    draft = draft_size(loaded.identity, CFG)
    assert draft == 80  # 1.25 x 64
    cosines = []
    for size in ((256, 341), (500, 375), (1024, 768)):
        for data in _photos(12, size, seed=size[0]):
            small = decode_image({"jpg": data}, draft=draft)
            assert min(small.size) >= draft and small.size[0] < size[0]
            full = loaded.preprocess(decode_image({"jpg": data}))
            reduced = loaded.preprocess(small)
            with torch.inference_mode():
                a, b = loaded.model.encode_image(torch.stack([full, reduced]), normalize=True)
            cosines.append(float(a @ b))
    assert np.mean(cosines) >= 0.995 and min(cosines) >= 0.98, (np.mean(cosines), min(cosines))
    png = io.BytesIO()
    Image.new("RGB", (400, 300), "red").save(png, format="PNG")
    assert decode_image({"png": png.getvalue()}, draft=draft).size == (400, 300)
    assert draft_size(loaded.identity, EmbedConfig(exact_decode=True)) is None


def test_stripes_read_every_sample_once_and_merge_outcomes_in_position_order(tmp_path):
    import torch

    from engine.reader import ReaderConfig, ShardOutcome, ShardReader, merge_outcomes, stripes_for

    samples = [{"__key__": f"s{i:03d}", "jpg": data, "cls": b"1"} for i, data in enumerate(_photos(10, (80, 60)))]
    samples[3]["jpg"] = b"broken"
    samples[8]["jpg"] = b"broken too"
    path = tmp_path / "one.tar"
    _write_shard(path, samples)
    config = ReaderConfig(batch_size=2)
    whole = list(ShardReader([(0, str(path))], lambda im: torch.zeros(1), config)._read_shard(0, str(path)))
    parts = [
        list(ShardReader([(0, str(path))], lambda im: torch.zeros(1), config)._read_shard(0, str(path), j, 3))
        for j in range(3)
    ]
    keys = sorted(k for p in parts for b in p for k in b.keys)
    assert keys == sorted(k for b in whole for k in b.keys) and len(keys) == 8
    outcomes = [p[-1].outcome for p in parts]
    assert [o.stripe for o in outcomes] == [0, 1, 2] and all(o.samples == 10 for o in outcomes)
    merged = merge_outcomes(outcomes)
    assert merged.bad == whole[-1].outcome.bad and [k for k, _ in merged.bad] == ["s003", "s008"]
    assert merge_outcomes([ShardOutcome(0, "u")]).stripes == 1
    assert [stripes_for(s, 16) for s in (1, 3, 8, 16, 40)] == [16, 5, 2, 1, 1]
    assert stripes_for(8, 14) == 5 and stripes_for(2, 2) == stripes_for(0, 4) == 1 and stripes_for(1, 2) == 2


def test_fewer_shards_than_workers_still_gives_the_same_cache(tmp_path, shard_paths):
    """One shard, two decode workers: each reads every other sample; the rows land in sample order,
    exactly as one worker would write them."""
    one = _embed(shard_paths[:1], tmp_path / "one.zarr", workers=0)
    two = _embed(shard_paths[:1], tmp_path / "two.zarr", workers=2)
    assert two["decode"]["stripes"] == 2 and two["workers"] == 2 and one["rows"] == two["rows"] == 40
    a, b = Cache(tmp_path / "one.zarr"), Cache(tmp_path / "two.zarr")
    assert a.keys().tolist() == b.keys().tolist()
    # other batches (every other sample) and thread counts: equal up to bf16 rounding
    np.testing.assert_allclose(a.load_features().astype(np.float32), b.load_features().astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(a.provenance()[1], b.provenance()[1])
    np.testing.assert_array_equal(a.labels(), b.labels())


def test_a_cache_keeps_one_decoding_mode(tmp_path, shard_paths):
    path = tmp_path / "c.zarr"
    _embed(shard_paths[:1], path)
    assert Cache(path).identity["preprocess"]["decode"] == "reduced"
    with pytest.raises(EngineError, match="rerun without --exact-decode"):
        _embed(shard_paths[1:2], path, exact_decode=True)
    # a cache made before decoding was recorded decoded whole
    root = CacheWriter(path).root
    manifest = dict(root.attrs)
    del manifest["model"]["preprocess"]["decode"]
    root.attrs.put(manifest)
    with pytest.raises(EngineError, match="rerun with --exact-decode"):
        _embed(shard_paths[1:2], path)
    assert _embed(shard_paths[1:2], path, exact_decode=True)["rows"] == 80
    write_prompts(str(path), "shapes:20")  # text features do not depend on how images were decoded


@pytest.mark.gpu_test
def test_gpu_decoding_matches_the_cpu_path(tmp_path):
    """nvJPEG + GPU preprocessing against the CPU path: cosine >= 0.995; a PNG and a corrupt JPEG
    take the CPU path (the corrupt one is a bad sample), counted in the summary."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    photos = _photos(40, (500, 375))
    samples = [{"__key__": f"p{i:03d}", "jpg": d, "cls": b"0"} for i, d in enumerate(photos)]
    samples.append({"__key__": "broken", "jpg": b"\xff\xd8\xff" + b"\x00" * 100, "cls": b"0"})
    _write_shard(tmp_path / "p.tar", samples)
    gpu = _embed([tmp_path / "p.tar"], tmp_path / "gpu.zarr", device="cuda", classes=None, true_label_key=None)
    cpu = _embed([tmp_path / "p.tar"], tmp_path / "cpu.zarr", device="cpu", classes=None, true_label_key=None)
    assert gpu["decode"]["gpu_decoded"] == 40 and gpu["decode"]["cpu_fallback"] == 1
    assert gpu["bad_samples"] == cpu["bad_samples"] == 1
    a = Cache(tmp_path / "gpu.zarr").load_features().astype(np.float32)
    b = Cache(tmp_path / "cpu.zarr").load_features().astype(np.float32)
    assert Cache(tmp_path / "gpu.zarr").keys().tolist() == Cache(tmp_path / "cpu.zarr").keys().tolist()
    assert (a * b).sum(1).mean() >= 0.995


def test_the_gpu_preprocessing_matches_the_models_own_transform_per_image():
    """The batched JPEG decoder (here on the CPU: same code, torchvision's CPU decoder) against
    the model's own PIL transform, image by image, in a batch of mixed sizes (grouped by size for
    resizing, then put back in input order); a corrupt JPEG comes back in `failed`."""
    import io

    import torch
    from PIL import Image

    from engine.gpudecode import GpuJpegDecoder
    from engine.models import load_model

    loaded = load_model("shapes-tiny", None, device="cpu")
    sizes = [(500, 375), (375, 500), (500, 375), (320, 240), (375, 500), (90, 70)]
    photos = [_photos(1, size, seed=i)[0] for i, size in enumerate(sizes)]
    jpegs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in photos]
    jpegs.insert(3, torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\x00" * 64), dtype=torch.uint8))
    out, failed = GpuJpegDecoder(loaded.identity, torch.device("cpu"))(jpegs)
    assert failed == [3] and out.shape == (len(photos), 3, 64, 64)
    ref = torch.stack([loaded.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in photos])
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1))
    assert cos.min() > 0.99 and (out - ref).abs().mean() < 0.05
    # each output row is closest to its own reference (the order survives the size grouping)
    assert torch.cdist(out.flatten(1), ref.flatten(1)).argmin(1).tolist() == list(range(len(photos)))

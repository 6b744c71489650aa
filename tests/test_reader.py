import json

import numpy as np
import pytest
import torch
import webdataset as wds

from engine.reader import ReaderConfig, ShardReader, check_end_of_archive, expand_shards, parse_label, split_for_rank
from engine.runtime import EngineError


def test_expand_braces_globs_pipes_sorted_and_deduplicated(shapes_dir, shard_paths):
    a = expand_shards([f"{shapes_dir}/shapes-{{000000..000002}}.tar"])
    b = expand_shards([f"{shapes_dir}/*.tar", shard_paths[0]])
    assert a == b == sorted(shard_paths)
    assert expand_shards(["pipe:cat x.tar"]) == ["pipe:cat x.tar"]
    with pytest.raises(EngineError, match="matches no file"):
        expand_shards([f"{shapes_dir}/*.zip"])


def test_split_for_rank_covers_every_shard_once():
    urls = [f"s{i}" for i in range(7)]
    parts = [split_for_rank(urls, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == urls


def test_split_by_bytes_only_when_round_robin_is_uneven_and_never_worse():
    urls = [f"s{i}" for i in range(6)]
    even = [100, 104, 98, 101, 99, 100]
    assert [split_for_rank(urls, r, 2, even) for r in range(2)] == [urls[0::2], urls[1::2]]
    uneven = [10, 1, 10, 1, 10, 1]  # round robin: 30 vs 3 bytes
    parts = [split_for_rank(urls, r, 2, uneven) for r in range(2)]
    assert parts == [["s0", "s4"], ["s1", "s2", "s3", "s5"]]  # 20 vs 13, each in plan order
    assert split_for_rank(urls, 0, 2, [10, None, 10, 1, 10, 1]) == urls[0::2]  # a size unknown
    assert split_for_rank(urls, 0, 1, uneven) == urls


def test_split_by_bytes_against_brute_force():
    """Every shard exactly once, in plan order, deterministic; the busiest rank never above
    round robin's and within 4/3 of the best split (all assignments enumerated)."""
    import itertools

    rng = np.random.default_rng(0)
    for _trial in range(200):
        n, world = int(rng.integers(1, 8)), int(rng.integers(2, 4))
        sizes = [int(x) for x in rng.integers(1, 100, size=n) ** rng.integers(1, 3)]
        urls = [f"u{i}" for i in range(n)]
        parts = [split_for_rank(urls, r, world, sizes) for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(urls) and all(p == sorted(p, key=urls.index) for p in parts)
        assert parts == [split_for_rank(urls, r, world, sizes) for r in range(world)]
        load = max(sum(sizes[urls.index(u)] for u in p) for p in parts)
        robin = max(sum(sizes[r::world]) for r in range(world))
        best = min(
            max(sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world))
            for owners in itertools.product(range(world), repeat=n)
        )
        assert load <= robin and load <= 4 / 3 * best + 1e-9, (sizes, world, parts)


def test_labels_from_cls_and_json_fields():
    assert parse_label({"cls": b"7"}, "cls") == 7
    assert parse_label({"cls": b"x"}, "cls") is None
    assert parse_label({}, "cls") is None
    sample = {"json": json.dumps({"label": 3, "meta": {"y": 4}}).encode()}
    assert parse_label(sample, "json:label") == 3
    assert parse_label(sample, "json:meta.y") == 4
    assert parse_label(sample, "json:missing") is None


def test_workers_take_whole_shards_and_batches_never_span_shards(shard_paths):
    identity = lambda img: torch.zeros(3, 4, 4)  # noqa: E731
    reader = ShardReader(list(enumerate(shard_paths)), identity, ReaderConfig(batch_size=16))
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2)
    per_shard, outcomes = {}, {}
    for batch in loader:
        per_shard.setdefault(batch.shard, []).extend(batch.keys)
        if batch.outcome is not None:
            outcomes[batch.shard] = batch.outcome
    assert sorted(per_shard) == [0, 1, 2] and all(len(v) == 40 for v in per_shard.values())
    assert all(o.samples == 40 and o.error is None for o in outcomes.values())


def test_pipe_urls_and_img2dataset_layout(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    path = tmp_path / "i2d.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "txt": "a red square", "json": {"label": i}})
    reader = ShardReader([(0, f"pipe:cat {path}")], lambda img: torch.zeros(3), ReaderConfig(label_key="json:label"))
    batches = list(reader)
    assert batches[-1].outcome.error is None
    assert np.concatenate([b.labels for b in batches]).tolist() == [0, 1, 2]


def test_end_of_archive_check(tmp_path, shard_paths):
    check_end_of_archive(shard_paths[0])
    data = open(shard_paths[0], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:-10240])
    with pytest.raises(ValueError, match="truncated"):
        check_end_of_archive(str(cut))


def test_gpu_jpeg_batches_carry_the_jpegs_bytes_packed_and_decode_the_rest(tmp_path):
    """With `gpu_jpeg`, JPEGs cross from the workers as one packed byte tensor per batch (exactly
    each sample's bytes, at its row); a PNG in the same batch is decoded on the worker."""
    import io

    from PIL import Image

    def encoded(fmt, color):
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), color).save(buf, format=fmt)
        return buf.getvalue()

    samples = [encoded("JPEG", (i * 20, 0, 0)) for i in range(5)]
    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, data in enumerate(samples):
            sink.write({"__key__": f"j{i}", "jpg": data, "cls": b"0"})
            if i == 2:
                sink.write({"__key__": "png", "png": encoded("PNG", (0, 255, 0)), "cls": b"1"})
    preprocess = lambda img: torch.ones(3, 2, 2)  # noqa: E731
    reader = ShardReader([(0, str(path))], preprocess, ReaderConfig(batch_size=4, gpu_jpeg=True))
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=1)
    got, decoded = {}, []
    for batch in loader:
        rows = [] if batch.jpeg_rows is None else batch.jpeg_rows.tolist()
        assert batch.images.shape[0] == len(batch.keys) - len(rows)
        for row, data in zip(rows, batch.jpegs):
            assert data.dtype == torch.uint8 and data.ndim == 1 and data.is_contiguous()
            got[batch.keys[row]] = bytes(data.numpy())
        decoded += [k for i, k in enumerate(batch.keys) if i not in rows]
    assert got == {f"j{i}": d for i, d in enumerate(samples)}
    assert decoded == ["png"]

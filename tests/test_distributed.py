"""`engine embed` under torchrun: 2 gloo ranks on this CPU, into a local cache and into a real
S3-compatible server (moto's server mode on loopback), against a 1-process reference run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.cache import Cache
from engine.embed import EmbedConfig, embed_shards
from engine.results import Selection
from engine.synthetic import ShapesConfig, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-shards")
    made = write_shards(out, ShapesConfig(classes=10, per_shard=20, shards=6, noise="mix", rate=0.4, seed=11))
    return made


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The 1-process run every distributed run must equal."""
    path = str(tmp_path_factory.mktemp("dist-ref") / "ref.zarr")
    embed_shards(
        shards["shards"],
        path,
        EmbedConfig(classes=shards["classes_file"], true_label_key="true_cls", workers=1),
        rank=0,
        world_size=1,
    )
    return _contents(path)


def _contents(path: str) -> dict:
    cache = Cache(path)
    shard_urls = [s["url"] for s in cache.manifest["shards"]]
    shard, position = cache.provenance()
    return {
        "keys": np.asarray(cache.keys(), dtype=object),
        "features": cache.load_features(),
        "labels": cache.labels(),
        "true": cache.true_labels(),
        "source": np.asarray([f"{shard_urls[s]}#{p}" for s, p in zip(shard, position)], dtype=object),
        "status": sorted((s["url"], s["status"]) for s in cache.manifest["shards"]),
        "rows": cache.num_rows,
        "staging": _staging(cache),
    }


def _staging(cache: Cache) -> list:
    return sorted(cache.root["staging"].group_keys()) if "staging" in cache.root else []


def _assert_same_set(got: dict, ref: dict) -> None:
    """The set of (key, features, labels, provenance) equals the reference, without duplicates."""
    assert got["rows"] == ref["rows"] == len(got["keys"])
    assert len(set(got["keys"])) == len(got["keys"]), "duplicate keys"
    order, ref_order = np.argsort(got["keys"]), np.argsort(ref["keys"])
    assert (got["keys"][order] == ref["keys"][ref_order]).all()
    np.testing.assert_array_equal(got["features"][order], ref["features"][ref_order])
    np.testing.assert_array_equal(got["labels"][order], ref["labels"][ref_order])
    np.testing.assert_array_equal(got["true"][order], ref["true"][ref_order])
    assert (got["source"][order] == ref["source"][ref_order]).all()
    assert got["status"] == ref["status"] and got["staging"] == []


def _torchrun(
    shards: dict,
    cache: str,
    *,
    ranks: int = 2,
    env: dict | None = None,
    wait: bool = True,
    extra: tuple = (),
    expect: int = 0,
):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "engine",
        "embed",
        *shards["shards"],
        "--cache",
        cache,
        "--classes",
        shards["classes_file"],
        "--true-label-key",
        "true_cls",
        "--workers",
        "1",
        "--json",
        *extra,
    ]
    full_env = {**os.environ, "ENGINE_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)
    assert (done.returncode == 0) == (expect == 0), done.stderr[-3000:]
    return done


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of the worker process torchrun started for `rank` (read from its environment)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in _descendants(launcher.pid):
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=%d" % rank in environ:
                return child
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out.extend(int(k) for k in kids)
        todo.extend(int(k) for k in kids)
    return out


def _kill_rank_mid_run(shards: dict, cache: str, env: dict | None = None) -> None:
    """Start 2 ranks with slow commits, SIGKILL rank 1 once a shard is committed, let torchrun
    tear the job down; the cache must then hold some but not all shards."""
    launcher = _torchrun(shards, cache, env={**(env or {}), "ENGINE_TEST_SLOW_WRITE": "1.5"}, wait=False)
    try:
        victim = _rank_pid(launcher, 1)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if Cache(cache).num_rows > 0:
                    break
            except Exception:  # not created yet
                pass
            time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0, "the job should fail when a rank dies"


def test_two_ranks_write_the_same_cache_as_one_process(shards, reference, tmp_path):
    path = str(tmp_path / "two.zarr")
    # rank 1 commits late: its shards land after rank 0's, yet rows must keep the plan order
    done = _torchrun(shards, path, env={"ENGINE_TEST_SLOW_WRITE": "0.5", "ENGINE_TEST_SLOW_WRITE_RANK": "1"})
    got = _contents(path)
    _assert_same_set(got, reference)
    assert (got["keys"] == reference["keys"]).all()  # rows land in plan order, whatever the ranks
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, "only rank 0 prints the summary"
    import json

    summary = json.loads(summaries[0])
    assert summary["ranks"] == 2 and summary["new_rows"] == reference["rows"] and summary["shards"]["done"] == 6


def test_uneven_shards_are_split_by_bytes_and_still_equal_one_process(tmp_path):
    """One shard of 60 images and three of 10: round robin would give rank 0 70 images and
    rank 1 20; split by bytes, rank 0 takes the big shard alone. The cache still equals a
    1-process run's, row for row."""
    import json

    out = tmp_path / "uneven"
    big = write_shards(out, ShapesConfig(classes=10, per_shard=60, shards=1, seed=21, prefix="a"))
    small = write_shards(out, ShapesConfig(classes=10, per_shard=10, shards=3, seed=22, prefix="b"))
    made = {"shards": big["shards"] + small["shards"], "classes_file": big["classes_file"]}
    reference = str(tmp_path / "ref.zarr")
    embed_shards(
        made["shards"],
        reference,
        EmbedConfig(classes=made["classes_file"], true_label_key="true_cls", workers=1),
        rank=0,
        world_size=1,
    )
    path = str(tmp_path / "two.zarr")
    done = _torchrun(made, path)
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["shards"]["this_rank"] == 1  # rank 0: the big shard only
    got, ref = _contents(path), _contents(reference)
    _assert_same_set(got, ref)
    assert (got["keys"] == ref["keys"]).all()


def test_a_killed_rank_leaves_its_shards_undone_and_a_rerun_finishes_them(shards, reference, tmp_path):
    path = str(tmp_path / "killed.zarr")
    _kill_rank_mid_run(shards, path)
    partial = Cache(path)
    statuses = [s["status"] for s in partial.manifest["shards"]]
    assert 0 < partial.num_rows < reference["rows"] and statuses.count("done") < 6
    assert len(set(partial.keys())) == partial.num_rows
    staging = partial.root["staging"]
    left = sum(
        dict(staging[g].attrs).get("rows", 0) for g in staging.group_keys() if dict(staging[g].attrs).get("committed")
    )
    summary = embed_shards(
        shards["shards"],
        path,
        EmbedConfig(classes=shards["classes_file"], true_label_key="true_cls", workers=1),
        rank=0,
        world_size=1,
    )  # any number of ranks may finish the job
    assert summary["shards"]["skipped"] >= 1 and summary["rows"] == reference["rows"]
    # committed leftovers of the dead rank were appended, not embedded again
    assert summary["new_rows"] == reference["rows"] - partial.num_rows - left
    _assert_same_set(_contents(path), reference)


def test_two_ranks_into_s3_equal_one_process_and_resume_after_a_kill(shards, reference, s3):
    url = "s3://engine-test/run/feats.zarr"
    _torchrun(shards, url, env=s3)
    _assert_same_set(_contents(url), reference)

    killed = "s3://engine-test/killed/feats.zarr"
    _kill_rank_mid_run(shards, killed, env=s3)
    assert 0 < Cache(killed).num_rows < reference["rows"]
    _torchrun(shards, killed, env=s3)  # the rerun, again with 2 ranks
    _assert_same_set(_contents(killed), reference)


def test_later_stages_read_an_s3_cache(shards, s3, tmp_path):
    from engine.select import SelectConfig
    from engine.stages import select_from_cache

    url = "s3://engine-test/stages/feats.zarr"
    embed_shards(
        shards["shards"][:2], url, EmbedConfig(classes=shards["classes_file"], workers=0), rank=0, world_size=1
    )
    summary = select_from_cache(url, SelectConfig(classifiers=("zeroshot",)))
    assert summary["rows"] == Cache(url).num_rows == 40
    assert Cache(url).has_group("selection")


def test_a_missing_s3_cache_is_an_error_not_a_new_store(s3):
    from engine.runtime import EngineError
    from engine.select import SelectConfig
    from engine.stages import select_from_cache

    with pytest.raises(EngineError, match="not a feature cache"):
        select_from_cache("s3://engine-test/typo.zarr", SelectConfig())
    import fsspec

    assert not fsspec.filesystem("s3").exists("engine-test/typo.zarr")


def test_shards_on_s3_are_read_through_fsspec(shards, reference, s3, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    remote = []
    for path in shards["shards"][:2]:
        url = f"s3://engine-test/shards/{Path(path).name}"
        fs.put(path, url)
        remote.append(url)
    cache = str(tmp_path / "from-s3.zarr")
    summary = embed_shards(
        remote,
        cache,
        EmbedConfig(classes=shards["classes_file"], true_label_key="true_cls", workers=0),
        rank=0,
        world_size=1,
    )
    assert summary["shards"]["done"] == 2 and summary["bad_samples"] == 0
    got = Cache(cache)
    ref_rows = np.isin(reference["keys"], got.keys())
    assert ref_rows.sum() == got.num_rows == 40
    np.testing.assert_array_equal(got.load_features(), reference["features"][ref_rows])
    from engine.reader import read_samples

    ((position, sample),) = list(read_samples(remote[1], [3]))
    with open(shards["shards"][1], "rb") as handle:
        assert sample["jpg"] in handle.read()  # the same bytes as the local shard's


def _copy_shards(shards: dict, out: Path) -> dict:
    import shutil

    out.mkdir()
    paths = []
    for p in shards["shards"]:
        paths.append(str(out / Path(p).name))
        shutil.copy(p, paths[-1])
    return {"shards": paths, "classes_file": shards["classes_file"]}


def test_a_shard_failing_on_rank_1_is_recorded_by_rank_0_and_retried_by_a_rerun(shards, reference, tmp_path):
    copy = _copy_shards(shards, tmp_path / "shards")
    victim = copy["shards"][3]  # plan[1::2] = shards 1, 3, 5: rank 1's
    original = Path(victim).read_bytes()
    Path(victim).write_bytes(original[: len(original) // 2])  # truncated mid-member
    path = str(tmp_path / "c.zarr")
    done = _torchrun(copy, path, expect=1)
    assert done.returncode == 1 and "1 shard(s) failed" in done.stderr
    cache = Cache(path)
    status = {Path(s["url"]).name: s["status"] for s in cache.manifest["shards"]}
    assert status[Path(victim).name] == "failed" and list(status.values()).count("done") == 5
    assert cache.num_rows == reference["rows"] - 20
    Path(victim).write_bytes(original)
    _torchrun(copy, path)
    got = _contents(path)
    assert got["rows"] == reference["rows"] and got["staging"] == []
    assert sorted(got["keys"]) == sorted(reference["keys"])


def _spoil_image(shard: str, position: int) -> str:
    """Rewrite `shard` with the image at `position` replaced by bytes that do not decode; its key."""
    import webdataset as wds

    from engine.reader import read_samples

    samples = [s for _, s in read_samples(shard)]
    samples[position]["jpg"] = b"this is not an image"
    with wds.TarWriter(shard, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return samples[position]["__key__"]


def test_strict_stop_on_rank_1_stops_every_rank_with_one_line(shards, tmp_path):
    copy = _copy_shards(shards, tmp_path / "shards")
    bad_key = _spoil_image(copy["shards"][5], 4)  # rank 1's last shard
    path = str(tmp_path / "c.zarr")
    start = time.time()
    done = _torchrun(copy, path, extra=("--strict",), expect=2)
    assert time.time() - start < 120
    assert bad_key in done.stderr and "--strict" in done.stderr
    cache = Cache(path)
    status = [s["status"] for s in cache.manifest["shards"]]
    assert status[5] != "done" and status.count("done") >= 3  # rank 0's shards are all kept


def test_a_strict_stop_on_rank_1_reaches_rank_0_mid_run(shards, tmp_path):
    """Rank 1 fails on its first shard while rank 0 is slow: rank 0 stops at its next batch
    (through the rendezvous store) instead of finishing its shards, keeps what it staged, and
    the job's message is rank 1's reason, not rank 0's "stopped"."""
    copy = _copy_shards(shards, tmp_path / "shards")
    bad_key = _spoil_image(copy["shards"][1], 0)  # rank 1's first shard
    path = str(tmp_path / "c.zarr")
    # rank 0: 3 shards x 5 batches x 0.4 s = 6 s of work if nobody stops it
    done = _torchrun(
        copy,
        path,
        extra=("--strict", "--batch-size", "4"),
        expect=2,
        env={"ENGINE_TEST_SLOW_BATCH": "0.4", "ENGINE_TEST_SLOW_WRITE_RANK": "0"},
    )
    last = next(line for line in done.stderr.splitlines() if "rank(s) failed" in line or "--strict" in line)
    assert bad_key in last and "--strict" in last and "stopped because" not in last
    status = [s["status"] for s in Cache(path).manifest["shards"]]
    assert status[1] != "done" and status[4] != "done", status  # rank 0 never reached its last shard
    assert all(s in ("done", "pending") for s in status)
    _torchrun(
        _copy_shards(shards, tmp_path / "good"),
        str(tmp_path / "d.zarr"),
        extra=("--batch-size", "4"),
        env={"ENGINE_TEST_SLOW_BATCH": "0.05"},
    )  # the aid alone stops nothing


def test_an_s3_shard_cut_between_members_fails_instead_of_losing_its_tail(shards, s3, tmp_path):
    import tarfile

    import fsspec

    from engine.reader import read_samples
    from engine.runtime import EngineError

    source = shards["shards"][0]
    with tarfile.open(source) as tar:
        cut = tar.getmembers()[-3].offset  # a header boundary: tarfile alone sees a whole archive
    data = Path(source).read_bytes()[:cut]
    fs = fsspec.filesystem("s3")
    url = "s3://engine-test/cut/shard-000000.tar"
    fs.pipe(url, data)
    summary = embed_shards(
        [url], str(tmp_path / "c.zarr"), EmbedConfig(classes=shards["classes_file"], workers=0), rank=0, world_size=1
    )
    assert summary["shards"]["failed"] == 1 and "end-of-archive" in summary["failed"][0]["error"]
    with pytest.raises(EngineError, match="no longer there"):
        list(read_samples("s3://engine-test/cut/gone.tar", [0]))


def test_an_s3_shard_overwritten_after_embedding_is_noticed(shards, s3, tmp_path):
    import fsspec

    from engine.runtime import EngineError

    fs = fsspec.filesystem("s3")
    url = "s3://engine-test/rewritten/shard-000000.tar"
    fs.put(shards["shards"][0], url)
    cache = str(tmp_path / "c.zarr")
    config = EmbedConfig(classes=shards["classes_file"], workers=0)
    embed_shards([url], cache, config, rank=0, world_size=1)
    assert embed_shards([url], cache, config, rank=0, world_size=1)["shards"]["skipped"] == 1
    fs.put(shards["shards"][1], url)
    with pytest.raises(EngineError, match="changed since they were embedded"):
        embed_shards([url], cache, config, rank=0, world_size=1)


def test_report_and_export_run_on_an_s3_cache_of_s3_shards(shards, s3, tmp_path):
    import fsspec
    import webdataset as wds

    from engine.export import ShardExportConfig, export_cache
    from engine.report import ReportConfig, write_report
    from engine.select import SelectConfig
    from engine.stages import select_from_cache

    fs = fsspec.filesystem("s3")
    urls = []
    for path in shards["shards"][:2]:
        urls.append(f"s3://engine-test/e2e/{Path(path).name}")
        fs.put(path, urls[-1])
    cache = "s3://engine-test/e2e/feats.zarr"
    embed_shards(
        urls,
        cache,
        EmbedConfig(classes=shards["classes_file"], true_label_key="true_cls", workers=0),
        rank=0,
        world_size=1,
    )
    select_from_cache(cache, SelectConfig())
    report = write_report(cache, str(tmp_path / "report"), ReportConfig(neighbors=2))
    assert report["thumbnails"] > 0 and report["placeholders"] == 0  # images read back from S3 shards
    exported = export_cache(cache, shards=str(tmp_path / "clean" / "{000000..}.tar"), config=ShardExportConfig())
    selected = Selection.read(Cache(cache)).selected
    keys = [
        s["__key__"]
        for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "clean").glob("*.tar")), shardshuffle=False)
    ]
    assert keys == list(Cache(cache).keys()[selected]) and exported["shards"]["rows_written"] == selected.sum()

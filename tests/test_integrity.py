"""Fault injection: damaged chunks and metadata, half-created caches, a kill during a result swap,
a full disk and bad files. Each case asserts the exit status, the one line, and that nothing
already committed was lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from engine.cache import Cache
from engine.results import Selection


def _run(*args):
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def _one_line(code, stderr, *needles, status=2):
    assert code == status, stderr
    assert stderr.startswith("engine: error: ") and stderr.strip().count("\n") == 0, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real shapes cache (2 shards, 6 classes) with a selection."""
    root = tmp_path_factory.mktemp("integrity")
    code, _, err = _run(
        "make-shards",
        "--out",
        str(root / "s"),
        "--num-classes",
        "6",
        "--per-shard",
        "60",
        "--shards",
        "2",
        "--seed",
        "3",
    )
    assert code == 0, err
    cache = str(root / "c.zarr")
    code, _, err = _run(
        "embed",
        f"{root}/s/shapes-{{000000..000001}}.tar",
        "--cache",
        cache,
        "--classes",
        str(root / "s" / "classes.json"),
        "--true-label-key",
        "true_cls",
        "--workers",
        "0",
    )
    assert code == 0, err
    assert _run("select", "--cache", cache)[0] == 0
    return root


@pytest.fixture
def cache(built, tmp_path):
    path = tmp_path / "c.zarr"
    shutil.copytree(built / "c.zarr", path)
    return path


def _chunk(path: Path, array: str) -> Path:
    files = sorted(p for p in (path / array / "c").rglob("*") if p.is_file())
    assert files, array
    return files[0]


def test_a_deleted_feature_chunk_is_an_error_not_zeros(cache):
    _chunk(cache, "images/features").unlink()
    code, _, err = _run("select", "--cache", str(cache))
    _one_line(code, err, "images/features rows 0:", "missing", "engine verify")
    code, out, _ = _run("verify", "--cache", str(cache), "--json")
    found = json.loads(out)
    assert code == 1 and not found["ok"]
    assert any(p["where"] == "images/features" and "shapes-000000.tar" in p["repair"] for p in found["problems"])


def test_a_deleted_keys_chunk_stops_the_report_in_one_line(cache, tmp_path):
    _chunk(cache, "images/keys").unlink()
    code, _, err = _run("report", "--cache", str(cache), "--out", str(tmp_path / "r"))
    _one_line(code, err, "images/keys", "missing")
    assert not (tmp_path / "r").exists()


def test_a_garbled_chunk_fails_its_checksum(cache):
    chunk = _chunk(cache, "images/features")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, _, err = _run("select", "--cache", str(cache))
    _one_line(code, err, "images/features", "damaged", "checksum")
    code, out, _ = _run("verify", "--cache", str(cache))
    assert code == 1 and "damaged" in out


def test_damaged_results_and_metadata_are_one_line_errors(cache, tmp_path):
    group = Cache(str(cache)).group_path("selection")
    before = Selection.read(Cache(str(cache))).selected.copy()
    chunk = _chunk(cache, f"{group}/noise_score")
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    code, _, err = _run("export", "--cache", str(cache), "--out", str(tmp_path / "t.csv"))
    _one_line(code, err, "noise_score", "damaged")
    assert not (tmp_path / "t.csv").exists()
    meta = cache / group / "filled" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    code, _, err = _run("export", "--cache", str(cache), "--out", str(tmp_path / "t.csv"))
    _one_line(code, err, "filled", "unreadable")
    assert _run("select", "--cache", str(cache))[0] == 0  # rerunning the stage repairs it
    assert Selection.read(Cache(str(cache))).selected.tolist() == before.tolist()


def test_torn_cache_metadata_is_named(cache):
    features_meta = cache / "images" / "features" / "zarr.json"
    features_meta.write_text(features_meta.read_text()[:50])
    code, _, err = _run("select", "--cache", str(cache))
    _one_line(code, err, "images/features/zarr.json is unreadable")
    root_meta = cache / "zarr.json"
    root_meta.write_text(root_meta.read_text()[:70])
    for command in ("select", "diagnose", "verify"):
        code, _, err = _run(command, "--cache", str(cache))
        if command == "verify":
            assert code == 1
        else:
            _one_line(code, err, "zarr.json is unreadable")


def test_a_half_created_cache_is_named_and_the_next_embed_finishes_it(built, tmp_path):
    import zarr

    path = tmp_path / "half.zarr"
    zarr.open_group(str(path), mode="a")  # a kill right after the group's zarr.json appeared
    for args in (
        ["diagnose", "--cache", str(path)],
        ["predict", "--head", str(path / "zarr.json"), "--cache", str(path)],
    ):
        code, _, err = _run(*args)
        _one_line(code, err, "never finished")
    code, _, err = _run("embed", f"{built}/s/shapes-000000.tar", "--cache", str(path), "--workers", "0")
    assert code == 0, err
    assert Cache(str(path)).num_rows == 60


def test_a_kill_during_the_selection_swap_leaves_the_old_selection_and_the_next_run_starts(cache):
    before = Selection.read(Cache(str(cache))).selected.copy()
    script = (
        "import sys, time, numpy as np\n"
        "from engine.cache import Cache\n"
        "def fill(group):\n"
        "    group.create_array('selected', data=np.zeros(120, bool))\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"Cache({str(cache)!r}, mode='a').replace_group('selection', fill, {{}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Selection.read(Cache(str(cache))).selected.tolist() == before.tolist()
    for _ in range(2):
        code, _, err = _run("select", "--cache", str(cache))
        assert code == 0, err
    assert Selection.read(Cache(str(cache))).selected.tolist() == before.tolist()


def test_a_full_disk_during_embed_is_one_line_and_the_rerun_completes(built, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    path = tmp_path / "full.zarr"
    real_set, calls = LocalStore.set, {"n": 0}

    async def failing_set(self, key, value):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root) / key))
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    args = [
        "embed",
        f"{built}/s/shapes-{{000000..000001}}.tar",
        "--cache",
        str(path),
        "--workers",
        "0",
        "--classes",
        str(built / "s" / "classes.json"),
    ]
    code, _, err = _run(*args)
    _one_line(code, err, "disk full")
    monkeypatch.setattr(LocalStore, "set", real_set)
    code, _, err = _run(*args)
    assert code == 0, err
    done, clean = Cache(str(path)), Cache(str(built / "c.zarr"))
    assert done.num_rows == clean.num_rows == 120
    np.testing.assert_array_equal(done.keys(), clean.keys())
    assert _run("verify", "--cache", str(path))[0] == 0


@pytest.mark.parametrize(
    "name,make,needle",
    [
        ("text.npz", lambda p: p.write_text("not an archive"), "not a readable .npz"),
        ("empty.npz", lambda p: p.write_bytes(b""), "not a readable .npz"),
        ("one.npy", lambda p: np.save(p, np.ones((3, 4))), "single array"),
        (
            "cut.npz",
            lambda p: (
                np.savez(p, features=np.ones((3, 4)), labels=np.zeros(3, int)),
                p.write_bytes(p.read_bytes()[:60]),
            ),
            "not a readable .npz",
        ),
        (
            "objects.npz",
            lambda p: np.savez(p, features=np.ones((3, 4)), labels=np.array([0, "a", None], object)),
            "object arrays",
        ),
        (
            "big.npz",
            lambda p: np.savez(p, features=np.ones((3, 4)), labels=np.array([0, 4294967297, 1])),
            "labels: expected values below",
        ),
        (
            "true.npz",
            lambda p: np.savez(
                p, features=np.ones((3, 4)), labels=np.zeros(3, int), true_labels=np.array([0, 2147483655, 1])
            ),
            "true_labels: expected values below",
        ),
        (
            "nantext.npz",
            lambda p: np.savez(
                p, features=np.ones((3, 4)), labels=np.zeros(3, int), text_features=np.full((2, 4), np.nan)
            ),
            "text_features: contains NaN",
        ),
    ],
)
def test_bad_npz_files_are_refused_in_one_line(tmp_path, name, make, needle):
    path = tmp_path / name
    make(path if not name.endswith(".npy") else path)
    code, _, err = _run("import", str(path), "--cache", str(tmp_path / "c.zarr"))
    _one_line(code, err, needle)
    assert not (tmp_path / "c.zarr").exists()


def test_huge_float64_rows_import_as_unit_rows(tmp_path):
    features = np.ones((4, 8)) * 1e300
    features[1] = np.arange(8) * 1e-300
    np.savez(tmp_path / "f.npz", features=features, labels=np.array([0, 1, 0, 1]))
    code, _, err = _run("import", str(tmp_path / "f.npz"), "--cache", str(tmp_path / "c.zarr"))
    assert code == 0, err
    stored = Cache(str(tmp_path / "c.zarr")).load_features().astype(np.float32)
    assert np.isfinite(stored).all() and np.allclose(np.linalg.norm(stored, axis=1), 1, atol=2e-3)


def test_empty_paths_and_keys_are_refused(built, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = f"{built}/s/shapes-000000.tar"
    for args, needle in (
        (["embed", shards, "--cache", ""], "--cache"),
        (["embed", shards, "--cache", str(tmp_path / "x.zarr"), "--label-key", ""], "--label-key"),
        (["train", "--cache", str(built / "c.zarr"), "--out", ""], "--out"),
        (["pack", str(built / "s"), "--out", ""], "--out"),
        (
            ["export", "--cache", str(built / "c.zarr"), "--shards", f"{built}/s/classes.json/{{000000..}}.tar"],
            "is a file",
        ),
        (["diagnose", "--cache", str(built / "c.zarr"), "--export-knn", str(tmp_path)], "is a directory"),
        (["diagnose", "--cache", str(built / "c.zarr"), "--export-knn", str(tmp_path / "knn")], ".npz file path"),
    ):
        code, _, err = _run(*args)
        _one_line(code, err, needle)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written into the current directory


def test_a_format_1_cache_still_opens_and_verify_says_how_to_upgrade(cache):
    root = Cache(str(cache), mode="a").root
    manifest = dict(root.attrs)
    manifest["version"] = 1
    root.attrs.put(manifest)
    assert Cache(str(cache)).num_rows == 120
    code, out, _ = _run("verify", "--cache", str(cache), "--json")
    found = json.loads(out)
    assert code == 0 and any("format 1" in note for note in found["notes"])
    assert _run("select", "--cache", str(cache))[0] == 0


def test_verify_passes_a_healthy_cache_and_reports_its_results(built):
    code, out, _ = _run("verify", "--cache", str(built / "c.zarr"), "--json")
    found = json.loads(out)
    assert code == 0 and found["ok"] and found["rows"] == 120 and found["version"] == 2
    assert found["checked"]["results"] == ["selection"]
    assert 0.98 < found["checked"]["rows"]["norm_min"] <= found["checked"]["rows"]["norm_max"] < 1.02
    time.sleep(0)  # nothing asynchronous is left running

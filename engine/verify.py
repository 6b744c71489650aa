"""`engine verify`: a full check of a cache, like `git fsck`, in bounded memory.

Checks the manifest against the arrays (row counts, shard offsets), every chunk (present, its
checksum intact), the values (features finite and of unit norm, labels in range, keys unique,
provenance consistent with the manifest), the text features, each result group (complete, over
the current rows), staging left by killed runs and the lock. Each problem names the array and
rows, and the command that repairs it. See docs/commands.md#verify.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from engine.cache import (
    RESULTS,
    ROW_ARRAYS,
    STALE_GROUP_S,
    Cache,
    group_names,
    impossible_values,
    is_local,
    missing_chunks,
    one_line,
)
from engine.runtime import EngineError, progress

_logger = logging.getLogger(__name__)
NORM_TOLERANCE = 0.02  # float16 unit rows: |norm - 1| stays within a few ulps; 0.02 is damage


@dataclass
class Problem:
    """One thing wrong: `where` (an array, group or file), `rows` ("a:b" or ""), `reason`, `repair`."""

    where: str
    rows: str
    reason: str
    repair: str


class _Report:
    def __init__(self, cache_path: str):
        self.path = cache_path
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.checked: dict = {}

    def add(self, where: str, reason: str, repair: str, rows: str = "") -> None:
        self.problems.append(Problem(where=where, rows=rows, reason=reason, repair=repair))


def verify_cache(cache_path: str, *, block_rows: int = 65_536, show_progress: bool | None = None) -> dict:
    """Check the cache at `cache_path`; returns a summary with `ok` and the `problems` found
    (an unreadable manifest is itself reported, not raised). Memory: one block of rows
    (block_rows x D float16) plus the keys (for uniqueness)."""
    started = time.perf_counter()
    report = _Report(cache_path)
    try:
        cache = Cache(cache_path)
    except EngineError as err:
        report.add("zarr.json", str(err).split(": ", 1)[-1], "restore the cache from a copy or create it again")
        return _summary(report, None, started)
    if cache.version < 2:
        report.notes.append(
            "format 1 (written before chunk checksums): missing chunks and damage inside a chunk cannot all be "
            "told from data; re-embed into a new cache to get format 2"
        )
    if _check_manifest(cache, report):
        _check_rows(cache, report, block_rows=block_rows, show_progress=show_progress)
    _check_text(cache, report)
    _check_results(cache, report)
    _check_leftovers(cache, report)
    _check_lock(cache, report)
    return _summary(report, cache, started)


def _summary(report: _Report, cache: Cache | None, started: float) -> dict:
    return {
        "cache": report.path,
        "ok": not report.problems,
        "rows": cache.num_rows if cache is not None else None,
        "version": cache.version if cache is not None else None,
        "problems": [asdict(p) for p in report.problems],
        "notes": report.notes,
        "checked": report.checked,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ----------------------------------------------------------------------------- manifest


def _check_manifest(cache: Cache, report: _Report) -> bool:
    """Whether the rows can be checked (the manifest has what that needs)."""
    manifest = cache.manifest
    rows = cache.num_rows
    lacking = [key for key in ("format", "version", "model", "dim", "rows", "shards") if key not in manifest]
    for key in lacking:
        report.add("manifest", f"has no {key!r}", "create the cache again (`engine embed` or `engine import`)")
    if lacking:
        return False
    shards = manifest.get("shards", [])
    done = sorted((s for s in shards if s.get("status") == "done"), key=lambda s: s.get("offset", -1))
    expected = 0
    for entry in done:
        if entry.get("offset") != expected:
            report.add(
                "manifest",
                f"shard {entry.get('url')} starts at row {entry.get('offset')}, expected {expected}",
                "create the cache again: the manifest no longer matches its rows",
            )
        expected = entry.get("offset", expected) + entry.get("rows", 0)
    if done and expected != rows:
        report.add("manifest", f"its done shards hold {expected} rows but it records {rows}", "create the cache again")
    for name in ("features", "keys", *ROW_ARRAYS):
        path = f"images/{name}"
        if path not in cache.root:
            report.add(path, "is missing", "create the cache again", rows=f"0:{rows}")
            continue
        try:
            length = cache.root[path].shape[0]
        except Exception as err:  # noqa: BLE001
            report.add(path, f"metadata is unreadable ({one_line(err)})", "create the cache again")
            continue
        if length < rows:
            report.add(
                path,
                f"has {length} rows, the manifest records {rows}",
                _reembed(cache, length, rows),
                rows=f"{length}:{rows}",
            )
    report.checked["shards"] = {
        "done": len(done),
        "total": len(shards),
        "failed": sum(s.get("status") == "failed" for s in shards),
    }
    return True


def _shards_of(cache: Cache, start: int, stop: int) -> list[str]:
    """URLs of the done shards whose rows overlap [start, stop)."""
    out = []
    for entry in cache.manifest.get("shards", []):
        offset, n = entry.get("offset"), entry.get("rows", 0)
        if entry.get("status") == "done" and offset is not None and offset < stop and offset + n > start:
            out.append(entry["url"])
    return out


def _reembed(cache: Cache, start: int, stop: int) -> str:
    urls = _shards_of(cache, start, stop)
    shown = " ".join(urls[:3]) + (f" (+{len(urls) - 3} more)" if len(urls) > 3 else "")
    return (
        f"re-embed the shard(s) of these rows into a new cache (`engine embed {shown} --cache NEW.zarr`), or the "
        "whole set; rows cannot be rewritten in place"
        if urls
        else "create the cache again"
    )


# ----------------------------------------------------------------------------- rows


def _check_rows(cache: Cache, report: _Report, *, block_rows: int, show_progress: bool | None) -> None:
    rows = cache.num_rows
    complete = cache.version >= 2
    damaged: dict[str, list[tuple[int, int]]] = {}
    for name in ("features", "keys", *ROW_ARRAYS):
        path = f"images/{name}"
        if path in cache.root and complete:
            for first, last in missing_chunks(cache.root[path], rows):
                report.add(path, "chunk file is missing", _reembed(cache, first, last), rows=f"{first}:{last}")
                damaged.setdefault(path, []).append((first, last))
    num_classes = len(cache.class_names or []) or None
    num_shards = len(cache.manifest.get("shards", []))
    seen: dict = {}
    stats = {"rows": rows, "norm_min": None, "norm_max": None}
    disable = None if show_progress is None else not show_progress
    with progress(total=rows, desc="verify", unit="row", disable=disable) as bar:
        for start in range(0, rows, block_rows):
            stop = min(rows, start + block_rows)
            blocks = {}
            for name in ("features", "keys", *ROW_ARRAYS):
                path = f"images/{name}"
                if any(a < stop and b > start for a, b in damaged.get(path, [])) or path not in cache.root:
                    continue
                try:
                    blocks[name] = cache.root[path][start:stop]
                except Exception as err:  # noqa: BLE001 - a checksum mismatch, a garbled chunk
                    report.add(
                        path, f"is damaged ({one_line(err)})", _reembed(cache, start, stop), rows=f"{start}:{stop}"
                    )
            _check_values(cache, report, blocks, start, stats, num_classes, num_shards, seen)
            bar.update(stop - start)
    report.checked["rows"] = stats


def _check_values(cache, report, blocks: dict, start: int, stats: dict, num_classes, num_shards: int, seen: dict):
    for name, data in blocks.items():
        bad = impossible_values(name, data, version=cache.version)
        if bad is not None:
            row = start + bad
            report.add(
                f"images/{name}",
                "holds no data (a lost chunk reads as the fill value)",
                _reembed(cache, row, row + 1),
                rows=f"{row}:{row + 1}",
            )
    feats = blocks.get("features")
    if feats is not None and len(feats):
        x = feats.astype(np.float32)
        finite = np.isfinite(x).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], x, 0), axis=1)
        off = np.flatnonzero(finite & (np.abs(norms - 1) > NORM_TOLERANCE))
        if off.size:
            row = start + int(off[0])
            report.add(
                "images/features",
                f"{off.size} rows are not of unit norm (row {row}: {norms[off[0]]:.3f})",
                _reembed(cache, row, row + 1),
                rows=f"{row}:{start + int(off[-1]) + 1}",
            )
        if finite.any():
            low, high = float(norms[finite].min()), float(norms[finite].max())
            stats["norm_min"] = low if stats["norm_min"] is None else min(stats["norm_min"], low)
            stats["norm_max"] = high if stats["norm_max"] is None else max(stats["norm_max"], high)
    for name in ("labels", "true_labels"):
        data = blocks.get(name)
        if data is None or num_classes is None:
            continue
        out = np.flatnonzero((data < -1) | (data >= num_classes))
        out = out[data[out] != np.iinfo(np.int32).min]  # already reported as lost
        if out.size:
            row = start + int(out[0])
            report.add(
                f"images/{name}",
                f"{out.size} values outside [-1, {num_classes}) (row {row}: {data[out[0]]})",
                _reembed(cache, row, row + 1),
                rows=f"{row}:{start + int(out[-1]) + 1}",
            )
    shard = blocks.get("shard")
    if shard is not None:
        _check_provenance(cache, report, shard, blocks.get("position"), start, num_shards)
    keys = blocks.get("keys")
    if keys is not None:
        for offset, key in enumerate(np.asarray(keys, dtype=object).tolist()):
            if key in seen:
                report.add(
                    "images/keys",
                    f"key {key!r} is also row {seen[key]}",
                    "create the cache again: keys must be unique",
                    rows=f"{start + offset}:{start + offset + 1}",
                )
            elif key:
                seen[key] = start + offset


def _check_provenance(cache, report, shard: np.ndarray, position, start: int, num_shards: int) -> None:
    entries = cache.manifest.get("shards", [])
    expected = np.full(len(shard), -1, np.int64)
    for index, entry in enumerate(entries):
        offset, n = entry.get("offset"), entry.get("rows", 0)
        if entry.get("status") == "done" and offset is not None:
            a, b = max(offset, start), min(offset + n, start + len(shard))
            if a < b:
                expected[a - start : b - start] = index
    wrong = np.flatnonzero((expected >= 0) & (shard != expected) & (shard != np.iinfo(np.int32).min))
    if wrong.size:
        row = start + int(wrong[0])
        report.add(
            "images/shard",
            f"{wrong.size} rows name another shard than the manifest's offsets say",
            _reembed(cache, row, row + 1),
            rows=f"{row}:{start + int(wrong[-1]) + 1}",
        )
    if position is not None:
        negative = np.flatnonzero((position < 0) & (position != np.iinfo(np.int32).min))
        if negative.size:
            row = start + int(negative[0])
            report.add("images/position", "negative positions", _reembed(cache, row, row + 1), rows=f"{row}:{row + 1}")


# ----------------------------------------------------------------------------- text, results


def _check_text(cache: Cache, report: _Report) -> None:
    if "text" not in cache.root:
        report.notes.append("no text features: `engine prompts --cache ... --classes ...` adds them (zero-shot)")
        return
    repair = "rerun `engine prompts --cache ... --classes ...`"
    try:
        features, mask = cache.text_features()
    except EngineError as err:
        report.add("text", str(err).split(": ", 2)[-1], repair)
        return
    if not np.isfinite(features.astype(np.float32)).all():
        report.add("text/features", "holds NaN or infinity", repair)
    if not mask.any(axis=1).all():
        report.add("text/mask", "some classes have no prompt", repair)
    names = cache.class_names or []
    if names and features.shape[0] != len(names):
        report.add("text/features", f"has {features.shape[0]} classes, the manifest names {len(names)}", repair)
    report.checked["text"] = {"classes": int(features.shape[0]), "prompts": int(mask.sum())}


def _check_results(cache: Cache, report: _Report) -> None:
    from engine.results import GROUPS, IndexGroup, Neighbors, Selection, Training

    found = {}
    for kind in GROUPS:
        if not cache.has_group(kind.NAME):
            continue
        repair = f"rerun `{kind.COMMAND} --cache {cache.path}`"
        try:
            value = kind.read(cache)
        except EngineError as err:
            report.add(kind.NAME, str(err).split(f"{cache.path}", 1)[-1].lstrip(": "), repair)
            continue
        found[kind.NAME] = value
        if kind is Neighbors:
            _check_neighbors(cache, report, value, repair)
        if kind is IndexGroup:
            from engine.index import IndexInfo, index_is_stale

            if index_is_stale(IndexInfo.from_dict(value.info), cache, keys=cache.keys()):
                report.add("index", "was built on other rows than the cache holds now", repair)
    if Training.NAME in found and Selection.NAME in found:
        if found[Training.NAME].attrs.get("written", 0) < found[Selection.NAME].attrs.get("written", 0):
            report.notes.append("train/ predates the current selection: rerun `engine train` before exporting")
    report.checked["results"] = sorted(found)


def _check_neighbors(cache: Cache, report: _Report, value, repair: str) -> None:
    from engine.index import row_fingerprint

    ids = np.asarray(value.ids)
    if ids.shape[0] != cache.num_rows:
        report.add("knn", f"covers {ids.shape[0]} rows, the cache has {cache.num_rows}", repair)
    elif ids.size and (ids.min() < -1 or ids.max() >= cache.num_rows):
        report.add("knn", "names rows that do not exist", repair)
    elif value.fingerprint != row_fingerprint(cache, keys=cache.keys()):
        report.add("knn", "was computed on other rows than the cache holds now", repair)


# ----------------------------------------------------------------------------- leftovers, lock


def _check_leftovers(cache: Cache, report: _Report) -> None:
    if "staging" in cache.root:
        for name in group_names(cache.root["staging"]):
            attrs = dict(cache.root[f"staging/{name}"].attrs)
            if attrs.get("committed"):
                report.notes.append(
                    f"staging/{name}: a shard a killed run finished but did not append; "
                    "the next `engine embed` into this cache appends it"
                )
            else:
                report.notes.append(
                    f"staging/{name}: an unfinished shard of a killed run; the next "
                    "`engine embed` that finishes this shard removes it"
                )
    pointed = set(dict(cache.root[RESULTS].attrs).values()) if RESULTS in cache.root else set()
    for name in group_names(cache.root):
        base, _, token = name.partition(".")
        started = token.split("-")[0]
        if token and started.isdigit() and name not in pointed:
            age = time.time() - int(started)
            when = "removed by the next write of this group" if age > STALE_GROUP_S else "a run may still be writing it"
            report.notes.append(f"{name}: an unused {base} group ({age / 3600:.1f} h old; {when})")


def _check_lock(cache: Cache, report: _Report) -> None:
    if is_local(cache.path):
        from engine.files import lock_folder

        fd = lock_folder(cache.path, wait=False)
        if fd is None:
            report.notes.append("the cache's lock is held: a job is writing into it now")
        else:
            os.close(fd)
        return
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(cache.path)
        lock = f"{root.rstrip('/')}/engine.lock"
        if fs.exists(lock):
            report.notes.append(
                "engine.lock exists: a job holds the S3 lease, or one died holding it "
                f"(it expires after {os.environ.get('ENGINE_LOCK_TTL_S', '60')} s)"
            )
    except Exception as err:  # noqa: BLE001 - the lock is a note, not a verdict
        report.notes.append(f"the lock could not be checked ({one_line(err)})")


def summary_lines(s: dict):
    state = "ok" if s["ok"] else f"{len(s['problems'])} problem(s)"
    yield f"cache {s['cache']}: {state} | {s['rows']} rows, format {s['version']} | {s['seconds']} s"
    for p in s["problems"]:
        rows = f" rows {p['rows']}" if p["rows"] else ""
        yield f"  problem: {p['where']}{rows}: {p['reason']}"
        yield f"    repair: {p['repair']}"
    for note in s["notes"]:
        yield f"  note: {note}"

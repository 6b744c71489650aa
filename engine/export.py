"""`engine export`: the label table (CSV or Parquet, one row per sample in cache order) and cleaned
WebDataset shards (source samples copied byte for byte, `cls` the label to train with and
`cls_given` the given one), resumable per output shard through `engine.outputs.UnitFolder`. Which
label goes where: docs/commands.md#export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.cache import Cache, is_local
from engine.files import json_kind
from engine.outputs import Resume, UnitFolder, records_problem
from engine.results import Selection, Training
from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

TABLE_FORMATS = {"csv": ".csv", "parquet": ".parquet"}
KEEP_MODES = ("selected", "all")
MANIFEST_NAME = "export.json"
MANIFEST_FORMAT = "engine-export"
MANIFEST_VERSION = 1
TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------- what the cache says per row
@dataclass(frozen=True)
class CacheRows:
    """Per-row arrays of a cache with a selection; all (N,) in cache order."""

    keys: np.ndarray  # object str
    labels: np.ndarray  # int32 given label, -1 = none
    selected: np.ndarray  # bool, the final selection
    shard: np.ndarray  # int32 index into `urls`, -1 = no source shard (imported)
    position: np.ndarray  # int32 sample position within its shard
    urls: list
    class_names: list
    selection: dict  # the selection's table columns (name → (N,)), `Selection.table_columns`
    selection_written: float
    true_labels: np.ndarray | None = None
    mixfix_labels: np.ndarray | None = None  # int32, the train group's final labels y'
    mixfix_selected: np.ndarray | None = None  # bool, the train group's final training set
    train_written: float | None = None

    @property
    def num_rows(self) -> int:
        return len(self.keys)


def read_cache_rows(cache: Cache) -> CacheRows:
    """Everything an export needs; errors name `engine select` / `engine train` when stale or absent."""
    stored = Selection.read(cache)
    attrs = stored.attrs
    shard, position = cache.provenance()
    mixfix = {}
    if Training.exists(cache):
        mixfix = _read_train(cache, float(attrs.get("written", 0.0)))
    return CacheRows(
        keys=cache.keys(),
        labels=cache.labels(),
        selected=stored.selected,
        shard=np.asarray(shard, np.int32),
        position=np.asarray(position, np.int32),
        urls=[s["url"] for s in cache.manifest.get("shards", [])],
        class_names=list(cache.class_names or []),
        selection=stored.table_columns(),
        selection_written=float(attrs.get("written", 0.0)),
        true_labels=cache.true_labels(),
        **mixfix,
    )


def _read_train(cache: Cache, selection_written: float) -> dict:
    trained = Training.read(cache)
    written = float(trained.attrs.get("written", 0.0))
    if written < selection_written:
        raise EngineError(
            f"cache: the train results in {cache.path} predate its selection (their labels belong to "
            f"an earlier selection); rerun `engine train --cache {cache.path}`"
        )
    return {"mixfix_labels": trained.labels, "mixfix_selected": trained.selection, "train_written": written}


# ---------------------------------------------------------------- label table
def check_table_target(out: str | None, table_format: str | None) -> None:
    """Fail before any work when --out/--format are inconsistent."""
    if table_format is not None and table_format not in TABLE_FORMATS:
        raise EngineError(f"format: got {table_format!r}, expected one of {', '.join(TABLE_FORMATS)}")
    if out is None:
        if table_format is not None:
            raise EngineError(f"format: --format {table_format} needs --out FILE{TABLE_FORMATS[table_format]}")
        return
    suffix = next((s for s in TABLE_FORMATS.values() if str(out).endswith(s)), None)
    if table_format is not None and suffix != TABLE_FORMATS[table_format]:
        raise EngineError(
            f"out: got {str(out)!r}, but --format {table_format} expects a {TABLE_FORMATS[table_format]} path"
        )
    if suffix is None:
        raise EngineError(f"out: got {str(out)!r}, expected a .csv or .parquet path")


def _lookup(values: list, index: np.ndarray) -> np.ndarray:
    """values[index] as an object array, None where index is -1 or out of range."""
    table = np.array(list(values) + [None], dtype=object)
    index = np.asarray(index, np.int64)
    return table[np.where((index >= 0) & (index < len(values)), index, -1)]


def label_table(rows: CacheRows) -> dict[str, np.ndarray]:
    """Columns (each (N,)) of the export table in order: key, label, class, selected, the selection's
    other columns (names as in `engine select --out`), mixfix_label and mixfix_selected (when
    trained), true_label (when known), shard (url), position."""
    columns = {
        "key": rows.keys,
        "label": rows.labels,
        "class": _lookup(rows.class_names, rows.labels),
        "selected": rows.selected,
    }
    for name, values in rows.selection.items():
        if name != "selected":
            columns[name] = values
    if rows.mixfix_labels is not None:
        columns["mixfix_label"] = rows.mixfix_labels
        columns["mixfix_selected"] = rows.mixfix_selected
    if rows.true_labels is not None:
        columns["true_label"] = rows.true_labels
    columns["shard"] = _lookup(rows.urls, rows.shard)
    columns["position"] = rows.position
    return columns


def write_label_table(rows: CacheRows, out: str) -> dict:
    from engine.stages import write_table

    columns = label_table(rows)
    # written under a temp name in the same folder (same suffix: it picks the format), then renamed:
    # a failed or killed export never leaves a half-written table in place of an earlier one
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".parquet" if str(out).endswith(".parquet") else ".csv"
    tmp = target.with_name(f".{target.name}.{os.getpid()}{TMP_SUFFIX}{suffix}")
    try:
        write_table(str(tmp), columns, class_names=rows.class_names)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "out": str(out),
        "format": "parquet" if str(out).endswith(".parquet") else "csv",
        "rows": rows.num_rows,
        "columns": list(columns),
    }


def export_table(cache_path: str, out: str, *, table_format: str | None = None) -> dict:
    """Write the label table of `cache_path` to `out` (.csv or .parquet)."""
    check_table_target(out, table_format)
    return write_label_table(read_cache_rows(Cache(cache_path)), out)


# ---------------------------------------------------------------- output shard names
_BRACE = re.compile(r"\{(\d+)\.\.(\d*)\}")
_PERCENT = re.compile(r"%(0?)(\d*)d")


@dataclass(frozen=True)
class ShardPattern:
    """Output shard names: `OUT/{000000..}.tar` (open-ended brace, width = digits), a closed brace
    range `OUT/{000000..000099}.tar` (an error when the export needs more), or `OUT/x-%06d.tar`.
    `%5d` (space padded) is refused; numbers wider than the padding (`{0..}` past 9) are an error
    in `check_capacity`, since such names no longer sort in shard order."""

    spec: str
    directory: Path
    template: str  # a str.format template with one {index} field
    start: int = 0
    stop: int | None = None
    width: int = 1  # digits of the zero-padded number
    prefix: str = ""  # the file name around the number
    suffix: str = ".tar"

    @classmethod
    def parse(cls, spec: str) -> ShardPattern:
        directory, name = os.path.split(spec)
        expected = "expected a pattern like OUT/{000000..}.tar or OUT/clean-%06d.tar"
        parent = next((p for p in [Path(directory), *Path(directory).parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise EngineError(f"shards: got {spec!r}, but {parent} is a file; expected a folder for the shards")
        if _BRACE.search(directory) or _PERCENT.search(directory):
            raise EngineError(f"shards: got {spec!r}; the number must be in the file name, not the folder; {expected}")
        braces, percents = _BRACE.findall(name), _PERCENT.findall(name)
        if len(braces) + len(percents) != 1 or name.count("%") != len(percents):
            raise EngineError(f"shards: got {spec!r}; {expected} (one numbered field)")
        if not name.endswith(".tar"):
            raise EngineError(f"shards: got {spec!r}; expected a name ending in .tar")
        match = _BRACE.search(name) or _PERCENT.search(name)
        if braces:
            first, last = braces[0]
            field_ = "{index:0" + str(len(first)) + "d}"
            start, stop = int(first), (int(last) + 1 if last else None)
            if stop is not None and stop <= start:
                raise EngineError(f"shards: got {spec!r}; the range {first}..{last} is empty")
            width = len(first)
        else:
            zero, digits = percents[0]
            if digits and not zero and int(digits) > 1:
                raise EngineError(
                    f"shards: got {spec!r}; %{digits}d pads with spaces; use %0{digits}d "
                    "(file names without spaces that sort in shard order)"
                )
            field_, start, stop = f"{{index:{zero}{digits}d}}", 0, None
            width = max(int(digits or 0), 1)
        prefix, suffix = name[: match.start()], name[match.end() :]
        template = _braces_doubled(prefix) + field_ + _braces_doubled(suffix)
        return cls(
            spec=spec,
            directory=Path(directory or "."),
            template=template,
            start=start,
            stop=stop,
            width=width,
            prefix=prefix,
            suffix=suffix,
        )

    def name(self, shard: int) -> str:
        return self.template.format(index=self.start + shard)

    def path(self, shard: int) -> Path:
        return self.directory / self.name(shard)

    def matches(self, name: str) -> bool:
        """Whether `name` is a file name this pattern could produce (any number)."""
        return re.fullmatch(re.escape(self.prefix) + r"\d+" + re.escape(self.suffix), name) is not None

    def check_capacity(self, shards: int) -> None:
        if self.stop is not None and self.start + shards > self.stop:
            raise EngineError(
                f"shards: {self.spec!r} names {self.stop - self.start} shards but the export needs "
                f"{shards}; widen the range, raise --per-shard, or leave the range open ({{000000..}})"
            )
        last = self.start + shards - 1
        if shards and len(str(last)) > self.width:
            raise EngineError(
                f"shards: {self.spec!r} pads the number to {self.width} digit(s) but the export needs "
                f"shards up to {last}, whose names would not sort in shard order; pad it, e.g. "
                f"{{000000..}} or %06d"
            )


def _braces_doubled(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


# ---------------------------------------------------------------- the shard plan
@dataclass(frozen=True)
class ShardExportConfig:
    """keep: "selected" (the final selection) or "all"; per_shard: samples per output shard;
    overwrite: replace an export of another plan in the same folder; verify: on a resume, re-hash
    the finished shards (not only their size) and rewrite those whose sha256 differs."""

    keep: str = "selected"
    per_shard: int = 1000
    overwrite: bool = False
    verify: bool = False

    def __post_init__(self):
        if self.keep not in KEEP_MODES:
            raise EngineError(f"keep: got {self.keep!r}, expected one of {', '.join(KEEP_MODES)}")
        if not isinstance(self.per_shard, int) or self.per_shard < 1:
            raise EngineError(f"per-shard: got {self.per_shard!r}, expected a positive integer")


@dataclass(frozen=True)
class ExportPlan:
    """Which cache rows go, in order, into which output shard, and with which labels.

    rows (M,) int64 cache rows; labels (M,) int32 the `cls` to write; given (M,) int32;
    selected (M,) bool. Output shard j holds plan entries [j * per_shard, (j + 1) * per_shard)."""

    rows: np.ndarray
    labels: np.ndarray
    given: np.ndarray
    selected: np.ndarray
    per_shard: int
    keep: str
    labels_from: str
    fingerprint: str
    description: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return -(-len(self.rows) // self.per_shard)

    def shard_of(self, entries: np.ndarray) -> np.ndarray:
        return np.asarray(entries) // self.per_shard

    def entries(self, shard: int) -> range:
        return range(shard * self.per_shard, min(len(self.rows), (shard + 1) * self.per_shard))


def plan_export(rows: CacheRows, *, cache_path: str, pattern: ShardPattern, config: ShardExportConfig) -> ExportPlan:
    """The deterministic plan for `config` over `rows`, with a fingerprint of everything it depends on."""
    if config.keep == "all" and rows.mixfix_labels is None:
        raise EngineError(
            f"keep: --keep all writes the MixFix-corrected labels, but {cache_path} has no train "
            f"results; run `engine train --cache {cache_path}` first (or use --keep selected)"
        )
    picked = np.arange(rows.num_rows) if config.keep == "all" else np.flatnonzero(rows.selected)
    source = rows.mixfix_labels if rows.mixfix_labels is not None else rows.labels
    description = {
        "cache": os.path.abspath(cache_path) if is_local(cache_path) else cache_path,
        "cache_rows": rows.num_rows,
        "keep": config.keep,
        "per_shard": config.per_shard,
        "pattern": os.path.abspath(pattern.spec),
        "selection_written": rows.selection_written,
        "train_written": rows.train_written,
        "samples": int(len(picked)),
    }
    plan = dict(
        rows=picked.astype(np.int64),
        labels=source[picked].astype(np.int32),
        given=rows.labels[picked].astype(np.int32),
        selected=rows.selected[picked],
    )
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for name in ("rows", "labels", "given", "selected"):
        digest.update(np.ascontiguousarray(plan[name]).tobytes())
    return ExportPlan(
        **plan,
        per_shard=config.per_shard,
        keep=config.keep,
        labels_from="mixfix" if rows.mixfix_labels is not None else "given",
        fingerprint=digest.hexdigest(),
        description=description,
    )


# ---------------------------------------------------------------- export.json
def _shard_record_ok(entry: dict) -> bool:
    return isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256", ""), str)


def _shape_problem(manifest) -> str | None:
    """Why `manifest` (parsed JSON) is not an export.json the code can use; None when it is."""
    if not isinstance(manifest, dict):
        return f"holds {json_kind(manifest)}, expected an object"
    if not isinstance(manifest.get("plan", {}), dict):
        return f'has {json_kind(manifest["plan"])} as "plan", expected an object'
    return records_problem(
        manifest.get("shards"),
        name="shards",
        expected=dict,
        check=_shard_record_ok,
        what="an object with bytes and sha256",
    )


def _folder(pattern: ShardPattern) -> UnitFolder:
    return UnitFolder(
        pattern.directory,
        command="export",
        manifest_name=MANIFEST_NAME,
        kind="an export manifest",
        format=MANIFEST_FORMAT,
        shape_problem=_shape_problem,
        units_of=lambda m: m["shards"],
        option="shards",
        temp_suffix=TMP_SUFFIX,
    )


def _write_manifest(folder: UnitFolder, manifest: dict) -> None:
    """Write export.json atomically: a temp file, fsynced, renamed over it."""
    manifest["updated"] = time.time()
    folder.save(manifest, sort_keys=True)


def _plan_change(old: dict, plan: ExportPlan) -> str:
    was, now = old.get("plan", {}), plan.description
    return (
        f"cache {was.get('cache')}, keep {was.get('keep')}, {was.get('per_shard')} per shard, "
        f"{was.get('samples')} samples; this run: cache {now['cache']}, keep {now['keep']}, "
        f"{now['per_shard']} per shard, {now['samples']} samples"
    )


def commit_manifest(
    folder: UnitFolder,
    pattern: ShardPattern,
    plan: ExportPlan,
    resume: Resume,
    pending: list[int],
    *,
    keep: frozenset = frozenset(),
) -> dict:
    """The first write of a run, once every check has passed: a resumed export.json forgets the
    shards about to be rewritten; otherwise the earlier export is removed and a fresh one written."""
    names = [pattern.name(j) for j in range(plan.num_shards)]
    folder.clean(resume, names, protect=keep)
    if resume.manifest is not None:
        manifest = resume.manifest
        stale = [pattern.name(j) for j in pending if pattern.name(j) in manifest["shards"]]
        if stale:
            for name in stale:
                del manifest["shards"][name]
            manifest["complete"] = False
            _write_manifest(folder, manifest)
        return manifest
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": plan.fingerprint,
        "plan": {**plan.description, "shards": plan.num_shards, "labels_from": plan.labels_from},
        "shards": {},
        "complete": False,
    }
    pattern.directory.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, manifest)
    return manifest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished(path: Path, entry: dict, *, verify: bool) -> bool:
    """An output shard recorded in export.json whose file is still there with the recorded size (the
    fast check: a same-size corruption passes it) and, with `verify`, the recorded sha256."""
    if not (path.is_file() and path.stat().st_size == entry["bytes"]):
        return False
    if verify and _file_sha256(path) != entry.get("sha256"):
        _logger.warning("--verify: %s differs from the sha256 in %s; writing it again", path, MANIFEST_NAME)
        return False
    return True


# ---------------------------------------------------------------- reading the sources
def check_sources(rows: CacheRows, plan: ExportPlan, pending: list[int], *, cache_path: str) -> list[str]:
    """The source shard urls the pending output shards need; an error naming the first missing one."""
    entries = (
        np.concatenate([np.arange(plan.entries(j).start, plan.entries(j).stop) for j in pending])
        if pending
        else np.zeros(0, np.int64)
    )
    shards = np.unique(rows.shard[plan.rows[entries]])
    if shards.size and (shards.min() < 0 or shards.max() >= len(rows.urls)):
        raise EngineError(
            f"cache: {cache_path} records no source shard for some rows (imported features?); "
            "cleaned shards need a cache made by `engine embed`"
        )
    urls = [rows.urls[s] for s in shards.tolist()]
    missing = [u for u in urls if is_local(u) and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        more = f"; {len(missing)} of the {len(urls)} source shards needed are missing" if len(missing) > 1 else ""
        raise EngineError(f"shard: {missing[0]!r} is no longer there (moved or deleted since it was embedded){more}")
    return urls


def iter_source_samples(rows: CacheRows, plan: ExportPlan, entries: np.ndarray):
    """(plan entry, raw sample) for `entries` (ascending plan indices), reading each run of rows from
    one source shard in a single pass; the sample's key is checked against the cache."""
    cache_rows = plan.rows[entries]
    shard = rows.shard[cache_rows]
    cuts = np.flatnonzero(np.diff(shard)) + 1
    for run in np.split(np.arange(len(entries)), cuts):
        if not run.size:
            continue
        url = rows.urls[int(shard[run[0]])]
        positions = rows.position[cache_rows[run]]
        if np.any(np.diff(positions) <= 0):
            raise EngineError(f"cache: rows of shard {url} are not in position order; the cache is inconsistent")
        yield from _read_run(url, positions, entries[run], rows.keys[cache_rows[run]])


def _read_run(url: str, positions: np.ndarray, entries: np.ndarray, keys: np.ndarray):
    from engine.reader import read_samples

    changed = f"shard {url} changed since it was embedded"
    count = 0
    try:
        samples = read_samples(url, positions.tolist())
        for (position, sample), want, entry, key in zip(samples, positions, entries, keys):
            if position != want:
                raise EngineError(f"{changed}: expected the sample at position {want}, read {position}")
            if sample.get("__key__") != key:
                raise EngineError(
                    f"{changed}: position {position} holds key {sample.get('__key__')!r}, "
                    f"the cache recorded {key!r}; embed it again or restore the original"
                )
            count += 1
            yield int(entry), sample
    except ValueError as err:
        raise EngineError(f"shard: cannot read {url}: {err}") from None
    if count != len(positions):
        raise EngineError(
            f"{changed}: it ends before position {int(positions[count])} (the cache recorded more samples)"
        )


# ---------------------------------------------------------------- writing
class _HashingFile:
    """A write-only file that hashes what passes through (sha256) and counts bytes."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def output_sample(sample: dict, *, label: int, given: int, selected: bool | None) -> dict:
    """The sample to write: every source field byte-for-byte, `cls` = label, `cls_given` = given
    (absent when -1), and with --keep all `selected` = b"1"/b"0"."""
    out = {k: v for k, v in sample.items() if not k.startswith("__")}
    out["__key__"] = sample["__key__"]
    for name, value in (("cls", label), ("cls_given", given)):
        if value >= 0:
            out[name] = str(int(value)).encode()
        else:
            out.pop(name, None)
    if selected is not None:
        out["selected"] = b"1" if selected else b"0"
    return out


class _ShardWriter:
    """One output shard: written under NAME.tmp, renamed and recorded in export.json on `finish`."""

    def __init__(self, folder: UnitFolder, pattern: ShardPattern, shard: int, *, mtime: float):
        import webdataset as wds

        self.shard, self.path, self.folder = shard, pattern.path(shard), folder
        self.tmp = folder.temp_path(self.path.name)
        self.file = _HashingFile(self.tmp)
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=mtime)
        self.rows = 0

    def write(self, sample: dict) -> None:
        self.tar.write(sample)
        self.rows += 1

    def finish(self, manifest: dict) -> None:
        self.tar.close()
        self.file.close()
        os.replace(self.tmp, self.path)
        manifest["shards"][self.path.name] = {
            "rows": self.rows,
            "bytes": self.file.bytes,
            "sha256": self.file.sha256.hexdigest(),
        }
        _write_manifest(self.folder, manifest)

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_pending(
    rows: CacheRows,
    plan: ExportPlan,
    pending: list[int],
    *,
    folder: UnitFolder,
    pattern: ShardPattern,
    manifest: dict,
    progress=None,
) -> int:
    """Write the `pending` output shards in order, streaming each needed source run once; returns rows written."""
    if not pending:
        return 0
    entries = np.concatenate([np.arange(plan.entries(j).start, plan.entries(j).stop) for j in pending])
    mtime = int(max(plan.description["selection_written"], plan.description["train_written"] or 0))
    keep_all = plan.keep == "all"
    writer, written = None, 0
    try:
        for entry, sample in iter_source_samples(rows, plan, entries):
            shard = entry // plan.per_shard
            if writer is None or writer.shard != shard:
                if writer is not None:
                    writer.finish(manifest)
                writer = _ShardWriter(folder, pattern, shard, mtime=mtime)
            writer.write(
                output_sample(
                    sample,
                    label=int(plan.labels[entry]),
                    given=int(plan.given[entry]),
                    selected=bool(plan.selected[entry]) if keep_all else None,
                )
            )
            written += 1
            if progress is not None:
                progress(1)
        if writer is not None:
            writer.finish(manifest)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return written


# ---------------------------------------------------------------- entry points
@dataclass
class _ShardJob:
    rows: CacheRows
    plan: ExportPlan
    pattern: ShardPattern
    manifest: dict
    pending: list
    skipped: int
    folder: UnitFolder


def prepare_shards(rows: CacheRows, pattern: ShardPattern, config: ShardExportConfig, *, cache_path: str) -> _ShardJob:
    """Plan, check export.json and the source shards, then (only then) replace an earlier export
    (--overwrite) or write export.json; no shard is written here."""
    plan = plan_export(rows, cache_path=cache_path, pattern=pattern, config=config)
    pattern.check_capacity(plan.num_shards)
    sources = {os.path.abspath(u) for u in rows.urls if is_local(u)}
    clash = next((pattern.path(j) for j in range(plan.num_shards) if os.path.abspath(pattern.path(j)) in sources), None)
    if clash is not None:
        raise EngineError(f"shards: {clash} is one of the cache's source shards; write the export to another folder")
    folder = _folder(pattern)
    resume = folder.start(
        fingerprint=plan.fingerprint,
        names=[pattern.name(j) for j in range(plan.num_shards)],
        overwrite=config.overwrite,
        changes=lambda old: _plan_change(old, plan),
        stray=pattern.matches,
        is_done=lambda name, entry: _finished(pattern.directory / name, entry, verify=config.verify),
    )
    pending = [j for j in range(plan.num_shards) if pattern.name(j) not in resume.done]
    check_sources(rows, plan, pending, cache_path=cache_path)
    # every check passed: only now is anything removed or written
    manifest = commit_manifest(folder, pattern, plan, resume, pending, keep=frozenset(sources))
    return _ShardJob(rows, plan, pattern, manifest, pending, skipped=plan.num_shards - len(pending), folder=folder)


def run_shards(job: _ShardJob, *, show_progress: bool | None = None) -> dict:
    from engine.runtime import progress

    plan, started = job.plan, time.perf_counter()
    total = sum(len(plan.entries(j)) for j in job.pending)
    disable = None if show_progress is None else not show_progress
    with progress(total=total, desc="export", unit="img", disable=disable) as bar:
        written = write_pending(
            job.rows,
            plan,
            job.pending,
            folder=job.folder,
            pattern=job.pattern,
            manifest=job.manifest,
            progress=bar.update,
        )
    job.manifest["complete"] = True
    _write_manifest(job.folder, job.manifest)
    seconds = time.perf_counter() - started
    return {
        "pattern": job.pattern.spec,
        "dir": str(job.pattern.directory),
        "keep": plan.keep,
        "per_shard": plan.per_shard,
        "labels_from": plan.labels_from,
        "samples": int(len(plan.rows)),
        "shards": plan.num_shards,
        "written": len(job.pending),
        "skipped": job.skipped,
        "rows_written": written,
        "relabelled": int((plan.labels != plan.given).sum()),
        "unlabelled": int((plan.labels < 0).sum()),
        "first": str(job.pattern.path(0)) if plan.num_shards else None,
        "last": str(job.pattern.path(plan.num_shards - 1)) if plan.num_shards else None,
        "manifest": str(job.pattern.directory / MANIFEST_NAME),
        "seconds": round(seconds, 3),
        "samples_per_s": round(written / seconds, 1) if written and seconds > 0 else None,
    }


def export_shards(
    cache_path: str, pattern: str, config: ShardExportConfig = ShardExportConfig(), *, show_progress: bool | None = None
) -> dict:
    """Write cleaned WebDataset shards of `cache_path`'s source samples to `pattern` (resumable)."""
    parsed = ShardPattern.parse(pattern)
    with _locked(parsed):
        job = prepare_shards(read_cache_rows(Cache(cache_path)), parsed, config, cache_path=cache_path)
        return run_shards(job, show_progress=show_progress)


def export_cache(
    cache_path: str,
    *,
    out: str | None = None,
    table_format: str | None = None,
    shards: str | None = None,
    config: ShardExportConfig = ShardExportConfig(),
    show_progress: bool | None = None,
) -> dict:
    """`engine export`: the label table (`out`) and/or cleaned shards (`shards`); every input is
    checked (paths, selection, train results, source shards) before anything is written."""
    check_table_target(out, table_format)
    if out is None and shards is None:
        raise EngineError("export: nothing to do; give --out FILE.csv|FILE.parquet and/or --shards OUT/{000000..}.tar")
    pattern = ShardPattern.parse(shards) if shards is not None else None
    rows = read_cache_rows(Cache(cache_path))
    with _locked(pattern) if pattern is not None else contextlib.nullcontext():
        job = prepare_shards(rows, pattern, config, cache_path=cache_path) if pattern is not None else None
        summary = {
            "cache": cache_path,
            "rows": rows.num_rows,
            "selected": int(rows.selected.sum()),
            "trained": rows.mixfix_labels is not None,
        }
        if out is not None:
            summary["table"] = write_label_table(rows, out)
        if job is not None:
            summary["shards"] = run_shards(job, show_progress=show_progress)
    return summary


@contextlib.contextmanager
def _locked(pattern: ShardPattern):
    """One export at a time into a folder; the folder is only made once the lock can be taken."""
    if not pattern.directory.is_dir():
        yield  # nothing there yet: checks come first, the folder is made by the first write
        return
    with _folder(pattern).lock():
        yield

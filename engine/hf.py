"""Hugging Face datasets on disk: the layouts `datasets` writes and the Hub serves, their feature
metadata, and their rows read in record batches (never a whole table in memory).

Layouts (ROOT of `engine pack`):

- Parquet: a `.parquet` file, a glob, or a folder holding `.parquet` files at any depth (the Hub's
  `data/train-00000-of-00002.parquet`, its conversion's `train/0000.parquet`). A file's split is
  the SPLIT of a `SPLIT-NNNNN-of-NNNNN.parquet` name, else the folder holding it (unless that is
  the dataset folder itself or `data`), else `train` — as `datasets.load_dataset("parquet")` does.
- `save_to_disk`: a folder with `state.json` (one split; Arrow IPC stream files listed in it, the
  features in `dataset_info.json`), or with `dataset_dict.json` (a subfolder per split).

The features are the `datasets.Features` JSON stored with the data (the Arrow schema metadata
under b"huggingface", or `dataset_info.json`): the image column is the one `Image` feature, the
label column the one `ClassLabel` feature (its names are the classes), unless named. Image
values are `{bytes, path}` structs (raw binary and path-string columns are read too); a row
without bytes is read from its path, relative to the dataset folder.

`with_features` goes the other way: a table written by the engine, with the b"huggingface" schema
metadata under which `datasets` loads its class-index columns as `ClassLabel`.

pyarrow is imported inside the functions (only `engine pack` on a Hugging Face dataset and
Parquet tables need it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from engine.runtime import EngineError

SPLIT_NAME = re.compile(r"(?P<split>.+?)-\d{5}-of-\d{5}")  # what `datasets` writes and the Hub serves
DEFAULT_SPLIT = "train"
CLASS_COLUMNS = ("label", "mixfix_label", "true_label")  # plus every "<classifier>/prediction"
_DTYPES = {
    "bool": "bool",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "halffloat": "float16",
    "float": "float32",
    "double": "float64",
    "string": "string",
    "large_string": "large_string",
    "null": "null",
}


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EngineError(
            "root: reading a Hugging Face dataset needs pyarrow (`pip install 'engine[parquet]'`)"
        ) from None
    return pa, pq


# ---------------------------------------------------------------- layouts


def is_dataset(root: str | os.PathLike) -> bool:
    """Whether ROOT names a Hugging Face dataset: a `.parquet` file or a glob of them, a
    `save_to_disk` folder, or a folder with `.parquet` files in it or one folder down (an image
    folder is never taken for one: it holds no Parquet files there)."""
    root = str(root)
    if glob.has_magic(root):
        return True
    if os.path.isfile(root):
        return root.endswith(".parquet")
    if not os.path.isdir(root):
        return False
    if any(os.path.isfile(os.path.join(root, name)) for name in ("dataset_dict.json", "state.json")):
        return True
    return bool(glob.glob(os.path.join(glob.escape(root), "*.parquet"))) or bool(
        glob.glob(os.path.join(glob.escape(root), "*", "*.parquet"))
    )


def _split_of(path: str, base: str) -> str:
    stem = os.path.basename(path)[: -len(".parquet")]
    match = SPLIT_NAME.fullmatch(stem)
    if match:
        return match.group("split")
    folder = os.path.dirname(os.path.abspath(path))
    if folder != os.path.abspath(base) and os.path.basename(folder) not in ("data", ""):
        return os.path.basename(folder)
    return DEFAULT_SPLIT


def _parquet_splits(files: list[str], base: str) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    for path in sorted(files):
        splits.setdefault(_split_of(path, base), []).append(path)
    return splits


def _saved_split(folder: str) -> list[str]:
    """The Arrow files of one `save_to_disk` split folder, in order (from its state.json)."""
    from engine.files import read_json

    state_path = os.path.join(folder, "state.json")
    try:
        state = read_json(state_path)
        names = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise EngineError(f"root: {state_path} is not a `save_to_disk` state file ({err})") from None
    return [os.path.join(folder, name) for name in names]


def _layout(root: str) -> tuple[str, dict[str, list[str]], str]:
    """(kind "parquet" | "arrow", {split: data files in order}, the dataset folder)."""
    if glob.has_magic(root):
        files = sorted(p for p in glob.glob(root, recursive=True) if os.path.isfile(p))
        base = os.path.dirname(root[: min(root.find(c) for c in "*?[" if c in root)]) or "."
        kinds = {os.path.splitext(p)[1] for p in files}
        if not files:
            raise EngineError(f"root: {root!r} matches no files, expected .parquet files (or .arrow files)")
        if not kinds <= {".parquet", ".arrow"} or len(kinds) != 1:
            raise EngineError(
                f"root: {root!r} matches {len(files)} files ({', '.join(sorted(kinds))}), "
                "expected .parquet files (or .arrow files), one kind"
            )
        if kinds == {".arrow"}:
            return "arrow", {DEFAULT_SPLIT: files}, base
        return "parquet", _parquet_splits(files, base), base
    if os.path.isfile(root):
        return "parquet", {_split_of(root, os.path.dirname(root)): [root]}, os.path.dirname(root) or "."
    if os.path.isfile(os.path.join(root, "dataset_dict.json")):
        from engine.files import read_json

        try:
            names = read_json(os.path.join(root, "dataset_dict.json"))["splits"]
        except (ValueError, KeyError, TypeError) as err:
            raise EngineError(f"root: {root}/dataset_dict.json is not a `save_to_disk` file ({err})") from None
        return "arrow", {name: _saved_split(os.path.join(root, name)) for name in names}, root
    if os.path.isfile(os.path.join(root, "state.json")):
        return "arrow", {DEFAULT_SPLIT: _saved_split(root)}, root
    files = glob.glob(os.path.join(glob.escape(root), "**", "*.parquet"), recursive=True)
    if not files:
        raise EngineError(f"root: {root!r} holds no .parquet files, state.json or dataset_dict.json")
    return "parquet", _parquet_splits(files, root), root


# ---------------------------------------------------------------- features and columns


@dataclass(frozen=True)
class Source:
    """One split of a Hugging Face dataset, ready to read: its data files (in row order) with
    their row counts, the chosen columns, and the class names of the label column (or None)."""

    kind: str  # "parquet" or "arrow" (IPC stream files, as `save_to_disk` writes them)
    files: tuple[str, ...]
    rows: tuple[int, ...]
    split: str
    splits: tuple[str, ...]
    base: str  # the dataset folder: relative image paths are read from here
    image: str
    label: str
    key: str | None
    true_label: str | None
    class_names: tuple[str, ...] | None
    image_type: str  # "struct" ({bytes, path}), "binary" or "path"

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def spec(self) -> dict:
        """What a worker process needs to read images (plain, picklable)."""
        return {
            "kind": self.kind,
            "files": list(self.files),
            "rows": list(self.rows),
            "base": self.base,
            "image": self.image,
            "image_type": self.image_type,
        }

    def record(self) -> dict:
        """For pack.json and the plan's fingerprint: every data file's size and modification time."""
        files = []
        for path, rows in zip(self.files, self.rows):
            info = os.stat(path)
            files.append([os.path.relpath(path, self.base), rows, info.st_size, info.st_mtime_ns])
        return {
            "kind": self.kind,
            "split": self.split,
            "columns": {"image": self.image, "label": self.label, "key": self.key, "true_label": self.true_label},
            "files": files,
        }


def read_features(schema, fallback: str | None = None) -> dict:
    """The `datasets` features JSON of an Arrow schema (b"huggingface" metadata), else of the
    `dataset_info.json` at `fallback`; {} when neither has any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    doc = None
    if raw:
        try:
            doc = (json.loads(raw).get("info") or {}).get("features")
        except (ValueError, AttributeError):
            doc = None
    if doc is None and fallback is not None and os.path.isfile(fallback):
        from engine.files import read_json

        try:
            doc = read_json(fallback).get("features")
        except (ValueError, AttributeError):
            doc = None
    return doc if isinstance(doc, dict) else {}


def _of_type(features: dict, kind: str) -> list[str]:
    return [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == kind]


def _pick(
    given: str | None, features: dict, kind: str, option: str, names: list[str], *, other: str | None = None
) -> str:
    """The column `given`, else the one feature of type `kind` (not counting the column `other`
    names); an error listing the candidates."""
    if given is not None:
        if given not in names:
            raise EngineError(f"{option}: no column {given!r}; the columns are: {', '.join(names)}")
        return given
    found = [name for name in _of_type(features, kind) if name != other]
    if len(found) == 1:
        return found[0]
    what = f"{len(found)} {kind} columns ({', '.join(found)})" if found else f"no {kind} column"
    raise EngineError(f"{option}: the dataset has {what}; name one with --{option} (columns: {', '.join(names)})")


def _image_type(field, option: str = "image-column") -> str:
    pa, _ = _pyarrow()
    t = field.type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    raise EngineError(
        f"{option}: column {field.name!r} is {t}, expected an Image column ({{bytes, path}}), binary or path strings"
    )


def _check_integer(field, option: str) -> None:
    pa, _ = _pyarrow()
    if not pa.types.is_integer(field.type):
        raise EngineError(
            f"{option}: column {field.name!r} holds {field.type} values, expected integer class indices (a ClassLabel)"
        )


def _class_names(features: dict, column: str) -> tuple[str, ...] | None:
    feature = features.get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return tuple(str(n) for n in feature["names"])
    return None


def _schema(kind: str, path: str):
    pa, pq = _pyarrow()
    try:
        if kind == "parquet":
            meta = pq.ParquetFile(path).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_stream(source)
            return reader.schema, sum(batch.num_rows for batch in reader)
    except (OSError, pa.ArrowException) as err:
        raise EngineError(f"root: {path} is not a readable {kind} file ({type(err).__name__}: {err})") from None


def open_source(
    root: str | os.PathLike,
    *,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    key_column: str | None = None,
    true_label_column: str | None = None,
) -> Source:
    """One split of the Hugging Face dataset at ROOT with its columns chosen and checked (schemas
    only: no rows are read)."""
    root = str(root)
    kind, splits, base = _layout(root)
    if split is None and len(splits) > 1:
        raise EngineError(f"split: {root!r} has the splits {', '.join(splits)}; choose one with --split")
    chosen = split if split is not None else next(iter(splits))
    if chosen not in splits:
        raise EngineError(f"split: got {chosen!r}; {root!r} has the splits {', '.join(splits)}")
    files = splits[chosen]
    if not files:
        raise EngineError(f"split: {chosen!r} of {root!r} has no data files")
    schemas = [_schema(kind, path) for path in files]
    schema = schemas[0][0]
    for path, (other, _) in zip(files[1:], schemas[1:]):
        if other.names != schema.names:
            raise EngineError(f"root: {path} has the columns {other.names}, but {files[0]} has {schema.names}")
    info = os.path.join(os.path.dirname(files[0]), "dataset_info.json") if kind == "arrow" else None
    features = read_features(schema, info)
    names = list(schema.names)
    image = _pick(image_column, features, "Image", "image-column", names)
    for column, option in ((key_column, "key-column"), (true_label_column, "true-label-column")):
        if column is not None and column not in names:
            raise EngineError(f"{option}: no column {column!r}; the columns are: {', '.join(names)}")
    label = _pick(label_column, features, "ClassLabel", "label-column", names, other=true_label_column)
    _check_integer(schema.field(label), "label-column")
    class_names = _class_names(features, label)
    if true_label_column is not None:
        _check_integer(schema.field(true_label_column), "true-label-column")
        true_names = _class_names(features, true_label_column)
        if class_names and true_names and true_names != class_names:
            raise EngineError(
                f"true-label-column: {true_label_column!r} names other classes than {label!r} "
                f"({len(true_names)} vs {len(class_names)} names); expected the same ClassLabel"
            )
    return Source(
        kind=kind,
        files=tuple(os.path.abspath(p) for p in files),
        rows=tuple(rows for _, rows in schemas),
        split=chosen,
        splits=tuple(splits),
        base=os.path.abspath(base),
        image=image,
        label=label,
        key=key_column,
        true_label=true_label_column,
        class_names=class_names,
        image_type=_image_type(schema.field(image)),
    )


# ---------------------------------------------------------------- rows in batches


def read_batches(
    spec: dict, columns: list[str], *, start: int = 0, stop: int | None = None, batch_size: int = 256
) -> Iterator:
    """Rows [start, stop) of a split (`Source.spec()`), `columns` only (Parquet reads nested
    fields such as "image.path" alone), as pyarrow RecordBatches of at most `batch_size` rows,
    in row order. Parquet row groups outside the range are not read; Arrow files are memory-mapped."""
    stop = sum(spec["rows"]) if stop is None else stop
    offset = 0
    for path, rows in zip(spec["files"], spec["rows"]):
        lo, hi = max(start - offset, 0), min(stop - offset, rows)
        if lo < hi:
            yield from _file_batches(spec["kind"], path, columns, lo, hi, batch_size)
        offset += rows
        if offset >= stop:
            return


def _file_batches(kind: str, path: str, columns: list[str], lo: int, hi: int, batch_size: int) -> Iterator:
    pa, pq = _pyarrow()
    with contextlib.ExitStack() as stack:
        if kind == "parquet":
            parquet = stack.enter_context(pq.ParquetFile(path))
            groups, position, first = [], 0, None
            for g in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if position < hi and position + n > lo:
                    groups.append(g)
                    first = position if first is None else first
                position += n
            position = first or 0
            batches = parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns, use_threads=False)
        else:
            source = stack.enter_context(pa.memory_map(path))
            top = list(dict.fromkeys(c.split(".")[0] for c in columns))  # Arrow files: whole columns
            position, batches = 0, (b.select(top) for b in pa.ipc.open_stream(source))
        for batch in batches:
            end = position + batch.num_rows
            if end > lo:
                piece = batch.slice(max(lo - position, 0), min(hi, end) - max(lo, position))
                for at in range(0, piece.num_rows, batch_size):
                    yield piece.slice(at, batch_size)
            position = end
            if position >= hi:
                return


def image_parts(array, image_type: str) -> tuple[list, list]:
    """(bytes or None, path or None) per row of an image column."""
    if image_type == "binary":
        return array.to_pylist(), [None] * len(array)
    if image_type == "path":
        return [None] * len(array), array.to_pylist()
    data = array.field("bytes").to_pylist() if array.type.get_field_index("bytes") >= 0 else [None] * len(array)
    paths = array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(array)
    valid = array.is_valid().to_pylist()
    return [d if v else None for d, v in zip(data, valid)], [p if v else None for p, v in zip(paths, valid)]


def _paths_without_bytes(array, image_type: str) -> list:
    """Per row, the path of an image stored without bytes (None: bytes stored, or no path);
    reads validity bitmaps, never copies the image bytes."""
    if image_type == "binary":
        return [None] * len(array)
    if image_type == "path":
        return array.to_pylist()
    valid = array.is_valid().to_pylist()
    has_bytes = array.field("bytes").is_valid().to_pylist() if array.type.get_field_index("bytes") >= 0 else None
    paths = array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(array)
    return [p if ok and not (has_bytes and has_bytes[i]) else None for i, (p, ok) in enumerate(zip(paths, valid))]


def _bytes_may_be_missing(spec: dict, image: str) -> bool:
    """Whether some row of the split may hold no image bytes (Parquet column statistics say no
    for the usual Hub files, so their image bytes need not be read to plan)."""
    if spec["image_type"] != "struct" or spec["kind"] != "parquet":
        return spec["image_type"] != "binary"
    _, pq = _pyarrow()
    for path in spec["files"]:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema == f"{image}.bytes":
                    stats = column.statistics
                    if stats is None or not stats.has_null_count or stats.null_count > 0:
                        return True
    return False


@dataclass(frozen=True)
class Row:
    """What the plan needs of one row: label and true label (None: missing), the key column's
    value, and the image path when the row stores no bytes."""

    label: int | None
    true_label: int | None
    key: object
    path: str | None


def scan_rows(source: Source, *, batch_size: int = 256) -> Iterator[Row]:
    """Every row of the split, in order, reading only the label, key and true-label columns (and
    the image paths where images may be stored by path)."""
    spec = source.spec()
    wanted = [source.label] + [c for c in (source.true_label, source.key) if c is not None]
    image_columns = []
    if _bytes_may_be_missing(spec, source.image):
        struct_fields = [f"{source.image}.bytes", f"{source.image}.path"]
        image_columns = struct_fields if source.kind == "parquet" and source.image_type == "struct" else [source.image]
    columns = list(dict.fromkeys(wanted + image_columns))
    for batch in read_batches(spec, columns, batch_size=batch_size):
        n = batch.num_rows
        labels = batch.column(source.label).to_pylist()
        trues = batch.column(source.true_label).to_pylist() if source.true_label else [None] * n
        keys = batch.column(source.key).to_pylist() if source.key else [None] * n
        paths = _paths_without_bytes(batch.column(source.image), source.image_type) if image_columns else [None] * n
        for label, true, key, path in zip(labels, trues, keys, paths):
            yield Row(_label(label), _label(true), key, path)


def _label(value) -> int | None:
    return None if value is None or value < 0 else int(value)


def image_path(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def read_images(spec: dict, *, start: int, stop: int, batch_size: int) -> Iterator[bytes | str]:
    """The image bytes of rows [start, stop) in order, read in batches; a row's bytes as stored,
    else the file its path names (relative to the dataset folder); a one-line reason instead when
    there is neither."""
    for batch in read_batches(spec, [spec["image"]], start=start, stop=stop, batch_size=batch_size):
        data, paths = image_parts(batch.column(0), spec["image_type"])
        for value, path in zip(data, paths):
            if value is not None:
                yield value
            elif not path:
                yield "no image: the row has neither image bytes nor a path"
            else:
                try:
                    with open(image_path(spec["base"], path), "rb") as handle:
                        yield handle.read()
                except OSError as err:
                    yield f"unreadable: {type(err).__name__}: {err.strerror or err} ({path})"


# ---------------------------------------------------------------- tables back to `datasets`


def is_class_column(name: str) -> bool:
    """Columns of the engine's tables that hold class indices (-1: none)."""
    return name in CLASS_COLUMNS or name.endswith("/prediction")


def with_features(table, class_names: list[str] | None):
    """`table` (pyarrow) as `datasets.load_dataset("parquet", ...)` reads it back with the
    class-index columns as `ClassLabel(names)` and every other column as the `Value` of its
    type: the features JSON goes into the schema metadata (b"huggingface"), and the class
    columns become int64, the storage `datasets` expects of a ClassLabel (else it ignores the
    metadata)."""
    pa, _ = _pyarrow()
    features = {}
    for index, field in enumerate(table.schema):
        if class_names and is_class_column(field.name):
            features[field.name] = {"names": list(class_names), "_type": "ClassLabel"}
            table = table.set_column(index, field.name, table.column(index).cast(pa.int64()))
            continue
        dtype = _DTYPES.get(str(field.type))
        if dtype is None:
            raise ValueError(f"column {field.name!r} has the type {field.type}, which has no `datasets` Value")
        features[field.name] = {"dtype": dtype, "_type": "Value"}
    return table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})

"""The Zarr v3 feature cache: the read view (`Cache`: manifest, rows in blocks, keys, text features,
every read checked for missing chunks, checksums and impossible values) and the storage of result
groups (written under a new name, then pointed to from `results/` in one write). Appending rows is
`engine.append`, the lock `engine.locks`, the typed result groups `engine.results`. The layout and
the format versions: docs/architecture.md#the-cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

FORMAT = "engine-cache"
VERSION = 2  # 2: every chunk carries a crc32c checksum, fill values cannot pass for data
READABLE = (1, 2)
CHUNK_ROWS = 8192
MAX_BAD_RECORDED = 100  # per shard, in the manifest; the count is always exact
ROW_ARRAYS = {"labels": "int32", "true_labels": "int32", "shard": "int32", "position": "int32"}
ROW_FILL = np.iinfo(np.int32).min  # what a missing chunk of an int row array reads as (no row holds it)


def feature_codec():
    """Blosc-lz4 with 2-byte shuffle, then a crc32c checksum: fp16 features barely compress, but
    padded partial chunks cost nothing on disk (benchmarks/bench_embed.py), and a damaged chunk is
    an error instead of data."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle", typesize=2), Crc32cCodec()]


def checked_codec():
    """zarr's default Zstd compression, then a crc32c checksum (every array but the features)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


def as_strings(values) -> np.ndarray:
    """Variable-length UTF-8 strings (Zarr v3's `string` type, no fixed-width padding)."""
    return np.asarray(values, dtype=np.dtypes.StringDType())


def shard_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def is_local(path: str) -> bool:
    return "://" not in str(path)


def _open_group(path: str, mode: str):
    """zarr.open_group for a directory or an fsspec URL; remote listings are never cached."""
    try:
        return _open_group_once(path, mode)
    except zarr.errors.ContainsGroupError:
        if mode != "a":
            raise
        return _open_group_once(path, "r+")  # another job created it between zarr's check and create


def _open_group_once(path: str, mode: str):
    if is_local(path):
        return zarr.open_group(path, mode=mode)
    protocol = path.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as err:
        hint = " (`pip install s3fs`)" if protocol in ("s3", "s3a") else ""
        raise EngineError(f"cache: {path!r} needs an fsspec backend for {protocol}://{hint}: {err}") from None
    options = {"use_listings_cache": False} if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs") else {}
    return zarr.open_group(path, mode=mode, storage_options=options)


def group_names(group) -> list[str]:
    """Child group names; quiet about debris (arrays of a group whose zarr.json a kill removed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(group.group_keys())


def cache_exists(path: str | os.PathLike) -> bool:
    """Whether `path` (a directory or an fsspec URL) already holds a Zarr group."""
    path = str(path)
    if is_local(path):
        return Path(path, "zarr.json").is_file()
    try:
        _open_group(path, "r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False


class Cache:
    """A feature cache opened read-only (`mode="r"`) or for writing (`mode="a"`)."""

    def __init__(self, path: str | os.PathLike, *, mode: str = "r", create: bool = False):
        """`mode` "r" (read-only) or "a" (read-write); only `create=True` (embed, import) may
        make a new cache, so a mistyped path is an error, not a stray directory."""
        self.path = str(path)
        if self.path.startswith("file://"):
            self.path = self.path[len("file://") :]
        self.mode = mode
        self.run_id = "0"  # set by the job that stages shards (embed: one id per job, all ranks)
        missing = EngineError(
            f"cache: {self.path!r} is not a feature cache (no zarr.json); "
            "create one with `engine embed` or `engine import`"
        )
        if not create and is_local(self.path) and not Path(self.path, "zarr.json").is_file():
            raise missing
        try:
            if not create and not is_local(self.path):
                _open_group(self.path, "r")  # an object store: "a" would create a group silently
            if create and not is_local(self.path) and not cache_exists(self.path):
                from engine.lease import remote_lock

                with remote_lock(self.path):  # zarr's exists-then-create is two requests
                    self.root = _open_group(self.path, "a")
            else:
                self.root = _open_group(self.path, "r" if mode == "r" else "a")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            if create:
                raise EngineError(f"cache: cannot create {self.path!r}: {type(err).__name__}: {err}") from None
            raise missing from None
        except (OSError, PermissionError) as err:  # object stores: credentials, endpoint, bucket
            raise EngineError(f"cache: cannot open {self.path!r}: {type(err).__name__}: {err}") from None
        except (ValueError, KeyError, TypeError) as err:  # a torn or garbled zarr.json
            raise EngineError(
                f"cache: {self.path}/zarr.json is unreadable ({one_line(err)}): the cache's manifest is "
                "damaged; restore it from a copy or create the cache again"
            ) from None
        attrs = dict(self.root.attrs)
        if attrs and attrs.get("format") != FORMAT:
            raise EngineError(f"cache: {self.path!r} is a Zarr group but not an engine cache")
        if not attrs.get("model") and not create:
            raise EngineError(
                f"cache: {self.path} was never finished (the run creating it stopped before it wrote its "
                "schema); rerun the `engine embed` or `engine import` that creates it"
            )
        if attrs.get("version", VERSION) not in READABLE:
            raise EngineError(
                f"cache: {self.path!r} has format version {attrs['version']}; "
                f"this engine reads {', '.join(map(str, READABLE))}; upgrade the engine"
            )
        self._key_rows: dict | None = None
        self._keys: np.ndarray | None = None
        self._present: dict = {}  # array path -> rows whose chunks were found present

    # ------------------------------------------------------------ manifest
    @property
    def manifest(self) -> dict:
        return dict(self.root.attrs)

    def lock(self):
        """The cache's exclusive lock (`engine.locks.cache_lock`), re-reading the stored group under it;
        yields the S3 lease or None."""
        return _reopening_lock(self)

    def shard_status(self) -> dict[str, str]:
        return {s["url"]: s["status"] for s in self.manifest.get("shards", [])}

    # ------------------------------------------------------------ text features
    def has_text(self) -> bool:
        return "text" in self.root and dict(self.root["text"].attrs).get("complete", False)

    def text_fingerprint(self) -> str | None:
        return dict(self.root["text"].attrs).get("fingerprint") if self.has_text() else None

    def text_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, P, D) float16 and (C, P) bool; an error naming `engine prompts` when absent."""
        if not self.has_text():
            raise EngineError(
                f"cache: {self.path} has no text features; run "
                f"`engine prompts --cache {self.path} --classes FILE|NAME` first"
            )
        return self.read("text/features"), self.read("text/mask")

    # ------------------------------------------------------------ reader API
    @property
    def num_rows(self) -> int:
        return int(self.manifest.get("rows", 0))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def identity(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    @property
    def has_true_labels(self) -> bool:
        return bool(self.manifest.get("has_true_labels"))

    @property
    def version(self) -> int:
        return int(self.manifest.get("version", 1))

    def array(self, path: str, *, rows: int | None = None, complete: bool = True):
        """The zarr array at `path`, its chunks covering the first `rows` rows (all by default)
        checked to be present once per Cache object when the array was written `complete` (every
        chunk stored: arrays of format 2 and result groups written by this engine); damaged
        metadata or a missing chunk is an EngineError naming the array and rows (`engine verify`
        finds every problem)."""
        try:
            arr = self.root[path]
        except KeyError:
            raise EngineError(f"cache: {self.path} has no array {path!r}; {VERIFY_HINT}") from None
        except Exception as err:  # noqa: BLE001 - torn metadata surfaces as any decode error
            raise EngineError(
                f"cache: {self.path}/{path}/zarr.json is unreadable ({one_line(err)}); {VERIFY_HINT}"
            ) from None
        rows = arr.shape[0] if rows is None else rows
        if complete and self._present.get(path, -1) < rows:
            missing = missing_chunks(arr, rows)
            if missing:
                first, last = missing[0]
                raise EngineError(
                    f"cache: {self.path}: {path} rows {first}:{last} are missing (a chunk file is gone, "
                    f"{len(missing)} in all); {VERIFY_HINT}"
                )
            self._present[path] = rows
        return arr

    def read(self, path: str, selection=slice(None), *, rows: int | None = None, complete: bool | None = None):
        """arr[selection] of the array at `path`, decoding errors (a checksum mismatch, a garbled
        chunk) as one-line EngineErrors naming the array. `complete`: see `array`; by default
        true for images/* and text/* of format 2."""
        if complete is None:
            complete = self.version >= 2
        arr = self.array(path, rows=rows, complete=complete)
        try:
            return arr[selection] if not isinstance(selection, tuple) else arr.get_orthogonal_selection(selection)
        except Exception as err:  # noqa: BLE001 - every codec raises its own type
            where = _describe_rows(selection)
            raise EngineError(
                f"cache: {self.path}: {path}{where} are damaged ({one_line(err)}); {VERIFY_HINT}"
            ) from None

    def _column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        if stop <= start:
            shape = (0, self.dim) if name == "features" else (0,)
            return np.zeros(shape, dtype="float16" if name == "features" else "int32")
        data = self.read(f"images/{name}", slice(start, stop), rows=self.num_rows)
        bad = impossible_values(name, data, version=self.version)
        if bad is not None:
            raise EngineError(
                f"cache: {self.path}: images/{name} row {start + bad} holds no data (a chunk was lost or never "
                f"written); {VERIFY_HINT}"
            )
        return data

    def labels(self) -> np.ndarray:
        return self._column("labels").astype(np.int32)

    def true_labels(self) -> np.ndarray | None:
        return self._column("true_labels").astype(np.int32) if self.has_true_labels else None

    def keys(self) -> np.ndarray:
        """(N,) object, read once per Cache object (read-only; refreshed when rows are appended)."""
        if self._keys is None or len(self._keys) != self.num_rows:
            self._keys = np.asarray(self._column("keys"), dtype=object)
            self._keys.flags.writeable = False
        return self._keys

    def provenance(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard index (N,), position within shard (N,)); shard urls in manifest['shards']."""
        return self._column("shard"), self._column("position")

    def read_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as (n, D) float16."""
        return self._column("features", start, stop)

    def load_features(self) -> np.ndarray:
        """All rows (N, D) float16 in memory (N * D * 2 bytes: 1 GB for 1M x 512)."""
        return self.read_features(0, self.num_rows)

    def iter_features(self, block_rows: int = CHUNK_ROWS * 8) -> Iterator[tuple[int, np.ndarray]]:
        """(start, (b, D) float16) blocks in row order with memory bounded by `block_rows`."""
        for start in range(0, self.num_rows, block_rows):
            yield start, self.read_features(start, start + block_rows)

    def features_at(self, rows: np.ndarray) -> np.ndarray:
        """Random access: (len(rows), D) float16 for the given row indices."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise EngineError(f"rows: expected indices in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
        data = self.read("images/features", (rows, slice(None)), rows=self.num_rows)
        bad = impossible_values("features", data, version=self.version)
        if bad is not None:
            raise EngineError(f"cache: {self.path}: images/features row {rows[bad]} holds no data; {VERIFY_HINT}")
        return data

    def key_rows(self, rows: int | None = None) -> dict:
        """key → row of the first `rows` rows (default: the recorded ones; a consolidation passes
        the rows it has appended so far), built once per Cache object and again when the row
        count changed (another job appended rows)."""
        rows = self.num_rows if rows is None else rows
        if self._key_rows is None or len(self._key_rows) != rows:
            stored = self.read("images/keys", slice(0, rows), rows=rows) if rows else []
            self._key_rows = {k: i for i, k in enumerate(np.asarray(stored, dtype=object).tolist())}
        return self._key_rows

    def row_of(self, key: str) -> int:
        row = self.key_rows().get(key)
        if row is None:
            raise EngineError(f"key: {key!r} is not in cache {self.path}")
        return row

    # ------------------------------------------------------------ results of later stages
    def group_path(self, name: str) -> str | None:
        """Where the current, complete result group `name` lives (`results/` points to it), or None.
        A cache written before the pointers keeps its groups under their plain names."""
        if RESULTS in self.root:
            path = dict(self.root[RESULTS].attrs).get(name)
            if path and path in self.root:
                return path
            return None
        if name in self.root and dict(self.root[name].attrs).get("complete"):
            return name
        return None

    def has_group(self, name: str) -> bool:
        return self.group_path(name) is not None

    def open_group(self, name: str, *, missing: str | None = None):
        """The current result group `name` (a zarr group, read lazily); EngineError when absent,
        with `missing` as the hint (e.g. "run `engine select` first")."""
        path = self.group_path(name)
        if path is None:
            hint = f"; {missing}" if missing else ""
            raise EngineError(f"cache: {self.path} has no {name} results{hint}")
        return self.root[path]

    def replace_group(self, name: str, fill: Callable, attrs: dict) -> None:
        """Replace result group `name`: `fill(group)` writes the arrays into a new group, then one
        write of `results/` points to it (under the lock) and the old group is deleted. A kill at
        any moment leaves the old group or the new one current; what it leaves behind is removed
        by a later replace once it is older than `STALE_GROUP_S`."""
        if self.mode == "r":
            raise EngineError(f"cache: {self.path} was opened read-only")
        if name in ("images", "text", "staging", RESULTS) or not name.isidentifier():
            raise EngineError(f"cache: {name!r} is not a result group name")
        path = f"{name}.{int(time.time())}-{uuid.uuid4().hex[:8]}"
        group = self.root.create_group(path)
        fill(group)
        group.attrs.put({**attrs, "complete": True, "chunks_complete": True, "written": time.time()})
        with self.lock() as lease:
            results = self.root.require_group(RESULTS)
            pointers = dict(results.attrs)
            old = pointers.get(name) or (name if name in self.root and RESULTS not in pointers else None)
            pointers[name] = path
            if lease is not None:
                lease.check()
            results.attrs.put(pointers)
            for stale in self._stale_groups(name, keep=path):
                _delete(self.root, stale)
            if old and old != path and old in self.root:
                _delete(self.root, old)

    def remove_group(self, name: str) -> None:
        """Drop result group `name` (its pointer first, so readers never see half of it)."""
        path = self.group_path(name)
        if path is None:
            return
        with self.lock():
            if RESULTS in self.root:
                pointers = dict(self.root[RESULTS].attrs)
                pointers.pop(name, None)
                self.root[RESULTS].attrs.put(pointers)
            _delete(self.root, path)

    def _stale_groups(self, name: str, *, keep: str) -> list[str]:
        """Groups `name.<time>-<id>` other than `keep` that a killed writer left, older than STALE_GROUP_S."""
        stale = []
        for child in group_names(self.root):
            base, _, token = child.partition(".")
            started = token.split("-")[0]
            if base == name and child != keep and started.isdigit() and time.time() - int(started) > STALE_GROUP_S:
                stale.append(child)
        return stale

    def write_group(self, name: str, arrays: dict, attrs: dict) -> None:
        """Replace result group `name` with flat `arrays` {array name: (N, ...) array} (`replace_group`)."""

        def fill(group):
            for key, value in arrays.items():
                write_array(group, key, value)

        self.replace_group(name, fill, attrs)

    def read_group(self, name: str) -> tuple[dict, dict]:
        """(arrays, attrs) of a complete result group with flat arrays; an error when missing."""
        group = self.open_group(name)
        return {k: group[k][:] for k in group.array_keys()}, dict(group.attrs)


RESULTS = "results"  # the group whose attributes point to each current result group
STALE_GROUP_S = 6 * 3600  # a result group left by a killed writer is removed after this long


def write_array(group, name: str, value) -> None:
    """Store `value` (numpy-like) as array `name` of `group`; text as variable-length strings."""
    value = np.asarray(value)
    is_text = value.dtype == object or value.dtype.kind in "UT"
    group.create_array(
        name,
        data=as_strings(value) if is_text else value,
        compressors=checked_codec(),
        config={"write_empty_chunks": True},  # every chunk stored: a missing one is damage
    )


def _delete(root, path: str) -> None:
    try:
        del root[path]
    except KeyError:
        pass


@contextlib.contextmanager
def _reopening_lock(cache: Cache):
    from engine.locks import cache_lock

    with cache_lock(cache.path, run=cache.run_id) as lease:
        cache.root = _open_group(cache.path, "a")  # the stored manifest, not an in-memory copy
        yield lease


VERIFY_HINT = "`engine verify --cache ...` lists every damaged array and what repairs it"


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _describe_rows(selection) -> str:
    if isinstance(selection, slice) and selection.start is not None:
        return f" rows {selection.start}:{selection.stop}"
    return ""


def missing_chunks(arr, rows: int) -> list[tuple[int, int]]:
    """(first row, stop row) of each chunk that the first `rows` rows of `arr` need and the store
    lacks (one listing of the array's prefix). A missing chunk reads back as the fill value."""
    if rows <= 0 or arr.ndim == 0:
        return []
    from zarr.core.sync import sync

    async def listing():
        prefix = arr.store_path.path
        return {key[len(prefix) :].lstrip("/") async for key in arr.store_path.store.list_prefix(prefix)}

    stored = sync(listing())
    chunk_rows = arr.chunks[0]
    per_row = [range(-(-size // chunk)) for size, chunk in zip(arr.shape[1:], arr.chunks[1:])]
    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    missing = []
    for i in range(-(-min(rows, arr.shape[0]) // chunk_rows)):
        for rest in np.ndindex(*[len(r) for r in per_row]) if per_row else [()]:
            if encode((i, *rest)) not in stored:
                missing.append((i * chunk_rows, min((i + 1) * chunk_rows, arr.shape[0])))
                break
    return missing


def impossible_values(name: str, data: np.ndarray, *, version: int) -> int | None:
    """Index of the first value that only a lost chunk can hold (NaN features, an empty key, the
    int fill), or None. Caches of format 1 filled int arrays with -1, which is data: not checked."""
    if len(data) == 0:
        return None
    if name == "features":
        bad = np.isnan(data).any(axis=tuple(range(1, data.ndim)))
    elif name == "keys":
        bad = np.asarray(data, dtype=object) == ""
    elif version >= 2 and data.dtype.kind == "i":
        bad = data == ROW_FILL
    else:
        return None
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None

"""The Zarr v3 feature cache: schema, per-shard commit, consolidation, and the reader API.

Layout (a Zarr v3 group, a directory)::

    zarr.json                 manifest in the group attributes (see `Cache.manifest`)
    images/features (N, D)    float16, L2-normalised rows
    images/labels   (N,)      int32, the given label, -1 when missing
    images/true_labels (N,)   int32, ground truth for evaluation, -1 when unknown
    images/keys     (N,)      str, the WebDataset __key__, unique in the cache
    images/shard    (N,)      int32, index into manifest["shards"]
    images/position (N,)      int32, sample position within its shard
    text/features (C, P, D) float16, text/mask (C, P) bool, text/prompts (C, P) str
    staging/<shard>-<run>/    one shard's rows while they are being committed
    selection/, index/, train/, diagnostics/   results of later stages

Commit protocol. A shard's rows are first written to `staging/<shard>-<run>/` (arrays of its own, so
concurrent writers never share a chunk), then marked committed by one atomic attribute
write (a failed shard is staged the same way, with its error and no rows). A single
consolidator (the process holding the cache lock; rank 0 under torch.distributed, the only
writer of the manifest) appends committed staged shards to `images/*` at row `rows` and only
then records the shard as done with one atomic manifest write. Rows beyond
`manifest["rows"]` are never read and are overwritten by the next append, so a kill at any
moment leaves either the old or the new state, never half a shard. Uncommitted staging is
never read; a later run stages under its own run id, and `trim()` removes it once its shard
is done.

Where. A local directory, or any fsspec URL (`s3://bucket/feats.zarr`, `gs://...`) through
zarr's fsspec store: every commit point above is then one object PUT, which object stores
make atomic. Listing caches are off, so the consolidator sees other ranks' staged shards.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from engine.runtime import EngineError, engine_version

_logger = logging.getLogger(__name__)

FORMAT = "engine-cache"
VERSION = 1
CHUNK_ROWS = 8192
MAX_BAD_RECORDED = 100       # per shard, in the manifest; the count is always exact
_ROW_ARRAYS = {"labels": "int32", "true_labels": "int32", "shard": "int32", "position": "int32"}


def _feature_codec():
    """Blosc-lz4 with 2-byte shuffle: ~5-10% smaller fp16 features, negligible CPU, and padded
    partial chunks cost nothing on disk (see benchmarks/bench_embed.py for the measurement)."""
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle", typesize=2)]


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


def _group_names(group) -> list[str]:
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
            self.path = self.path[len("file://"):]
        self.mode = mode
        self.run_id = "0"   # set by the job that stages shards (embed: one id per job, all ranks)
        missing = EngineError(f"cache: {self.path!r} is not a feature cache (no zarr.json); "
                              "create one with `engine embed` or `engine import`")
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
        self._applied: set[int] = set()   # shard indexes this object has consolidated
        attrs = dict(self.root.attrs)
        if attrs and attrs.get("format") != FORMAT:
            raise EngineError(f"cache: {self.path!r} is a Zarr group but not an engine cache")
        if attrs.get("version", VERSION) > VERSION:
            raise EngineError(f"cache: {self.path!r} has format version {attrs['version']}; "
                              f"this engine reads up to {VERSION}; upgrade the engine")
        self._key_rows: dict | None = None
        self._keys: np.ndarray | None = None
        self._lease = None   # the S3 lease while `lock()` holds one

    # ------------------------------------------------------------ manifest
    @property
    def manifest(self) -> dict:
        return dict(self.root.attrs)

    def _write_manifest(self, manifest: dict) -> None:
        self._fence()
        self.root.attrs.put(manifest)  # one atomic write of zarr.json

    def _fence(self) -> None:
        """Before each write under the lock: on S3, stop if the lease may have been taken over."""
        if self._lease is not None:
            self._lease.check()

    def initialise(self, identity: dict, *, dim: int, precision: str, source: str = "embed") -> None:
        """Create the schema for a new cache, or check the model of an existing one (under the
        lock: two jobs starting on one new cache create it once)."""
        with self.lock():
            self._initialise(identity, dim=dim, precision=precision, source=source)

    def _initialise(self, identity: dict, *, dim: int, precision: str, source: str) -> None:
        manifest = self.manifest
        if manifest.get("model"):
            from engine.models import describe, same_model

            if not same_model(manifest["model"], identity):
                raise EngineError(
                    f"cache: {self.path} holds features of {describe(manifest['model'])}, but this run uses "
                    f"{describe(identity)}; use another --cache or the same --model/--pretrained")
            if manifest.get("precision") not in (None, precision):
                _logger.warning("cache was embedded with precision %s, this run uses %s",
                                manifest.get("precision"), precision)
            return
        self._fence()
        images = self.root.require_group("images")
        images.create_array("features", shape=(0, dim), chunks=(CHUNK_ROWS, dim), dtype="float16",
                            compressors=_feature_codec(), overwrite=True)
        images.create_array("keys", shape=(0,), chunks=(CHUNK_ROWS * 4,), dtype=str, overwrite=True)
        for name, dtype in _ROW_ARRAYS.items():
            images.create_array(name, shape=(0,), chunks=(CHUNK_ROWS * 4,), dtype=dtype,
                                fill_value=-1, overwrite=True)
        self._write_manifest({"format": FORMAT, "version": VERSION, "engine_version": engine_version(),
                              "source": source, "model": identity, "precision": precision, "dim": dim,
                              "rows": 0, "shards": [], "bad_samples": 0, "missing_labels": 0,
                              "has_true_labels": False, "created": time.time()})

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock for manifest and array-shape changes: `flock` on a local cache, a lease
        object written with conditional PUTs on S3 (`engine.lease`); other object stores have
        none, so one job at a time there."""
        if not is_local(self.path):
            from engine.lease import remote_lock

            with remote_lock(self.path, run=self.run_id) as lease:
                self._lease = lease
                try:
                    self.root = _open_group(self.path, "a")  # the stored manifest, not an in-memory copy
                    yield
                finally:
                    self._lease = None
            return
        from engine.files import lock_folder

        fd = lock_folder(self.path)
        try:
            self.root = zarr.open_group(self.path, mode="a")  # another process may have changed it
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def register_shards(self, urls: list[str], fingerprints: dict | None = None) -> dict[str, int]:
        """Add unseen shard urls to the manifest (with the file fingerprint they are embedded
        from, see `reader.shard_fingerprints`); return url → shard index for all of `urls`."""
        fingerprints = fingerprints or {}
        with self.lock():
            manifest = self.manifest
            known = {s["url"]: i for i, s in enumerate(manifest["shards"])}
            for url in urls:
                if url not in known:
                    known[url] = len(manifest["shards"])
                    manifest["shards"].append({"url": url, "id": shard_id(url), "status": "pending", "rows": 0})
                entry = manifest["shards"][known[url]]
                if entry["status"] != "done" and fingerprints.get(url):
                    entry["fingerprint"] = fingerprints[url]
            self._write_manifest(manifest)
        return {url: known[url] for url in urls}

    def shard_status(self) -> dict[str, str]:
        return {s["url"]: s["status"] for s in self.manifest.get("shards", [])}

    # ------------------------------------------------------------ staging and commit
    def _staging_name(self, url: str) -> str:
        """`<shard id>-<run id>`: two jobs embedding the same shard never share a staging group."""
        return f"{shard_id(url)}-{self.run_id}"

    def stage_shard(self, index: int, *, features: np.ndarray, keys: list, labels: np.ndarray,
                    true_labels: np.ndarray, positions: np.ndarray, outcome: dict) -> None:
        """Write one whole shard into its own staging group, then mark it committed."""
        if len(set(keys)) != len(keys):
            seen, dup = set(), None
            for k in keys:
                if k in seen:
                    dup = k
                    break
                seen.add(k)
            raise EngineError(f"duplicate key {dup!r} twice within shard {outcome['url']}")
        staging = self.root.require_group("staging")
        group = staging.create_group(self._staging_name(outcome["url"]), overwrite=True)  # also debris
        n = len(keys)
        rows = max(1, n)
        dim = int(self.manifest["dim"])
        group.create_array("features", data=features.astype(np.float16, copy=False).reshape(n, dim),
                           chunks=(rows, dim), compressors=_feature_codec())
        group.create_array("keys", data=as_strings(keys).reshape(n), chunks=(rows,))
        for name, data in (("labels", labels), ("true_labels", true_labels), ("shard", np.full(n, index)),
                           ("position", positions)):
            group.create_array(name, data=np.asarray(data, dtype=np.int32).reshape(n), chunks=(rows,))
        group.attrs.put({"committed": True, "shard": index, "rows": n, "outcome": outcome})

    def stage_failure(self, index: int, outcome: dict) -> None:
        """Record that shard `index` failed (its error in `outcome`); applied by the consolidator."""
        staging = self.root.require_group("staging")
        staging.create_group(self._staging_name(outcome["url"]), overwrite=True).attrs.put(
            {"committed": True, "failed": True, "shard": index, "rows": 0, "outcome": outcome})

    def _staged(self, url: str) -> tuple[str, dict] | None:
        """(name, attrs) of the shard's committed staging group of this run, or None."""
        sid = self._staging_name(url)
        try:
            attrs = dict(self.root[f"staging/{sid}"].attrs)
        except KeyError:
            return None
        return (sid, attrs) if attrs.get("committed") else None

    def consolidate(self, order: list[int] | None = None, *, prefix: bool = True) -> list[dict]:
        """Apply committed staged shards to images/* and the manifest; returns their outcomes.

        `order` None: every committed staged shard found by listing `staging/`, in shard order
        (leftovers of killed runs). `order` a run's plan of shard indexes, looked up by name (no
        listing): with `prefix`, only the committed prefix of the plan not yet applied, so rows
        land in plan order however ranks and workers interleave; without, every committed shard
        of the plan, still in plan order (the end of a run). A shard of the plan that another
        job has completed meanwhile is passed over. Uncommitted staging (a writer still at work,
        or one that died) is left alone.
        """
        done = []
        with self.lock():
            if "staging" not in self.root:
                return done
            staging = self.root["staging"]
            if order is None:
                staged = []
                for sid in _group_names(staging):
                    attrs = dict(staging[sid].attrs)
                    if attrs.get("committed"):
                        staged.append((attrs["shard"], sid, attrs))
                staged.sort(key=lambda t: t[0])
            else:
                staged = []
                status = self.manifest["shards"]
                for index in order:
                    if index in self._applied:
                        continue
                    found = self._staged(status[index]["url"])
                    if found is None:
                        if status[index]["status"] == "done":  # another job appended it
                            continue
                        if prefix:
                            break
                        continue
                    staged.append((index, *found))
            if not staged:
                return done
            # One manifest write per call, not per shard (the manifest grows with the shard
            # count). Each shard's entry changes only after its rows are written, so the
            # manifest written here — also when a later shard fails — covers whole shards only.
            manifest, applied = self.manifest, []
            try:
                for index, sid, attrs in staged:
                    try:
                        done.append(self._apply_staged(manifest, staging, sid, index, attrs))
                    except EngineError:
                        if manifest["shards"][index]["status"] == "failed":
                            applied.append(sid)  # recorded as failed (a duplicate key): its staging goes
                        raise
                    self._applied.add(index)
                    applied.append(sid)
            except BaseException:
                self._key_rows = None  # may hold rows the manifest will not record
                raise
            finally:
                self._write_manifest(manifest)
                for sid in applied:
                    if sid in staging:
                        del staging[sid]
        return [d for d in done if d]

    def _apply_staged(self, manifest: dict, staging, sid: str, index: int, attrs: dict) -> dict | None:
        """Append one staged shard's rows and update its entry in `manifest` (written by the caller)."""
        entry = manifest["shards"][index]
        if entry["status"] == "done":  # appended before a crash that left staging behind
            return None
        if attrs.get("failed"):
            entry.update(status="failed", error=attrs["outcome"].get("error"), rows=0)
            return {**attrs["outcome"], "failed": True}
        group = staging[sid]
        keys = group["keys"][:]
        clash = self._find_duplicates(keys, manifest["rows"])
        if clash is not None:
            key, row = clash
            other = manifest["shards"][int(self.root["images/shard"][row])]["url"]
            entry.update(status="failed", error=f"duplicate key {key!r}: already in shard {other}")
            raise EngineError(f"duplicate key {key!r} in shard {entry['url']} is already in shard {other}")
        start, n = manifest["rows"], len(keys)
        images = self.root["images"]
        for name in ("features", "keys", *_ROW_ARRAYS):
            self._fence()  # a local check: before each array, so a slow upload cannot outlive the lease
            arr = images[name]
            if arr.shape[0] < start + n:
                arr.resize((start + n, *arr.shape[1:]))
            if n:
                arr[start:start + n] = group[name][:]
        outcome = dict(group.attrs)["outcome"]
        bad = outcome.get("bad", [])
        entry.update(status="done", rows=n, offset=start, bad_count=len(bad), bad=bad[:MAX_BAD_RECORDED],
                     missing_labels=outcome.get("missing_labels", 0), samples=outcome.get("samples", n),
                     error=None)
        manifest["rows"] = start + n
        manifest["bad_samples"] = manifest.get("bad_samples", 0) + len(bad)
        manifest["missing_labels"] = manifest.get("missing_labels", 0) + outcome.get("missing_labels", 0)
        manifest["has_true_labels"] = bool(manifest.get("has_true_labels")) or bool(
            n and (group["true_labels"][:] >= 0).any())
        if self._key_rows is not None:
            self._key_rows.update(zip(keys.tolist(), range(start, start + n)))
        return outcome

    def _find_duplicates(self, keys: np.ndarray, rows: int):
        """(key, row) of the first of `keys` already among the first `rows` rows, or None."""
        lookup = self.key_rows(rows)
        for key in keys.tolist():
            row = lookup.get(key)
            if row is not None:
                return key, row
        return None

    def trim(self) -> None:
        """Shrink images/* to exactly `rows` rows (drops leftovers of an interrupted append) and
        remove uncommitted staging of shards that are done (debris of a killed writer)."""
        with self.lock():
            manifest = self.manifest
            rows = manifest["rows"]
            self._fence()
            for name in ("features", "keys", *_ROW_ARRAYS):
                arr = self.root["images"][name]
                if arr.shape[0] != rows:
                    arr.resize((rows, *arr.shape[1:]))
            if "staging" in self.root:
                done = {s["id"] for s in manifest["shards"] if s["status"] == "done"}
                staging = self.root["staging"]
                names = set(_group_names(staging))
                if is_local(self.path) and os.path.isdir(os.path.join(self.path, "staging")):
                    names |= set(os.listdir(os.path.join(self.path, "staging"))) - {"zarr.json"}
                for name in names:
                    if name.split("-")[0] not in done:
                        continue
                    if name in staging:
                        del staging[name]
                    else:  # debris of a kill in the middle of a delete: arrays without their group
                        import shutil

                        shutil.rmtree(os.path.join(self.path, "staging", name), ignore_errors=True)

    # ------------------------------------------------------------ text features
    def write_text(self, class_set, features: np.ndarray, mask: np.ndarray) -> None:
        """Replace text/* with (C, P, D) features, (C, P) mask, prompts and class names (under
        the lock: two jobs starting on one cache would otherwise create the arrays at once)."""
        prompts = np.full(mask.shape, "", dtype=object)
        for c, ps in enumerate(class_set.prompts):
            prompts[c, :len(ps)] = ps
        with self.lock():
            self._fence()
            if "text" in self.root:
                del self.root["text"]
            text = self.root.create_group("text")
            text.create_array("features", data=features.astype(np.float16))
            text.create_array("mask", data=mask.astype(bool))
            text.create_array("prompts", data=as_strings(prompts))
            text.create_array("class_names", data=as_strings(class_set.class_names))
            text.attrs.put({"classes": class_set.name, "fingerprint": class_set.fingerprint(),
                            "num_classes": class_set.num_classes, "complete": True})
            manifest = self.manifest
            manifest["class_names"] = list(class_set.class_names)
            self._write_manifest(manifest)

    def has_text(self) -> bool:
        return "text" in self.root and dict(self.root["text"].attrs).get("complete", False)

    def text_fingerprint(self) -> str | None:
        return dict(self.root["text"].attrs).get("fingerprint") if self.has_text() else None

    def text_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, P, D) float16 and (C, P) bool; an error naming `engine prompts` when absent."""
        if not self.has_text():
            raise EngineError(f"cache: {self.path} has no text features; run "
                              f"`engine prompts --cache {self.path} --classes FILE|NAME` first")
        return self.root["text/features"][:], self.root["text/mask"][:]

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

    def _column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        if stop <= start:
            shape = (0, self.dim) if name == "features" else (0,)
            return np.zeros(shape, dtype="float16" if name == "features" else "int32")
        return self.root[f"images/{name}"][start:stop]

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
        return self.root["images/features"].get_orthogonal_selection((rows, slice(None)))

    def key_rows(self, rows: int | None = None) -> dict:
        """key → row of the first `rows` rows (default: the recorded ones; a consolidation passes
        the rows it has appended so far), built once per Cache object and again when the row
        count changed (another job appended rows)."""
        rows = self.num_rows if rows is None else rows
        if self._key_rows is None or len(self._key_rows) != rows:
            stored = self.root["images/keys"][:rows] if rows else []
            self._key_rows = {k: i for i, k in enumerate(np.asarray(stored, dtype=object).tolist())}
        return self._key_rows

    def row_of(self, key: str) -> int:
        row = self.key_rows().get(key)
        if row is None:
            raise EngineError(f"key: {key!r} is not in cache {self.path}")
        return row

    # ------------------------------------------------------------ results of later stages
    def write_group(self, name: str, arrays: dict, attrs: dict) -> None:
        """Replace the result group `name` with `arrays`; `complete` is set last."""
        if name in ("images", "text", "staging"):
            raise EngineError(f"cache: cannot overwrite the {name!r} group")
        if name in self.root:
            del self.root[name]
        group = self.root.create_group(name)
        for key, value in arrays.items():
            value = np.asarray(value)
            is_text = value.dtype == object or value.dtype.kind in "UT"
            group.create_array(key, data=as_strings(value) if is_text else value)
        group.attrs.put({**attrs, "complete": True, "written": time.time()})

    def read_group(self, name: str) -> tuple[dict, dict]:
        """(arrays, attrs) of a complete result group; an error when missing."""
        if name not in self.root or not dict(self.root[name].attrs).get("complete"):
            raise EngineError(f"cache: {self.path} has no {name!r} results")
        group = self.root[name]
        return {k: group[k][:] for k in group.array_keys()}, dict(group.attrs)

    def has_group(self, name: str) -> bool:
        return name in self.root and dict(self.root[name].attrs).get("complete", False)

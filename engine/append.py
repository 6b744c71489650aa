"""Appending rows to a cache: the schema of a new cache, shard registration, staging and
commit, consolidation in plan order, trim, and the text features. Only `engine embed` and
`engine import` write rows; every manifest change holds the cache lock (`engine.locks`) and, on
S3, checks the lease before each write (fencing). The protocol is in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np

from engine.cache import (
    CHUNK_ROWS,
    FORMAT,
    MAX_BAD_RECORDED,
    ROW_ARRAYS,
    ROW_FILL,
    VERSION,
    Cache,
    as_strings,
    checked_codec,
    feature_codec,
    group_names,
    is_local,
    shard_id,
    write_array,
)
from engine.runtime import EngineError, engine_version

_logger = logging.getLogger(__name__)


class CacheWriter(Cache):
    """A cache opened to append rows (`create=True` makes a new one)."""

    def __init__(self, path, *, create: bool = False):
        super().__init__(path, mode="a", create=create)
        self._applied: set[int] = set()  # shard indexes this object has consolidated
        self._lease = None  # the S3 lease while `_locked()` holds one

    @contextlib.contextmanager
    def _locked(self):
        """The cache lock, with the lease kept for `_fence()`."""
        with self.lock() as lease:
            self._lease = lease
            try:
                yield
            finally:
                self._lease = None

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
        with self._locked():
            self._initialise(identity, dim=dim, precision=precision, source=source)

    def _initialise(self, identity: dict, *, dim: int, precision: str, source: str) -> None:
        manifest = self.manifest
        if manifest.get("model"):
            from engine.models import describe, same_model

            if not same_model(manifest["model"], identity):
                raise EngineError(
                    f"cache: {self.path} holds features of {describe(manifest['model'])}, but this run uses "
                    f"{describe(identity)}; use another --cache or the same --model/--pretrained"
                )
            if manifest.get("precision") not in (None, precision):
                _logger.warning(
                    "cache was embedded with precision %s, this run uses %s", manifest.get("precision"), precision
                )
            return
        self._fence()
        images = self.root.require_group("images")
        images.create_array(
            "features",
            shape=(0, dim),
            chunks=(CHUNK_ROWS, dim),
            dtype="float16",
            compressors=feature_codec(),
            fill_value=np.nan,  # a lost chunk reads as NaN, which no feature holds
            overwrite=True,
        )
        images.create_array(
            "keys", shape=(0,), chunks=(CHUNK_ROWS * 4,), dtype=str, compressors=checked_codec(), overwrite=True
        )
        for name, dtype in ROW_ARRAYS.items():
            images.create_array(
                name,
                shape=(0,),
                chunks=(CHUNK_ROWS * 4,),
                dtype=dtype,
                fill_value=ROW_FILL,
                compressors=checked_codec(),
                overwrite=True,
            )
        self._write_manifest(
            {
                "format": FORMAT,
                "version": VERSION,
                "engine_version": engine_version(),
                "source": source,
                "model": identity,
                "precision": precision,
                "dim": dim,
                "rows": 0,
                "shards": [],
                "bad_samples": 0,
                "missing_labels": 0,
                "has_true_labels": False,
                "created": time.time(),
            }
        )

    def register_shards(self, urls: list[str], fingerprints: dict | None = None) -> dict[str, int]:
        """Add unseen shard urls to the manifest (with the file fingerprint they are embedded
        from, see `reader.shard_fingerprints`); return url → shard index for all of `urls`."""
        fingerprints = fingerprints or {}
        with self._locked():
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

    # ------------------------------------------------------------ staging and commit
    def _staging_name(self, url: str) -> str:
        """`<shard id>-<run id>`: two jobs embedding the same shard never share a staging group."""
        return f"{shard_id(url)}-{self.run_id}"

    def stage_shard(
        self,
        index: int,
        *,
        features: np.ndarray,
        keys: list,
        labels: np.ndarray,
        true_labels: np.ndarray,
        positions: np.ndarray,
        outcome: dict,
    ) -> None:
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
        group.create_array(
            "features",
            data=features.astype(np.float16, copy=False).reshape(n, dim),
            chunks=(rows, dim),
            compressors=feature_codec(),
        )
        group.create_array("keys", data=as_strings(keys).reshape(n), chunks=(rows,), compressors=checked_codec())
        for name, data in (
            ("labels", labels),
            ("true_labels", true_labels),
            ("shard", np.full(n, index)),
            ("position", positions),
        ):
            group.create_array(
                name, data=np.asarray(data, dtype=np.int32).reshape(n), chunks=(rows,), compressors=checked_codec()
            )
        group.attrs.put({"committed": True, "shard": index, "rows": n, "outcome": outcome})

    def stage_failure(self, index: int, outcome: dict) -> None:
        """Record that shard `index` failed (its error in `outcome`); applied by the consolidator."""
        staging = self.root.require_group("staging")
        staging.create_group(self._staging_name(outcome["url"]), overwrite=True).attrs.put(
            {"committed": True, "failed": True, "shard": index, "rows": 0, "outcome": outcome}
        )

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
        with self._locked():
            if "staging" not in self.root:
                return done
            staging = self.root["staging"]
            if order is None:
                staged = []
                for sid in group_names(staging):
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
        for name in ("features", "keys", *ROW_ARRAYS):
            self._fence()  # a local check: before each array, so a slow upload cannot outlive the lease
            arr = images[name]
            if arr.shape[0] < start + n:
                arr.resize((start + n, *arr.shape[1:]))
            if n:
                arr[start : start + n] = group[name][:]
        outcome = dict(group.attrs)["outcome"]
        bad = outcome.get("bad", [])
        entry.update(
            status="done",
            rows=n,
            offset=start,
            bad_count=len(bad),
            bad=bad[:MAX_BAD_RECORDED],
            missing_labels=outcome.get("missing_labels", 0),
            samples=outcome.get("samples", n),
            error=None,
        )
        manifest["rows"] = start + n
        manifest["bad_samples"] = manifest.get("bad_samples", 0) + len(bad)
        manifest["missing_labels"] = manifest.get("missing_labels", 0) + outcome.get("missing_labels", 0)
        manifest["has_true_labels"] = bool(manifest.get("has_true_labels")) or bool(
            n and (group["true_labels"][:] >= 0).any()
        )
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
        with self._locked():
            manifest = self.manifest
            rows = manifest["rows"]
            self._fence()
            for name in ("features", "keys", *ROW_ARRAYS):
                arr = self.root["images"][name]
                if arr.shape[0] != rows:
                    arr.resize((rows, *arr.shape[1:]))
            if "staging" in self.root:
                done = {s["id"] for s in manifest["shards"] if s["status"] == "done"}
                staging = self.root["staging"]
                names = set(group_names(staging))
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

    def write_text(self, class_set, features: np.ndarray, mask: np.ndarray) -> None:
        """Replace text/* with (C, P, D) features, (C, P) mask, prompts and class names (under
        the lock: two jobs starting on one cache would otherwise create the arrays at once)."""
        prompts = np.full(mask.shape, "", dtype=object)
        for c, ps in enumerate(class_set.prompts):
            prompts[c, : len(ps)] = ps
        with self._locked():
            self._fence()
            if "text" in self.root:
                del self.root["text"]
            text = self.root.create_group("text")
            for name, value in (
                ("features", features.astype(np.float16)),
                ("mask", mask.astype(bool)),
                ("prompts", prompts),
                ("class_names", class_set.class_names),
            ):
                write_array(text, name, value)
            text.attrs.put(
                {
                    "classes": class_set.name,
                    "fingerprint": class_set.fingerprint(),
                    "num_classes": class_set.num_classes,
                    "complete": True,
                }
            )
            manifest = self.manifest
            manifest["class_names"] = list(class_set.class_names)
            self._write_manifest(manifest)

    def set_class_names(self, names: list[str]) -> None:
        """Record the class names in the manifest (imports without text features)."""
        with self._locked():
            manifest = self.manifest
            manifest["class_names"] = list(names)
            self._write_manifest(manifest)

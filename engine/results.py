"""Typed result groups of the stages after `embed`: each type owns its group's name, its array
names and layout, its writer and its reader, so no caller builds or splits array names.

| type | group | written by |
|---|---|---|
| `Selection` | `selection/` | `engine select` |
| `Neighbors` | `knn/` | `engine diagnose` (and `select` with the knn classifier) |
| `IndexGroup` | `index/` | `engine index` (or on demand) |
| `Diagnostics` | `diagnostics/` | `engine diagnose` |
| `Training` | `train/` | `engine train` |

Every write replaces the group in one step (`Cache.replace_group`): readers see the old group or
the new one. Readers check that a group covers the cache's current rows and name the command
that refreshes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from engine.cache import Cache, write_array
from engine.runtime import EngineError


def _check_rows(cache: Cache, name: str, rows: int, command: str) -> None:
    if rows != cache.num_rows:
        raise EngineError(
            f"cache: the {name} results in {cache.path} cover {rows} rows but the cache has "
            f"{cache.num_rows}; rerun `{command} --cache {cache.path}`"
        )


def _reader(cache: Cache, group):
    """fn(array name inside `group`) -> its values, read with the cache's checks (missing chunks,
    checksums) so a damaged result is a one-line error, never data."""
    base, complete = group.path, bool(dict(group.attrs).get("chunks_complete"))
    return lambda name: cache.read(f"{base}/{name}", complete=complete)


def _open(cache: Cache, name: str, command: str, schema: int):
    group = cache.open_group(name, missing=f"run `{command} --cache {cache.path}` first")
    found = dict(group.attrs).get("schema", 1)
    if found != schema:
        raise EngineError(
            f"cache: the {name} results in {cache.path} were written by another engine version "
            f"(layout {found}, this engine reads {schema}); rerun `{command} --cache {cache.path}`"
        )
    return group


# ----------------------------------------------------------------------------- selection


@dataclass
class PairResult:
    """One (classifier, criterion) test: score (N,) float32, the value compared with the threshold;
    passed (N,) bool."""

    score: np.ndarray
    passed: np.ndarray


@dataclass
class ClassifierResult:
    """One classifier's per-row output: prediction (N,) int32 argmax, confidence (N,) float32 max P,
    loss_score (N,) float32 normalised log P(label) in [0, 1]."""

    prediction: np.ndarray
    confidence: np.ndarray
    loss_score: np.ndarray

    FIELDS: ClassVar[tuple[str, ...]] = ("prediction", "confidence", "loss_score")


@dataclass
class Selection:
    """The `selection/` group: selected (N,) bool, filled (N,) bool (empty-class fill-in),
    noise_score (N,) float32, clean_score (N,) float32 or None (robust mode: higher = more likely
    clean), pairs {"classifier/criterion": PairResult}, classifiers {name: ClassifierResult},
    noise (the robust mode's estimate of given -> true class counts: given (E,), true (E,) int32,
    count (E,) float32, or None) and attrs (the summary, configuration and timings)."""

    selected: np.ndarray
    filled: np.ndarray
    noise_score: np.ndarray
    pairs: dict = field(default_factory=dict)
    classifiers: dict = field(default_factory=dict)
    clean_score: np.ndarray | None = None
    noise: dict | None = None
    attrs: dict = field(default_factory=dict)

    NAME: ClassVar[str] = "selection"
    SCHEMA: ClassVar[int] = 2
    COMMAND: ClassVar[str] = "engine select"

    @classmethod
    def from_result(cls, result, attrs: dict | None = None) -> Selection:
        """From an `engine.select.SelectionResult` (or anything with the same fields)."""
        return cls(
            selected=result.selected,
            filled=result.filled,
            noise_score=result.noise_score,
            pairs={p: PairResult(result.scores[p], result.masks[p]) for p in result.scores},
            classifiers={
                c: ClassifierResult(result.predictions[c], result.confidences[c], result.loss_scores[c])
                for c in result.predictions
            },
            clean_score=getattr(result, "clean_score", None),
            noise=getattr(result, "noise", None),
            attrs=dict(attrs or {}),
        )

    def write(self, cache: Cache) -> None:
        def fill(group):
            write_array(group, "selected", np.asarray(self.selected, bool))
            write_array(group, "filled", np.asarray(self.filled, bool))
            write_array(group, "noise_score", np.asarray(self.noise_score, np.float32))
            if self.clean_score is not None:
                write_array(group, "clean_score", np.asarray(self.clean_score, np.float32))
            for pair, result in self.pairs.items():
                classifier, criterion = pair.split("/")
                sub = group.require_group(f"pairs/{classifier}/{criterion}")
                write_array(sub, "score", np.asarray(result.score, np.float32))
                write_array(sub, "pass", np.asarray(result.passed, bool))
            for name, result in self.classifiers.items():
                sub = group.require_group(f"classifiers/{name}")
                for key in ClassifierResult.FIELDS:
                    write_array(sub, key, getattr(result, key))
            if self.noise is not None:
                sub = group.require_group("noise")
                for key in ("given", "true", "count"):
                    write_array(sub, key, self.noise[key])

        cache.replace_group(self.NAME, fill, {**self.attrs, "schema": self.SCHEMA})

    @classmethod
    def read(cls, cache: Cache) -> Selection:
        group = _open(cache, cls.NAME, cls.COMMAND, cls.SCHEMA)
        load = _reader(cache, group)
        selected = load("selected").astype(bool)
        _check_rows(cache, "selection", len(selected), cls.COMMAND)
        pairs, classifiers = {}, {}
        if "pairs" in group:
            for classifier in sorted(group["pairs"].group_keys()):
                for criterion in sorted(group[f"pairs/{classifier}"].group_keys()):
                    base = f"pairs/{classifier}/{criterion}"
                    pairs[f"{classifier}/{criterion}"] = PairResult(
                        load(f"{base}/score"), load(f"{base}/pass").astype(bool)
                    )
        if "classifiers" in group:
            for name in sorted(group["classifiers"].group_keys()):
                classifiers[name] = ClassifierResult(
                    *(load(f"classifiers/{name}/{key}") for key in ClassifierResult.FIELDS)
                )
        noise = None
        if "noise" in group:
            noise = {key: load(f"noise/{key}") for key in ("given", "true", "count")}
        return cls(
            selected=selected,
            filled=load("filled").astype(bool),
            noise_score=load("noise_score"),
            pairs=pairs,
            classifiers=classifiers,
            clean_score=load("clean_score") if "clean_score" in group else None,
            noise=noise,
            attrs=dict(group.attrs),
        )

    @classmethod
    def exists(cls, cache: Cache) -> bool:
        return cache.has_group(cls.NAME)

    def table_columns(self) -> dict[str, np.ndarray]:
        """Per-row columns for `--out` tables, in order: selected, filled, noise_score[, clean_score],
        per pair "classifier/criterion/score" and ".../pass", per classifier "name/prediction",
        "name/confidence", "name/loss_score"."""
        out = {"selected": self.selected, "filled": self.filled, "noise_score": self.noise_score}
        if self.clean_score is not None:
            out["clean_score"] = self.clean_score
        for pair, result in self.pairs.items():
            out[f"{pair}/score"] = result.score
            out[f"{pair}/pass"] = result.passed
        for name, result in self.classifiers.items():
            for key in ClassifierResult.FIELDS:
                out[f"{name}/{key}"] = getattr(result, key)
        return out


# ----------------------------------------------------------------------------- neighbors


@dataclass
class Neighbors:
    """The `knn/` group: ids (N, k) int64 and similarities (N, k) float32 of every row's k nearest
    other rows (-1 / -inf where fewer exist); attrs k, the index kind and the rows' fingerprint.
    `read(lazy=True)` keeps the arrays in the store (zarr arrays: slice them)."""

    ids: object
    similarities: object
    k: int
    fingerprint: str
    index: str
    attrs: dict = field(default_factory=dict)

    NAME: ClassVar[str] = "knn"
    SCHEMA: ClassVar[int] = 1
    COMMAND: ClassVar[str] = "engine diagnose"

    def write(self, cache: Cache) -> None:
        def fill(group):
            write_array(group, "ids", np.asarray(self.ids, np.int64))
            write_array(group, "similarities", np.asarray(self.similarities, np.float32))

        cache.replace_group(
            self.NAME,
            fill,
            {
                **self.attrs,
                "k": int(self.k),
                "fingerprint": self.fingerprint,
                "index": self.index,
                "schema": self.SCHEMA,
            },
        )

    @classmethod
    def read(cls, cache: Cache, *, lazy: bool = False) -> Neighbors:
        group = _open(cache, cls.NAME, cls.COMMAND, cls.SCHEMA)
        attrs = dict(group.attrs)
        ids, sims = group["ids"], group["similarities"]
        if not lazy:
            load = _reader(cache, group)
            ids, sims = load("ids"), load("similarities")
        return cls(
            ids=ids,
            similarities=sims,
            k=int(attrs["k"]),
            fingerprint=attrs.get("fingerprint", ""),
            index=attrs.get("index", ""),
            attrs=attrs,
        )

    @classmethod
    def current(cls, cache: Cache, *, k: int, features=None, at_least: bool = False) -> Neighbors | None:
        """The stored neighbors when they belong to the cache's current rows and hold exactly `k`
        (or, `at_least`, k or more) per row; else None. `features (N, D)` when already loaded;
        else only the rows the fingerprint samples are read."""
        from engine.index import row_fingerprint

        if not cache.has_group(cls.NAME):
            return None
        stored = cls.read(cache, lazy=True)
        if stored.k < k or (stored.k != k and not at_least):
            return None
        if stored.fingerprint != row_fingerprint(cache if features is None else features, keys=cache.keys()):
            return None
        return stored


# ----------------------------------------------------------------------------- index


@dataclass
class IndexGroup:
    """The `index/` group: the serialised FAISS index (bytes,) uint8 and its `info` (kind,
    parameters, calibrated recall, rows, fingerprint), configuration and timings."""

    data: np.ndarray
    info: dict
    attrs: dict = field(default_factory=dict)

    NAME: ClassVar[str] = "index"
    SCHEMA: ClassVar[int] = 1
    COMMAND: ClassVar[str] = "engine index"

    def write(self, cache: Cache) -> None:
        cache.replace_group(
            self.NAME,
            lambda group: write_array(group, "faiss", np.asarray(self.data, np.uint8)),
            {**self.attrs, "info": self.info, "schema": self.SCHEMA},
        )

    @classmethod
    def read(cls, cache: Cache) -> IndexGroup:
        group = _open(cache, cls.NAME, cls.COMMAND, cls.SCHEMA)
        attrs = dict(group.attrs)
        return cls(data=_reader(cache, group)("faiss"), info=attrs["info"], attrs=attrs)

    @classmethod
    def read_info(cls, cache: Cache) -> dict | None:
        """The stored index's info without reading the index, or None when there is none."""
        if not cache.has_group(cls.NAME):
            return None
        return dict(_open(cache, cls.NAME, cls.COMMAND, cls.SCHEMA).attrs)["info"]


# ----------------------------------------------------------------------------- diagnostics


@dataclass
class Diagnostics:
    """The `diagnostics/` group: agreement (N,) float32 share of a row's neighbors with its label,
    majority (N,) int64 the neighbors' majority label, class_agreement (C,) float64,
    image_similarity (C, C) float32 cosine of the class centroids; attrs the confusable pairs,
    swap table and k."""

    agreement: np.ndarray
    majority: np.ndarray
    class_agreement: np.ndarray
    image_similarity: np.ndarray
    attrs: dict = field(default_factory=dict)

    NAME: ClassVar[str] = "diagnostics"
    SCHEMA: ClassVar[int] = 1
    COMMAND: ClassVar[str] = "engine diagnose"
    ARRAYS: ClassVar[tuple[str, ...]] = ("agreement", "majority", "class_agreement", "image_similarity")

    def write(self, cache: Cache) -> None:
        def fill(group):
            for key in self.ARRAYS:
                write_array(group, key, getattr(self, key))

        cache.replace_group(self.NAME, fill, {**self.attrs, "schema": self.SCHEMA})

    @classmethod
    def read(cls, cache: Cache) -> Diagnostics:
        group = _open(cache, cls.NAME, cls.COMMAND, cls.SCHEMA)
        load = _reader(cache, group)
        return cls(**{key: load(key) for key in cls.ARRAYS}, attrs=dict(group.attrs))


# ----------------------------------------------------------------------------- training


@dataclass
class Training:
    """The `train/` group: labels (N,) int32, the final MixFix labels y'; selection (N,) bool, the
    final training set; attrs the configuration, accuracy table, head path and timings."""

    labels: np.ndarray
    selection: np.ndarray
    attrs: dict = field(default_factory=dict)

    NAME: ClassVar[str] = "train"
    SCHEMA: ClassVar[int] = 1
    COMMAND: ClassVar[str] = "engine train"

    def write(self, cache: Cache) -> None:
        def fill(group):
            write_array(group, "labels", np.asarray(self.labels, np.int32))
            write_array(group, "selection", np.asarray(self.selection, bool))

        cache.replace_group(self.NAME, fill, {**self.attrs, "schema": self.SCHEMA})

    @classmethod
    def read(cls, cache: Cache) -> Training:
        group = _open(cache, cls.NAME, cls.COMMAND, cls.SCHEMA)
        load = _reader(cache, group)
        labels = load("labels").astype(np.int32)
        _check_rows(cache, "train", len(labels), cls.COMMAND)
        return cls(labels=labels, selection=load("selection").astype(bool), attrs=dict(group.attrs))

    @classmethod
    def exists(cls, cache: Cache) -> bool:
        return cache.has_group(cls.NAME)


GROUPS = (Selection, Neighbors, IndexGroup, Diagnostics, Training)


def written_at(cache: Cache, name: str) -> float | None:
    """When result group `name` was written (seconds since the epoch), or None when absent."""
    if not cache.has_group(name):
        return None
    return float(dict(cache.open_group(name).attrs).get("written", 0.0))

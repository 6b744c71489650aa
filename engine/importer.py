"""`engine import`: bring-your-own features (.npz) into a new cache, validated at the boundary.

The .npz holds `features` (N, D), `labels` (N,), and optionally `keys` (N,), `true_labels` (N,),
`text_features` (C, P, D) or (C, D), `text_mask` (C, P), `class_names` (C,).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.append import CacheWriter
from engine.cache import cache_exists
from engine.classes import ClassSet
from engine.runtime import EngineError

_logger = logging.getLogger(__name__)
IMPORT_SHARD = "import:"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise EngineError(f"import: {message}")


def _validate(data, path: str) -> dict:
    _require(
        "features" in data and "labels" in data,
        f"{path} must hold 'features' and 'labels'; it holds {sorted(data.keys())}",
    )
    features, labels = np.asarray(data["features"]), np.asarray(data["labels"])
    _require(
        features.ndim == 2 and features.shape[0] > 0 and features.shape[1] > 0,
        f"features: expected shape (N, D) with N, D > 0, got {features.shape}",
    )
    _require(np.issubdtype(features.dtype, np.floating), f"features: expected floats, got {features.dtype}")
    _require(np.isfinite(features).all(), "features: contains NaN or infinity")
    n = features.shape[0]
    _require(labels.shape == (n,), f"labels: expected shape ({n},), got {labels.shape}")
    _check_ints(labels, "labels")
    out = {"features": features, "labels": labels.astype(np.int32)}
    keys = np.asarray(data["keys"]).astype(str) if "keys" in data else np.array([f"{i:09d}" for i in range(n)])
    _require(keys.shape == (n,), f"keys: expected shape ({n},), got {keys.shape}")
    uniq, counts = np.unique(keys, return_counts=True)
    _require(len(uniq) == n, f"keys: must be unique; {uniq[counts > 1][:3].tolist()} appear more than once")
    out["keys"] = keys
    true = np.asarray(data["true_labels"]) if "true_labels" in data else np.full(n, -1)
    _require(true.shape == (n,), f"true_labels: expected shape ({n},), got {true.shape}")
    _check_ints(true, "true_labels")
    out["true_labels"] = true.astype(np.int32)
    out.update(_validate_text(data, features.shape[1], labels))
    if "class_names" in data and "class_names" not in out:
        names = np.asarray(data["class_names"]).astype(str)
        _require(
            names.ndim == 1 and labels.max() < len(names),
            f"class_names: expected (C,) with C > max label {labels.max()}, got {names.shape}",
        )
        out["class_names"] = names
    return out


INT32_MAX = np.iinfo(np.int32).max


def _check_ints(values: np.ndarray, name: str) -> None:
    """Integers in [-1, 2^31 - 1), checked before any cast (a cast to int32 would wrap)."""
    _require(np.issubdtype(values.dtype, np.integer), f"{name}: expected integers, got {values.dtype}")
    if values.size:
        low, high = int(values.min()), int(values.max())
        _require(low >= -1, f"{name}: expected >= -1 (-1 = missing), got min {low}")
        _require(high < INT32_MAX, f"{name}: expected values below {INT32_MAX}, got max {high}")


def _validate_text(data, dim: int, labels: np.ndarray) -> dict:
    if "text_features" not in data:
        return {}
    raw = np.asarray(data["text_features"])
    _require(np.issubdtype(raw.dtype, np.floating), f"text_features: expected floats, got {raw.dtype}")
    _require(np.isfinite(raw).all(), "text_features: contains NaN or infinity")
    text = _unit_rows(raw.reshape(-1, raw.shape[-1]) if raw.ndim >= 2 else raw).reshape(raw.shape)
    if text.ndim == 2:
        text = text[:, None, :]
    _require(
        text.ndim == 3 and text.shape[2] == dim,
        f"text_features: expected (C, P, {dim}) or (C, {dim}), got {np.asarray(data['text_features']).shape}",
    )
    c, p = text.shape[:2]
    mask = np.asarray(data["text_mask"], dtype=bool) if "text_mask" in data else np.ones((c, p), bool)
    _require(mask.shape == (c, p), f"text_mask: expected ({c}, {p}), got {mask.shape}")
    _require(mask.any(axis=1).all(), "text_mask: every class needs at least one prompt")
    _require(labels.max() < c, f"labels: max label {labels.max()} but only {c} classes of text features")
    names = (
        np.asarray(data["class_names"]).astype(str)
        if "class_names" in data
        else np.array([f"class {k}" for k in range(c)])
    )
    _require(names.shape == (c,), f"class_names: expected ({c},), got {names.shape}")
    norms = np.linalg.norm(text, axis=2)
    _require(bool((norms[mask] > 0).all()), "text_features: a real (masked-in) prompt is all zeros")
    return {"text": text * mask[..., None], "mask": mask, "class_names": names}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit length in float64 (first by their largest entry, so values such
    as 1e300 neither overflow nor underflow), as float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    scale = np.abs(x).max(axis=-1, keepdims=True)
    x = np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


def _load(path: str) -> dict:
    """The arrays of the .npz at `path`; anything else (a .npy, an empty or cut-off file, object
    arrays that would need pickle) is a one-line error."""
    import zipfile

    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise EngineError(f"import: {path} is not a readable .npz ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise EngineError(
            f"import: {path} holds a single array ({type(loaded).__name__}), expected an .npz with named arrays "
            "(np.savez(path, features=..., labels=...))"
        )
    try:
        with loaded as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        reason = "it holds object arrays (pickled Python objects)" if "allow_pickle" in str(err) else str(err)
        raise EngineError(f"import: {path} cannot be read: {reason}; store numbers and strings only") from None


def import_npz(path: str, cache_path: str, *, model_name: str | None = None) -> dict:
    """Create `cache_path` from the .npz at `path`; rows are L2-normalised (and counted if they weren't).

    `model_name` names the backbone that made the features: caches imported with the same name
    count as the same feature model (e.g. a train and a test split); without it each import is
    its own model, identified by the file's sha256.
    """
    if cache_exists(cache_path):
        raise EngineError(f"import: {cache_path} already exists; import into a new cache path")
    data = _validate(_load(path), path)
    features, renormalised = _unit_features(data["features"])
    cache = CacheWriter(cache_path, create=True)
    identity = {"model": model_name, "pretrained": "imported", "embed_dim": int(features.shape[1])}
    if not model_name:
        identity.update(model=f"import:{Path(path).name}", sha256=_sha256(path))
    cache.initialise(identity, dim=features.shape[1], precision="imported", source="import")
    index = cache.register_shards([f"{IMPORT_SHARD}{Path(path).resolve()}"])
    ((url, shard),) = index.items()
    n = len(features)
    cache.stage_shard(
        shard,
        features=features,
        keys=data["keys"].tolist(),
        labels=data["labels"],
        true_labels=data["true_labels"],
        positions=np.arange(n, dtype=np.int32),
        outcome={"url": url, "samples": n, "bad": [], "missing_labels": int((data["labels"] < 0).sum())},
    )
    cache.consolidate()
    if "class_names" in data and "text" not in data:
        cache.set_class_names(data["class_names"].tolist())
    if "text" in data:
        class_set = ClassSet(
            name="imported",
            class_names=tuple(data["class_names"].tolist()),
            prompts=tuple(("<imported>",) * int(m.sum()) for m in data["mask"]),
        )
        cache.write_text(class_set, data["text"], data["mask"])
    return {
        "cache": cache_path,
        "rows": n,
        "dim": int(features.shape[1]),
        "renormalised": renormalised,
        "has_text": "text" in data,
        "has_true_labels": bool((data["true_labels"] >= 0).any()),
    }


def _unit_features(raw: np.ndarray, *, block: int = 65_536) -> tuple[np.ndarray, int]:
    """(features (N, D) float16 unit rows, rows that were not unit length), in blocks of rows so
    a float64 copy is never held whole."""
    out = np.empty(raw.shape, dtype=np.float16)
    renormalised = 0
    for start in range(0, len(raw), block):
        x = np.asarray(raw[start : start + block], dtype=np.float64)
        scale = np.abs(x).max(axis=1)
        zero = np.flatnonzero(scale == 0)
        _require(zero.size == 0, f"features: row {start + int(zero[0]) if zero.size else 0} is all zeros")
        norms = np.linalg.norm(x / scale[:, None], axis=1) * scale
        renormalised += int((np.abs(norms - 1) > 1e-3).sum())
        out[start : start + block] = _unit_rows(x).astype(np.float16)
    return out, renormalised


def _sha256(path: str) -> str:
    from engine.models import sha256_file

    return sha256_file(path)

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
    _require(np.issubdtype(labels.dtype, np.integer), f"labels: expected integers, got {labels.dtype}")
    _require(labels.min() >= -1, f"labels: expected >= -1 (-1 = missing), got min {labels.min()}")
    out = {"features": features, "labels": labels.astype(np.int32)}
    keys = np.asarray(data["keys"]).astype(str) if "keys" in data else np.array([f"{i:09d}" for i in range(n)])
    _require(keys.shape == (n,), f"keys: expected shape ({n},), got {keys.shape}")
    uniq, counts = np.unique(keys, return_counts=True)
    _require(len(uniq) == n, f"keys: must be unique; {uniq[counts > 1][:3].tolist()} appear more than once")
    out["keys"] = keys
    true = np.asarray(data["true_labels"]) if "true_labels" in data else np.full(n, -1)
    _require(true.shape == (n,), f"true_labels: expected shape ({n},), got {true.shape}")
    _require(
        np.issubdtype(true.dtype, np.integer) and (true.size == 0 or true.min() >= -1),
        f"true_labels: expected integers >= -1, got dtype {true.dtype}",
    )
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


def _validate_text(data, dim: int, labels: np.ndarray) -> dict:
    if "text_features" not in data:
        return {}
    text = np.asarray(data["text_features"], dtype=np.float32)
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
    norms = np.linalg.norm(text, axis=2, keepdims=True)
    text = np.where(norms > 0, text / np.maximum(norms, 1e-12), 0.0)
    return {"text": text * mask[..., None], "mask": mask, "class_names": names}


def import_npz(path: str, cache_path: str, *, model_name: str | None = None) -> dict:
    """Create `cache_path` from the .npz at `path`; rows are L2-normalised (and counted if they weren't).

    `model_name` names the backbone that made the features: caches imported with the same name
    count as the same feature model (e.g. a train and a test split); without it each import is
    its own model, identified by the file's sha256.
    """
    if cache_exists(cache_path):
        raise EngineError(f"import: {cache_path} already exists; import into a new cache path")
    with np.load(path, allow_pickle=False) as npz:
        data = _validate({k: npz[k] for k in npz.files}, path)
    features = data["features"].astype(np.float32)
    norms = np.linalg.norm(features, axis=1)
    _require(
        (norms > 0).all(), f"features: {(norms == 0).sum()} rows are all zeros (first: row {np.argmax(norms == 0)})"
    )
    renormalised = int((np.abs(norms - 1) > 1e-3).sum())
    features = (features / norms[:, None]).astype(np.float16)
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


def _sha256(path: str) -> str:
    from engine.models import sha256_file

    return sha256_file(path)

"""Shared helpers for the benchmark scripts: synthetic CLIP-like data, timing, RSS, results JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def clip_like_features(
    n: int,
    num_classes: int,
    dim: int,
    *,
    noise: str = "sym",
    rate: float = 0.4,
    spread: float = 0.55,
    close_pairs: int | None = None,
    seed: int = 0,
    dtype=np.float16,
    block: int = 200_000,
):
    """Unit-norm features around class centres on the sphere, with planted close class pairs.

    Returns (features (n, dim) `dtype`, labels (n,) int32 noisy, true_labels (n,) int32,
    text_features (C, 1, dim) float32 unit rows near the centres, partner (C,) int64 close partner).
    `noise`: sym (uniform over all classes) | hard (flip to the close partner) | mix (half each).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    close_pairs = num_classes // 4 if close_pairs is None else close_pairs
    partner = np.arange(num_classes) ^ 1  # pairs (0,1), (2,3), ...
    partner[partner >= num_classes] = num_classes - 1
    for a in range(0, 2 * close_pairs, 2):  # pull the first `close_pairs` pairs together
        b = a + 1
        if b >= num_classes:
            break
        mid = centres[a] + centres[b]
        centres[b] = 0.6 * mid / np.linalg.norm(mid) + 0.4 * centres[b]
        centres[b] /= np.linalg.norm(centres[b])
    true_labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    features = np.empty((n, dim), dtype=dtype)
    for start in range(0, n, block):
        stop = min(n, start + block)
        x = centres[true_labels[start:stop]] + spread / np.sqrt(dim) * rng.standard_normal((stop - start, dim)).astype(
            np.float32
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        features[start:stop] = x.astype(dtype)
    labels = true_labels.copy()
    flip = rng.random(n) < rate
    kind = {"sym": np.zeros(n, bool), "hard": np.ones(n, bool), "mix": rng.random(n) < 0.5}
    if noise not in kind and noise != "none":
        raise ValueError(f"noise: got {noise!r}, expected sym, hard, mix or none")
    if noise != "none":
        hard = flip & kind[noise]
        sym = flip & ~kind[noise]
        labels[hard] = partner[true_labels[hard]]
        labels[sym] = rng.integers(0, num_classes, size=int(sym.sum()))
    text = centres + rng.standard_normal(centres.shape).astype(np.float32) / np.sqrt(dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return features, labels, true_labels, text[:, None, :], partner


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, *args, repeats: int = 1, **kwargs):
    """Run `fn` `repeats` times; return (last result, median seconds, all seconds)."""
    seconds = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds), seconds


def machine() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict, *, path: Path | None = None) -> Path:
    """Write `payload` (plus date and machine) to benchmarks/results/NAME-YYYYmmdd-HHMMSS.json, or
    over `path`, an earlier write of the same run (a run that saves as it goes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = path.stem[len(name) + 1 :] if path else _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = path or RESULTS / f"{name}-{stamp}.json"
    body = {"benchmark": name, "date": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(body, indent=2, default=float) + "\n")
    return path

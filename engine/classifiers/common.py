"""Input checks and block sizes shared by the classifiers."""

from __future__ import annotations

import numpy as np
import torch

from engine.runtime import EngineError

BLOCK_ELEMENTS = 1 << 24  # default scoring block: about 16M float32 logits (64 MB) at once


def auto_block_rows(columns: int, *, budget: int = BLOCK_ELEMENTS) -> int:
    """Rows per block so that one (rows, columns) float32 array holds about `budget` elements."""
    return int(min(1 << 18, max(256, budget // max(1, columns))))


def as_features(features, device: torch.device) -> torch.Tensor:
    """(N, D) float16 tensor on `device` (no copy for a CPU float16 array or tensor)."""
    if isinstance(features, torch.Tensor):
        tensor = features.detach()
    else:
        array = np.asarray(features)
        if array.dtype.kind != "f":
            raise EngineError(f"features: got dtype {array.dtype}, expected a floating point (N, D) array")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.ndim != 2 or not tensor.is_floating_point() or len(tensor) == 0:
        raise EngineError(
            f"features: got shape {tuple(tensor.shape)} dtype {tensor.dtype}, "
            f"expected (N, D) floating point with N >= 1"
        )
    return tensor.to(device=device, dtype=torch.float16)


def as_labels(labels, n: int, num_classes: int | None, *, name: str = "labels") -> tuple[torch.Tensor, int]:
    """(N,) int64 CPU labels checked against [-1, num_classes); num_classes from the labels when None."""
    tensor = (
        labels.detach().cpu()
        if isinstance(labels, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(np.asarray(labels)))
    )
    if tensor.ndim != 1 or tensor.is_floating_point() or tensor.dtype is torch.bool or len(tensor) != n:
        raise EngineError(
            f"{name}: got shape {tuple(tensor.shape)} dtype {tensor.dtype}, expected ({n},) integer (-1 = unlabelled)"
        )
    tensor = tensor.long()
    top = int(tensor.max()) if n else -1
    if num_classes is None and top < 0:
        raise EngineError(f"{name}: got no labelled row (all -1) and no num_classes, expected some labelled rows")
    num_classes = top + 1 if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EngineError(f"num_classes: got {num_classes!r}, expected a positive integer")
    if n and (int(tensor.min()) < -1 or top >= num_classes):
        raise EngineError(
            f"{name}: got values in [{int(tensor.min())}, {top}], expected "
            f"[-1, {num_classes - 1}] (-1 = unlabelled, num_classes={num_classes})"
        )
    return tensor, num_classes


def resolve(device) -> torch.device:
    from engine.runtime import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device)

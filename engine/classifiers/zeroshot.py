"""The zero-shot classifier: CLIP's prompt ensemble (logsumexp of cos / tau over a class's prompts,
then log-softmax over classes), one block of rows at a time. See docs/method.md."""

from __future__ import annotations

import torch

from engine.runtime import EngineError


def zeroshot_log_probs(
    features: torch.Tensor, text_features: torch.Tensor, text_mask: torch.Tensor, *, tau: float = 0.07
) -> torch.Tensor:
    """log P_zs (B, C) float32 for one block of rows.

    features (B, D) any float dtype, unit rows; text_features (C, P, D) unit rows (padding
    ignored); text_mask (C, P) bool, True for real prompts (every class needs one). Computed on
    the device of `features`; memory B x C x P float32."""
    if features.ndim != 2 or text_features.ndim != 3 or features.shape[1] != text_features.shape[2]:
        raise EngineError(
            f"zeroshot_log_probs: got features {tuple(features.shape)} and text_features "
            f"{tuple(text_features.shape)}, expected (B, D) and (C, P, D) with the same D"
        )
    if tuple(text_mask.shape) != tuple(text_features.shape[:2]):
        raise EngineError(
            f"text_mask: got shape {tuple(text_mask.shape)}, expected {tuple(text_features.shape[:2])} (C, P)"
        )
    x = features.to(torch.float32)
    text = text_features.to(device=x.device, dtype=torch.float32)
    mask = text_mask.to(device=x.device, dtype=torch.bool)
    num_classes, prompts, dim = text.shape
    sims = (x @ text.reshape(num_classes * prompts, dim).T).view(len(x), num_classes, prompts)
    sims.mul_(1.0 / tau).masked_fill_(~mask, float("-inf"))
    return torch.log_softmax(torch.logsumexp(sims, dim=2), dim=1)

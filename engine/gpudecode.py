"""JPEG decoding and the model's preprocessing on the GPU (batched nvJPEG through
`torchvision.io.decode_jpeg(..., device="cuda")`), so that CPU workers only read bytes.

The preprocessing is the model's own (open_clip: resize the short side to S with bicubic
antialiasing, center crop S x S, scale to [0, 1], normalise with the model's mean and std), done
on GPU tensors. An image nvJPEG refuses comes back in `failed` and is decoded on the CPU by the
caller. See docs/architecture.md ("Embedding on a GPU").
"""

from __future__ import annotations

import logging

import numpy as np
import torch

_logger = logging.getLogger(__name__)
SUPPORTED_MODES = ("shortest", "squash")


def supported(identity: dict) -> bool:
    """Whether the model's preprocessing is one the GPU path reproduces."""
    pp = identity.get("preprocess", {})
    return pp.get("resize_mode", "shortest") in SUPPORTED_MODES and pp.get("interpolation", "bicubic") in (
        "bicubic",
        "bilinear",
    )


def device_index(rows, device: torch.device) -> torch.Tensor:
    """Row indices on `device`, copied from page-locked memory so that the host does not wait for
    the GPU's queued work (a plain copy would: the next batch's decoding then could not overlap
    this batch's model)."""
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


class GpuJpegDecoder:
    """Decode a list of JPEG byte tensors on `device` and preprocess them as the model does."""

    def __init__(self, identity: dict, device: torch.device):
        from torchvision.transforms import InterpolationMode

        pp = identity.get("preprocess", {})
        size = pp.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mode = pp.get("resize_mode", "shortest")
        self.interpolation = (
            InterpolationMode.BICUBIC
            if pp.get("interpolation", "bicubic") == "bicubic"
            else (InterpolationMode.BILINEAR)
        )
        self.device = device
        self.mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(3, 1, 1)
        self.std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(3, 1, 1)

    def __call__(self, jpegs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """(preprocessed images (n_ok, 3, H, W) float32 on the device in input order without the
        failed ones, indices of the JPEGs nvJPEG could not decode)."""
        decoded, failed = self._decode(jpegs)
        kept = [image for image in decoded if image is not None]
        groups: dict = {}
        for i, image in enumerate(kept):  # images of one size are resized together, in one call
            groups.setdefault(tuple(image.shape), []).append(i)
        if len(groups) == 1:
            return self._preprocess(torch.stack(kept)), failed
        out = torch.empty((len(kept), 3, *self.size), device=self.device)
        for rows in groups.values():
            out[device_index(rows, self.device)] = self._preprocess(torch.stack([kept[i] for i in rows]))
        return out, failed

    def _decode(self, jpegs: list[torch.Tensor]) -> tuple[list, list[int]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)), []
        except RuntimeError:
            pass  # one bad image fails the whole batch: decode them one by one
        out, failed = [], []
        for i, data in enumerate(jpegs):
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
                failed.append(i)
        return out, failed

    def _preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 of one size -> (B, 3, S, S) float32, normalised."""
        import torchvision.transforms.v2.functional as TF

        if self.mode == "squash":
            image = TF.resize(image, list(self.size), interpolation=self.interpolation, antialias=True)
        else:
            image = TF.resize(image, min(self.size), interpolation=self.interpolation, antialias=True)
            image = TF.center_crop(image, list(self.size))
        return (image.float().div_(255.0) - self.mean[None]) / self.std[None]

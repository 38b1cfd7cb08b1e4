"""PSNR on uint8 RGB images (HWC or NHWC), as the model cards report it: per image on [0, 1],
then mean +- std over images."""

from __future__ import annotations

import numpy as np
import torch


def psnr(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for uint8 images; identical images give +inf."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {test.shape}")
    if ref.ndim == 3:
        ref, test = ref[None], test[None]
    diff = ref.astype(np.float64) / 255.0 - test.astype(np.float64) / 255.0
    mse = np.mean(diff * diff, axis=tuple(range(1, diff.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def psnr_torch(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """:func:`psnr` of uint8 N x C x H x W tensors, on their device, float64 per image (the squared
    differences of uint8 values sum exactly there; the result equals the numpy one to rounding)."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(test.shape)}")
    diff = ref.to(torch.float64) - test.to(torch.float64)
    mse = diff.square().flatten(1).mean(dim=1) / 255.0**2
    return 10.0 * torch.log10(1.0 / mse)

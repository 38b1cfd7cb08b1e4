"""Colour fidelity: users report washed-out, desaturated reconstructions after fine-tuning.

Two per-image numbers catch that where PSNR/SSIM barely move: the mean shift of each RGB
channel (reconstruction minus original, 0-255 units) and the ratio of mean HSV saturation.
"""

from __future__ import annotations

import torch

CHANNELS = ("r", "g", "b")


def channel_shift(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """N x 3 mean per-channel difference (test - ref) of uint8 N x 3 x H x W images, 0-255 units."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(test.shape)}")
    return (test.double() - ref.double()).mean(dim=(2, 3)).float()


def hsv_saturation(img: torch.Tensor) -> torch.Tensor:
    """HSV saturation (max - min) / max per pixel of N x 3 x H x W images; 0 where max is 0."""
    x = img.double()
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    return torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx))


def saturation_ratio(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """N mean saturation of test / mean saturation of ref; NaN for a grey original (undefined)."""
    s_ref = hsv_saturation(ref).mean(dim=(1, 2))
    s_test = hsv_saturation(test).mean(dim=(1, 2))
    # A grey original has no saturation to lose: the ratio is undefined, not infinite.
    ok = s_ref > 1e-6
    return torch.where(ok, s_test / s_ref.clamp_min(1e-6), torch.full_like(s_ref, float("nan"))).float()

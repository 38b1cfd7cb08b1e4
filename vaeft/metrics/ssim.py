"""SSIM as in the model cards: Gaussian window sigma 1.5 (11x11), K1 0.01, K2 0.03, per image on RGB.

In torch so that it batches on the evaluation device. The statistics are computed over the
"valid" window positions only, which is what scikit-image's ``structural_similarity`` averages
(it filters the whole image, then drops a border of half the window), so the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIGMA = 1.5
WIN_SIZE = 11
K1, K2 = 0.01, 0.03


def _gaussian_1d(sigma: float, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid-mode Gaussian filter, channel by channel (x: N x C x H x W)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range: float = 255.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-image SSIM (mean over window positions and channels) of N x C x H x W tensors.

    Inputs may be uint8 or float in ``[0, data_range]``; the maths runs in float64 on CPU and
    float32 elsewhere (float32 keeps 1e-5 agreement on photos; float64 is free on CPU).
    """
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(test.shape)}")
    if ref.ndim != 4:
        raise ValueError(f"expected N x C x H x W, got {tuple(ref.shape)}")
    if min(ref.shape[-2:]) < WIN_SIZE:
        raise ValueError(f"images must be at least {WIN_SIZE}x{WIN_SIZE} for SSIM, got {tuple(ref.shape[-2:])}")
    if dtype is None:
        dtype = torch.float64 if ref.device.type == "cpu" else torch.float32
    x, y = ref.to(dtype), test.to(dtype)
    g = _gaussian_1d(SIGMA, WIN_SIZE, dtype, x.device)
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    # Population (not sample) covariance, as use_sample_covariance=False.
    var_x = _filter(x * x, g) - mu_x * mu_x
    var_y = _filter(y * y, g) - mu_y * mu_y
    cov = _filter(x * y, g) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).float()

"""Oklab-space reconstruction terms (Furception): sRGB in [-1, 1] -> linear sRGB -> Oklab.

Björn Ottosson's Oklab (2020): linear sRGB -> LMS (M1), cube root, -> Lab (M2). Distances in
Oklab weight errors closer to perceived colour differences than sRGB distances do, which is why
Furception trains on them. Everything is differentiable; the cube root is taken as
sign(x)·|x|^(1/3) with |x| clamped away from 0, because d/dx x^(1/3) is infinite at 0 and decoders
do output exact black and slightly out-of-gamut values.
"""

from __future__ import annotations

import torch

# Ottosson's published matrices (https://bottosson.github.io/posts/oklab/), linear sRGB -> LMS.
_M1 = torch.tensor([
    [0.4122214708, 0.5363325363, 0.0514459929],
    [0.2119034982, 0.6806995451, 0.1073969566],
    [0.0883024619, 0.2817188376, 0.6299787005],
])
# LMS^(1/3) -> Lab.
_M2 = torch.tensor([
    [0.2104542553, 0.7936177850, -0.0040720468],
    [1.9779984951, -2.4285922050, 0.4505937099],
    [0.0259040371, 0.7827717662, -0.8086757660],
])
# Keeps the cube root's gradient finite at 0 ((1e-6)^(-2/3)/3 ~ 3e3).
_CBRT_EPS = 1e-6


def srgb_to_linear(x01: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer function inverted, for values in [0, 1] (extended symmetrically below 0)."""
    a = x01.abs()
    lin = torch.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055).pow(2.4))
    return torch.sign(x01) * lin


def _cbrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * x.abs().clamp_min(_CBRT_EPS).pow(1.0 / 3.0)


def linear_to_oklab(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W linear sRGB -> N x 3 x H x W Oklab (L, a, b)."""
    m1, m2 = _M1.to(rgb), _M2.to(rgb)
    lms = torch.einsum("ij,njhw->nihw", m1, rgb)
    return torch.einsum("ij,njhw->nihw", m2, _cbrt(lms))


def model_to_oklab(x: torch.Tensor) -> torch.Tensor:
    """Images in the model's [-1, 1] range -> Oklab, in fp32."""
    return linear_to_oklab(srgb_to_linear((x.float() + 1.0) * 0.5))


def oklab_l1(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-element |Oklab(x̂) - Oklab(x)| (unreduced, N x 3 x H x W)."""
    return (model_to_oklab(x_hat) - model_to_oklab(x)).abs()


def oklab_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-element (Oklab(x̂) - Oklab(x))² (unreduced, N x 3 x H x W)."""
    return (model_to_oklab(x_hat) - model_to_oklab(x)).square()

"""Pixel-space reconstruction terms on images in [-1, 1] (per-element, unreduced)."""

from __future__ import annotations

import torch


def l1(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).abs()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).square()

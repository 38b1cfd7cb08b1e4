"""How the per-element reconstruction loss becomes one number.

``sum`` is LDM's ``LPIPSWithDiscriminator``: nll = rec / exp(logvar) + logvar, summed over all
elements and divided by the batch size. Its scale grows with C x H x W (≈2e5 at 256²), which is
what the LDM learning rates and adaptive GAN weight were tuned against. ``mean`` averages over
all elements instead (logvar still applies), the scale of plain L1/MSE training.
"""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["sum", "mean"]


def nll(rec: torch.Tensor, logvar: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """``rec`` is N x C x H x W (per-image terms already broadcast); returns a scalar."""
    per_element = rec / torch.exp(logvar) + logvar
    if reduction == "sum":
        return per_element.sum() / rec.shape[0]
    if reduction == "mean":
        return per_element.mean()
    raise ValueError(f"unknown reduction {reduction!r} (expected 'sum' or 'mean')")

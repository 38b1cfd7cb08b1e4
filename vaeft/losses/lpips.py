"""LPIPS as a training loss: frozen network, gradient to the decoder's output.

The network and its fp32, eps-safe feature normalisation are the evaluation metric's
(:mod:`vaeft.metrics.perceptual`), so training and evaluation measure the same thing; a bf16
phase runs the backbone's convs in bf16 (tests/test_losses.py bounds the difference). The
backbone comes from the weight store only: without it :func:`load_lpips_loss` raises
:class:`~vaeft.weights.MissingWeightsError` naming ``vaeft weights pull lpips-NET``, before any
training starts — a random backbone would train the decoder towards nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaeft.metrics.perceptual import LPIPS_NETS, build_lpips, lpips_distance
from vaeft.weights import require


class LpipsLoss(torch.nn.Module):
    """``backbone_dtype`` bf16: the VGG/AlexNet convs under bf16 autocast (the GPU's fast path)
    while scaling, feature normalisation and distance stay fp32; None: all fp32. fp16 is not
    offered: unnormalised VGG activations reach the thousands, and their squares fp16's limit."""

    def __init__(self, net: str, weights_file: str | Path, backbone_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if backbone_dtype not in (None, torch.bfloat16):
            raise ValueError(f"LPIPS backbone dtype must be None or bfloat16, got {backbone_dtype}")
        self.net_name = net
        self.model = build_lpips(net, weights_file)
        self.backbone_dtype = backbone_dtype

    def train(self, mode: bool = True) -> LpipsLoss:
        # Always eval: lpips has dropout in its linear heads (use_dropout=True), and a loss that
        # changed with the caller's train()/eval() would not be a fixed measure.
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of images in [-1, 1], shape N x 1 x 1 x 1 (broadcasts per pixel), fp32."""
        autocast = (torch.autocast(x.device.type, dtype=self.backbone_dtype) if self.backbone_dtype is not None
                    else torch.autocast(x.device.type, enabled=False))
        with autocast:
            lp, _ = lpips_distance(self.model, x, x_hat)
        return lp.view(-1, 1, 1, 1)


def load_lpips_loss(net: str = "vgg", backbone_dtype: torch.dtype | None = None) -> LpipsLoss:
    """The LPIPS loss on the store's ImageNet backbone; raises MissingWeightsError without it."""
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r} (expected one of {', '.join(LPIPS_NETS)})")
    return LpipsLoss(net, require(LPIPS_NETS[net]), backbone_dtype)

"""Discriminators: LDM's PatchGAN and Furception's WGAN-GP critic.

Both are pix2pix's ``NLayerDiscriminator`` (4x4 convs, LeakyReLU 0.2, ``n_layers`` stride-2
stages, one logit per patch), initialised N(0, 0.02) (BatchNorm weights N(1, 0.02)) as
``taming.modules.discriminator.model.weights_init``. They differ in the normalisation:

* ``batch`` (PatchGAN, LDM): BatchNorm. Its statistics come from the batch, so a batch of one
  image has no variance to normalise by; :class:`NLayerDiscriminator` refuses it in training
  instead of producing NaN/garbage (a peer bug, REFERENCE §2).
* ``layer`` (critic, Furception): LayerNorm over each sample's C x H x W, written as
  ``GroupNorm(1, C)`` (the same normalisation, but independent of the spatial size). A WGAN-GP
  critic must not mix samples: the gradient penalty is defined per sample.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "layer"]


class DiscriminatorBatchError(ValueError):
    pass


def _norm(kind: Norm, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(1, channels)


def weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: Norm = "batch") -> None:
        super().__init__()
        self.norm = norm
        # Convs followed by a normalisation carry no bias (it would be cancelled), as in pix2pix.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), _norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "batch" and self.training and x.shape[0] < 2:
            raise DiscriminatorBatchError(
                "the BatchNorm PatchGAN needs at least 2 images per batch and process in training "
                f"(got {x.shape[0]}); raise batch_size or use the LayerNorm critic (gan.kind: wgan-gp)")
        return self.main(x)

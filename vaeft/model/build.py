"""Build a diffusers ``AutoencoderKL`` from the typed architecture params."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vaeft.compat.torchvision_cpu import ensure_torchvision
from vaeft.config import ArchitectureParams

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def autoencoder_class() -> type[AutoencoderKL]:
    """diffusers' ``AutoencoderKL``, imported after the torchvision work-around."""
    ensure_torchvision()
    from diffusers import AutoencoderKL

    return AutoencoderKL


def diffusers_config(arch: ArchitectureParams) -> dict:
    n = len(arch.block_out_channels)
    return {
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(arch.block_out_channels),
        "layers_per_block": arch.layers_per_block,
        "act_fn": "silu",
        "latent_channels": arch.latent_channels,
        "norm_num_groups": arch.norm_num_groups,
        "sample_size": arch.sample_size,
        "scaling_factor": arch.scaling_factor,
    }


def build_autoencoder(arch: ArchitectureParams) -> AutoencoderKL:
    """A freshly initialised autoencoder (weights from the global torch RNG)."""
    return autoencoder_class()(**diffusers_config(arch))

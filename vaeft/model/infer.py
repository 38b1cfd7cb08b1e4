"""The ``AutoencoderKL`` config that a diffusers-layout state dict implies, from tensor shapes.

Shapes fix channels, depth and layers per block; they cannot tell the GroupNorm group count,
scaling factor or sample size, so those come from the caller (defaults: the SD VAE's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from vaeft.model.state_files import ModelLoadError

SD_DEFAULTS = {"norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215}


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Size:
    if key not in state:
        raise ModelLoadError(f"{source}: cannot infer the config: key {key} is missing")
    return state[key].shape


def infer_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint", **overrides) -> dict:
    """A diffusers ``AutoencoderKL`` config; ``overrides`` (e.g. ``norm_num_groups``) win over defaults."""
    n = 1 + max((int(m[1]) for k in state if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))), default=-1)
    if n == 0:
        raise ModelLoadError(f"{source}: cannot infer the config: no encoder.down_blocks.* keys")
    channels = [int(_shape(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", source)[0]) for i in range(n)]
    layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    config = {
        "in_channels": int(_shape(state, "encoder.conv_in.weight", source)[1]),
        "out_channels": int(_shape(state, "decoder.conv_out.weight", source)[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": int(_shape(state, "decoder.conv_in.weight", source)[1]),
        **SD_DEFAULTS,
    }
    # Some VAEs (e.g. newer diffusers ones) drop the 1x1 quant convs.
    if "quant_conv.weight" not in state:
        config["use_quant_conv"] = False
    if "post_quant_conv.weight" not in state:
        config["use_post_quant_conv"] = False
    if not any(".mid_block.attentions." in k for k in state):
        config["mid_block_add_attention"] = False
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config

"""The one place that decides what trains.

Fine-tunes train the decoder side only (``decoder`` + ``post_quant_conv``); the encoder and
``quant_conv`` stay frozen so the latent space, and every diffusion model trained on it, is
unchanged. The embedded default's ``pretrain`` phase trains everything.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

DECODER_SIDE = ("decoder.", "post_quant_conv.")
Trainable = Literal["decoder", "all"]


def is_decoder_side(param_name: str) -> bool:
    return param_name.startswith(DECODER_SIDE)


def configure_trainable(vae: nn.Module, trainable: Trainable) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` and train/eval modes; return the trainable parameters by name."""
    if trainable not in ("decoder", "all"):
        raise ValueError(f"trainable must be 'decoder' or 'all', got {trainable!r}")
    out: dict[str, nn.Parameter] = {}
    for name, p in vae.named_parameters():
        train_it = trainable == "all" or is_decoder_side(name)
        p.requires_grad_(train_it)
        if train_it:
            out[name] = p
    set_modes(vae, trainable)
    return out


def set_modes(vae: nn.Module, trainable: Trainable) -> None:
    """``train()`` on what trains, ``eval()`` on the frozen side (call after ``vae.train()``)."""
    vae.train()
    if trainable == "decoder":
        vae.encoder.eval()
        vae.quant_conv.eval()


def encoder_state(vae: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen side's tensors, for checks that it did not move."""
    return {k: v.detach().clone() for k, v in vae.state_dict().items() if not is_decoder_side(k)}

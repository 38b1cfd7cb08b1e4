"""Does a decoder survive float16? Decode latents in fp16 and watch every block's activations.

The SD VAE decoder is known to overflow fp16 (activations past 65,504 become inf, then NaN in
the next GroupNorm); SDXL's VAE famously needed an "fp16-fix". Forward hooks record each block's
largest magnitude so a report shows where the headroom runs out, not just that it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class BlockActivation:
    name: str
    max_abs: float  # over finite values; inf/NaN are flagged separately
    nonfinite: bool

    @property
    def headroom(self) -> float:
        """How many times larger activations could get before fp16 overflows (<1: already over)."""
        return FP16_MAX / self.max_abs if self.max_abs > 0 else float("inf")


@dataclass(frozen=True)
class Fp16Report:
    blocks: list[BlockActivation]
    device: str
    batch_shape: tuple[int, ...]

    @property
    def overflow(self) -> bool:
        return any(b.nonfinite for b in self.blocks)

    @property
    def first_overflow(self) -> str | None:
        return next((b.name for b in self.blocks if b.nonfinite), None)


def watched_blocks(vae: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The decoder side's blocks in execution order."""
    dec = vae.decoder
    blocks: list[tuple[str, torch.nn.Module]] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        blocks.append(("post_quant_conv", vae.post_quant_conv))
    blocks.append(("decoder.conv_in", dec.conv_in))
    blocks.append(("decoder.mid_block", dec.mid_block))
    blocks += [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(dec.up_blocks)]
    blocks += [("decoder.conv_norm_out", dec.conv_norm_out), ("decoder.conv_out", dec.conv_out)]
    return blocks


def _stats(t: torch.Tensor) -> tuple[float, bool]:
    finite = torch.isfinite(t)
    all_finite = bool(finite.all())
    vals = t.detach().float().abs()
    if not all_finite:
        vals = vals[finite]
    return (float(vals.max()) if vals.numel() else float("nan")), not all_finite


@torch.no_grad()
def check_fp16(
    vae: AutoencoderKL,
    batch_size: int = 2,
    latent_size: int = 32,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> Fp16Report:
    """Decode ``latents`` (default: N(0, 1/scaling_factor^2), the spread of real SD latents) in fp16.

    The model is converted to fp16 in place. Without a GPU this runs on CPU (recent torch has fp16
    conv/GroupNorm kernels on CPU).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # nn.Module.to, not diffusers' override: the latter warns about fp32-kept modules the VAE has none of.
    torch.nn.Module.to(vae, device=device, dtype=torch.float16).eval()
    if latents is None:
        g = torch.Generator().manual_seed(seed)
        c = vae.config.latent_channels
        latents = torch.randn(batch_size, c, latent_size, latent_size, generator=g) / vae.config.scaling_factor
    latents = latents.to(device=device, dtype=torch.float16)
    seen: dict[str, tuple[float, bool]] = {}
    handles = []
    for name, module in watched_blocks(vae):
        def hook(_m, _inp, out, name=name):
            t = out[0] if isinstance(out, tuple) else out
            seen[name] = _stats(t)
        handles.append(module.register_forward_hook(hook))
    try:
        vae.decode(latents)
    finally:
        for h in handles:
            h.remove()
    blocks = [BlockActivation(name, *seen[name]) for name, _ in watched_blocks(vae) if name in seen]
    return Fp16Report(blocks, str(device), tuple(latents.shape))

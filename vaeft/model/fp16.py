"""Does a decoder survive float16? Decode latents in fp16 and watch every block's activations.

The SD VAE decoder is known to overflow fp16 (activations past 65,504 become inf, then NaN in
the next GroupNorm); SDXL's VAE famously needed an "fp16-fix". Forward hooks
(:mod:`vaeft.model.probes`) record each block's largest magnitude so a report shows where the
headroom runs out, not just that it did. ``vaeft train fp16`` (:mod:`vaeft.train.fp16`) fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vaeft.model.probes import FP16_MAX, ActivationProbe, block_names

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


@dataclass(frozen=True)
class BlockActivation:
    name: str
    max_abs: float  # over finite values; inf/NaN are flagged separately
    nonfinite: bool

    @property
    def headroom(self) -> float:
        """How many times larger activations could get before fp16 overflows (<1: already over)."""
        return FP16_MAX / self.max_abs if self.max_abs > 0 else float("inf")

    @property
    def fill(self) -> float:
        """The peak as a fraction of fp16's largest value (>= 1: overflow)."""
        return float("inf") if self.nonfinite else self.max_abs / FP16_MAX


@dataclass(frozen=True)
class Fp16Report:
    blocks: list[BlockActivation]
    device: str
    batch_shape: tuple[int, ...]
    # The finer probe points (module path -> peak) the blocks fold.
    points: dict[str, float] = field(default_factory=dict)

    @property
    def overflow(self) -> bool:
        return any(b.nonfinite for b in self.blocks)

    @property
    def first_overflow(self) -> str | None:
        return next((b.name for b in self.blocks if b.nonfinite), None)

    def unsafe(self, min_headroom: float = 1.0) -> list[str]:
        """Blocks that overflow or keep less than ``min_headroom`` x to fp16's range."""
        return [b.name for b in self.blocks if b.nonfinite or b.headroom < min_headroom]


def random_latents(vae: AutoencoderKL, batch_size: int, latent_size: int, seed: int = 0) -> torch.Tensor:
    """N(0, 1/scaling_factor^2): the spread of real SD latents."""
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    return torch.randn(batch_size, c, latent_size, latent_size, generator=g) / vae.config.scaling_factor


@torch.no_grad()
def check_fp16(
    vae: AutoencoderKL,
    batch_size: int = 2,
    latent_size: int = 32,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> Fp16Report:
    """Decode ``latents`` (default: :func:`random_latents`) in fp16, one latent at a time.

    The model is converted to fp16 in place. Without a GPU this runs on CPU (recent torch has fp16
    conv/GroupNorm kernels on CPU).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # nn.Module.to, not diffusers' override: the latter warns about fp32-kept modules the VAE has none of.
    torch.nn.Module.to(vae, device=device, dtype=torch.float16).eval()
    if latents is None:
        latents = random_latents(vae, batch_size, latent_size, seed)
    latents = latents.to(device=device, dtype=torch.float16)
    # One at a time: a 1024x1024 decode's activations are ~GBs per image.
    with ActivationProbe(vae) as probe:
        for z in latents.split(1):
            vae.decode(z)
    peaks, bad = probe.block_peaks(), probe.block_nonfinite()
    blocks = [BlockActivation(name, peaks.get(name, float("nan")), name in bad)
              for name in block_names(vae) if name in peaks or name in bad]
    return Fp16Report(blocks, str(device), tuple(latents.shape), dict(probe.peaks))

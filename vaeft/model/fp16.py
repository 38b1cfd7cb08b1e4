"""Does a decoder survive float16? Decode latents in fp16 and watch every block's activations.

The SD VAE decoder is known to overflow fp16 (activations past 65,504 become inf, then NaN in
the next GroupNorm); SDXL's VAE famously needed an "fp16-fix". Forward hooks
(:mod:`vaeft.model.probes`) record each block's largest magnitude so a report shows where the
headroom runs out, not just that it did. ``vaeft train fp16`` (:mod:`vaeft.train.fp16`) fixes it.
"""

from __future__ import annotations

import contextlib
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
    emulated: bool = False  # fp16 rounding on fp32 kernels (decode_fp16), not fp16 kernels

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


class _Fp16Storage:
    """fp16 arithmetic as GPU kernels do it, emulated in fp32: weights and latents rounded to fp16,
    and every module's output rounded to fp16 (a value past 65504 becomes inf, as it would).

    GPU fp16 convolutions, matmuls and norms accumulate in fp32 and round their output; torch's
    CPU fp16 convolution instead takes a slow reference path (42-114x an fp32 decode,
    BENCHMARKS.md), which makes a 1024x1024 check of an SD decoder take hours. Rounding at every
    module boundary is what the emulation keeps; elementwise steps inside a module (the resnet's
    residual add, SiLU's product) round once, at the module's output.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self.modules = [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]
        self._handles: list = []

    @staticmethod
    def _round(_module, _inp, out):
        return out.half().float() if isinstance(out, torch.Tensor) and out.is_floating_point() else None

    def __enter__(self) -> _Fp16Storage:
        with torch.no_grad():
            for top in self.modules:
                for p in top.parameters():
                    p.copy_(p.half().float())
        self._handles = [m.register_forward_hook(self._round) for top in self.modules for m in top.modules()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def resolve_mode(device: str | torch.device | None, emulate: bool | None) -> tuple[torch.device, bool]:
    """The device (default: the first GPU, else the CPU) and whether fp16 is emulated (default: on the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, device.type == "cpu" if emulate is None else emulate


@torch.no_grad()
def decode_fp16(vae: AutoencoderKL, latents: torch.Tensor, device: str | torch.device | None = None,
                emulate: bool | None = None) -> tuple[torch.Tensor, ActivationProbe]:
    """Decode ``latents`` one at a time in fp16, in place on ``vae``: its decoder side ends fp16
    (``emulate`` off) or fp32 holding fp16-rounded weights (on). ``emulate`` None: on for the CPU.
    Returns the fp32 copy of the output and the probe that watched it."""
    device, emulate = resolve_mode(device, emulate)
    if emulate:
        torch.nn.Module.to(vae, device=device, dtype=torch.float32).eval()
        latents = latents.to(device=device, dtype=torch.float16).float()
        storage = _Fp16Storage(vae)
    else:
        # nn.Module.to, not diffusers' override: the latter warns about fp32-kept modules the VAE has none of.
        torch.nn.Module.to(vae, device=device, dtype=torch.float16).eval()
        latents = latents.to(device=device, dtype=torch.float16)
        storage = contextlib.nullcontext()
    outs = []
    # Rounding hooks first: the probe then sees what fp16 would hold (inf past 65504).
    with storage, ActivationProbe(vae) as probe:
        # One at a time: a 1024x1024 decode's activations are ~GBs per image.
        for z in latents.split(1):
            outs.append(vae.decode(z).sample.float())
    return torch.cat(outs), probe


@torch.no_grad()
def check_fp16(
    vae: AutoencoderKL,
    batch_size: int = 2,
    latent_size: int = 32,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    emulate: bool | None = None,
) -> Fp16Report:
    """Decode ``latents`` (default: :func:`random_latents`) in fp16 (:func:`decode_fp16`; the model
    is changed in place) and report each block's peak."""
    if latents is None:
        latents = random_latents(vae, batch_size, latent_size, seed)
    device, emulate = resolve_mode(device, emulate)
    _, probe = decode_fp16(vae, latents, device, emulate)
    peaks, bad = probe.block_peaks(), probe.block_nonfinite()
    blocks = [BlockActivation(name, peaks.get(name, float("nan")), name in bad)
              for name in block_names(vae) if name in peaks or name in bad]
    return Fp16Report(blocks, str(device), tuple(latents.shape), dict(probe.peaks), emulated=emulate)

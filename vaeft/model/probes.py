"""Activation-peak probes on the decoder side: where fp16 decoding overflows, measured per block.

fp16 overflows where values grow past 65,504, and in a kl-f8 decoder that is the residual stream
(conv_in, every resnet's output, the mid attention, the upsamplers), each resnet's hidden conv1
output, and the last blocks at full resolution. A probe hooks those points; a measurement is the
largest finite magnitude per point (and whether any value was inf/NaN), folded into the block it
belongs to for reports. The same probe gives the fp16 phase its penalty: with ``penalty_above``
set, every hooked tensor that carries a gradient adds the squared relative excess of its largest
magnitudes over that threshold.

Points carry a ``stage``: the index of the residual-stream segment they sit on (see
:mod:`vaeft.model.rescale`), ``None`` for points off the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)
# The k largest magnitudes per image make the penalty: a max alone would push one value per step.
PENALTY_TOPK = 16


@dataclass(frozen=True)
class ProbePoint:
    name: str  # module path in the autoencoder, e.g. decoder.up_blocks.3.resnets.1
    block: str  # the report row it folds into, e.g. decoder.up_blocks.3
    kind: str  # "stream" | "hidden" | "other"
    stage: int | None
    module: torch.nn.Module


def _block_points(prefix: str, block: torch.nn.Module, stage: int) -> list[ProbePoint]:
    points: list[ProbePoint] = []
    resnets = list(block.resnets)
    attentions = list(getattr(block, "attentions", None) or [])
    # The mid block runs resnets[0], then (attention, resnet) pairs; up blocks only resnets.
    order: list[tuple[str, torch.nn.Module]] = [("resnets.0", resnets[0])]
    for i, r in enumerate(resnets[1:], start=1):
        if i - 1 < len(attentions) and attentions[i - 1] is not None:
            order.append((f"attentions.{i - 1}", attentions[i - 1]))
        order.append((f"resnets.{i}", r))
    for rel, m in order:
        if rel.startswith("resnets."):
            points.append(ProbePoint(f"{prefix}.{rel}.conv1", prefix, "hidden", None, m.conv1))
        points.append(ProbePoint(f"{prefix}.{rel}", prefix, "stream", stage, m))
    for i, up in enumerate(getattr(block, "upsamplers", None) or []):
        # An upsampler hands the stream to the next stage.
        points.append(ProbePoint(f"{prefix}.upsamplers.{i}", prefix, "stream", stage + 1, up))
    points.append(ProbePoint(prefix, prefix, "stream", stage + (1 if getattr(block, "upsamplers", None) else 0),
                             block))
    return points


def probe_points(vae: torch.nn.Module) -> list[ProbePoint]:
    """The decoder side's probe points, in execution order."""
    dec = vae.decoder
    points: list[ProbePoint] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        points.append(ProbePoint("post_quant_conv", "post_quant_conv", "other", None, vae.post_quant_conv))
    points.append(ProbePoint("decoder.conv_in", "decoder.conv_in", "stream", 0, dec.conv_in))
    points += _block_points("decoder.mid_block", dec.mid_block, 0)
    for i, b in enumerate(dec.up_blocks):
        points += _block_points(f"decoder.up_blocks.{i}", b, i)
    points += [ProbePoint("decoder.conv_norm_out", "decoder.conv_norm_out", "other", None, dec.conv_norm_out),
               ProbePoint("decoder.conv_out", "decoder.conv_out", "other", None, dec.conv_out)]
    return points


def block_names(vae: torch.nn.Module) -> list[str]:
    return list(dict.fromkeys(p.block for p in probe_points(vae)))


def _peak(t: torch.Tensor) -> tuple[float, bool]:
    """(largest finite magnitude, any inf/NaN); the full-size float copy only when needed."""
    t = t.detach()
    peak = t.abs().amax()
    if bool(torch.isfinite(peak)):
        return float(peak), False
    finite = t[torch.isfinite(t)]
    return (float(finite.abs().amax()) if finite.numel() else float("nan")), True


class ActivationProbe:
    """Hooks on every probe point while entered; ``peaks`` and ``nonfinite`` accumulate over the
    forward passes run inside (``reset()`` starts over), ``penalty`` over those with gradients."""

    def __init__(self, vae: torch.nn.Module, penalty_above: float | None = None) -> None:
        self.points = probe_points(vae)
        self.penalty_above = penalty_above
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.peaks: dict[str, float] = {}
        self.nonfinite: set[str] = set()
        self.penalty: torch.Tensor | float = 0.0

    def _hook(self, point: ProbePoint):
        def hook(_module, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            peak, bad = _peak(t)
            if bad:
                self.nonfinite.add(point.name)
            if peak == peak:  # not NaN
                self.peaks[point.name] = max(peak, self.peaks.get(point.name, 0.0))
            if self.penalty_above is not None and t.requires_grad and point.kind != "other":
                flat = t.float().abs().flatten(1)
                top = flat.topk(min(PENALTY_TOPK, flat.shape[1]), dim=1).values
                self.penalty = self.penalty + torch.relu(top / self.penalty_above - 1.0).square().mean()
        return hook

    def __enter__(self) -> ActivationProbe:
        self._handles = [p.module.register_forward_hook(self._hook(p)) for p in self.points]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def block_peaks(self) -> dict[str, float]:
        """The largest peak of each block's points, blocks in execution order."""
        out: dict[str, float] = {}
        for p in self.points:
            if p.name in self.peaks:
                out[p.block] = max(out.get(p.block, 0.0), self.peaks[p.name])
        return out

    def block_nonfinite(self) -> set[str]:
        return {p.block for p in self.points if p.name in self.nonfinite}

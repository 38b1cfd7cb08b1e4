"""Exact rescaling of a kl-f8 decoder's activations: the output stays, the magnitudes move.

GroupNorm divides out the scale of its input, so a linear layer whose output only reaches the
rest of the network through GroupNorms can be scaled freely:

* the **residual stream**: conv_in writes it, every resnet adds ``conv2(...)`` (and maps it
  through ``conv_shortcut`` when channels change), the mid attention adds ``to_out(...)``, the
  upsamplers' convs carry it to the next resolution, and it is read only by GroupNorms (each
  resnet's norm1, the attention's group_norm, conv_norm_out) and by those same additions. Scaling
  the stream of stage ``i`` by ``s_i`` means: every layer writing into it gets weight and bias
  multiplied by ``s_i``, and a layer carrying it from stage ``i`` to stage ``j`` (an upsampler,
  a conv_shortcut) gets weight x ``s_j / s_i`` and bias x ``s_j``.
* each resnet's **hidden** conv1 output, read only by its norm2: weight and bias x ``h``.

Stage 0 is conv_in, the mid block and up_blocks[0]'s resnets; stage ``i`` starts at
up_blocks[i-1]'s upsampler. The encoder, quant_conv and post_quant_conv are never touched.

The only inexactness is GroupNorm's eps (1e-6 added to the variance): scaling a stream by ``s``
changes the output by about eps / (s^2 var) relative, ~1e-6 and below for the magnitudes this is
used on (tests/test_fp16_phase.py checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vaeft.model.probes import probe_points


def stage_count(vae: torch.nn.Module) -> int:
    return len(vae.decoder.up_blocks)


@torch.no_grad()
def _scale(layer: torch.nn.Module, weight: float, bias: float) -> None:
    if weight != 1.0:
        layer.weight.mul_(weight)
    if layer.bias is not None and bias != 1.0:
        layer.bias.mul_(bias)


def _resnet(r: torch.nn.Module, s_in: float, s_out: float, hidden: float) -> None:
    _scale(r.conv1, hidden, hidden)
    _scale(r.conv2, s_out, s_out)
    if r.conv_shortcut is not None:
        _scale(r.conv_shortcut, s_out / s_in, s_out)
    elif s_in != s_out:
        raise ValueError("an identity shortcut cannot change the stream's scale")


def rescale_decoder(vae: torch.nn.Module, stream: Sequence[float], hidden: Mapping[str, float] | None = None) -> None:
    """Scale, in place, the residual stream of stage i by ``stream[i]`` and the hidden conv1 output
    of the resnet named ``name`` (as in :func:`vaeft.model.probes.probe_points`) by ``hidden[name]``."""
    dec = vae.decoder
    n = stage_count(vae)
    s = [float(x) for x in stream]
    if len(s) != n or not all(x > 0 and x == x and x != float("inf") for x in s):
        raise ValueError(f"stream needs {n} positive finite factors, got {stream!r}")
    hidden = dict(hidden or {})
    unknown = set(hidden) - {p.name.removesuffix(".conv1") for p in probe_points(vae) if p.kind == "hidden"}
    if unknown:
        raise ValueError(f"not resnets of the decoder: {', '.join(sorted(unknown))}")
    _scale(dec.conv_in, s[0], s[0])
    for i, r in enumerate(dec.mid_block.resnets):
        _resnet(r, s[0], s[0], hidden.get(f"decoder.mid_block.resnets.{i}", 1.0))
    for a in getattr(dec.mid_block, "attentions", None) or []:
        if a is not None:
            _scale(a.to_out[0], s[0], s[0])
    for i, block in enumerate(dec.up_blocks):
        for j, r in enumerate(block.resnets):
            _resnet(r, s[i], s[i], hidden.get(f"decoder.up_blocks.{i}.resnets.{j}", 1.0))
        for up in block.upsamplers or []:
            _scale(up.conv, s[i + 1] / s[i], s[i + 1])


def fit_rescale(vae: torch.nn.Module, peaks: Mapping[str, float], aim: float) -> tuple[list[float], dict[str, float]]:
    """Factors that bring every stream stage's and hidden output's measured peak (per probe point,
    from :class:`vaeft.model.probes.ActivationProbe`) down to ``aim``; never up (smaller values
    only cost fp16 precision)."""
    stage_peak = [0.0] * stage_count(vae)
    hidden: dict[str, float] = {}
    for p in probe_points(vae):
        peak = peaks.get(p.name)
        if peak is None:
            continue
        if p.kind == "stream" and p.stage is not None and p.stage < len(stage_peak):
            stage_peak[p.stage] = max(stage_peak[p.stage], peak)
        elif p.kind == "hidden" and peak > aim:
            hidden[p.name.removesuffix(".conv1")] = aim / peak
    return [aim / peak if peak > aim else 1.0 for peak in stage_peak], hidden

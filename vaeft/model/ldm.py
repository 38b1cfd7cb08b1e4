"""LDM (CompVis) <-> diffusers ``AutoencoderKL`` state dicts, both directions exact.

Our own implementation of the key mapping (REFERENCE §3); diffusers' ``from_single_file`` is used
only as the independent check in the tests. Every key must map: an unknown key is an error, so a
conversion never silently drops weights. The decoder's up path is stored in reverse order in LDM
(``up.{n-1-i}`` is ``up_blocks.{i}``), and the mid-block attention projections are 1x1 convs in
LDM (``[C, C, 1, 1]``) but linear layers in diffusers (``[C, C]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from vaeft.errors import VaeftError

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_PROJ_LDM = ("q", "k", "v", "proj_out")
_SIMPLE = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}


class ConversionError(VaeftError, ValueError):
    """A state dict with keys that do not belong to a kl-f8 ``AutoencoderKL``."""


def _inverse(d: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def _alt(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_L2D_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]] = [
    (re.compile(rf"^(encoder|decoder)\.({_alt(_SIMPLE)})\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.{_SIMPLE[m[2]]}.{m[3]}"),
    (re.compile(rf"^encoder\.down\.(\d+)\.block\.(\d+)\.({_alt(_RESNET_PARTS)})\.(weight|bias)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (re.compile(rf"^decoder\.up\.(\d+)\.block\.(\d+)\.({_alt(_RESNET_PARTS)})\.(weight|bias)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (re.compile(rf"^(encoder|decoder)\.mid\.block_([12])\.({_alt(_RESNET_PARTS)})\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PARTS[m[3]]}.{m[4]}"),
    (re.compile(rf"^(encoder|decoder)\.mid\.attn_1\.({_alt(_ATTN_PARTS)})\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}.{m[3]}"),
    (re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$"), lambda m, n: m[0]),
]

_RES_INV, _ATTN_INV, _SIMPLE_INV = _inverse(_RESNET_PARTS), _inverse(_ATTN_PARTS), _inverse(_SIMPLE)

_D2L_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str]]] = [
    (re.compile(rf"^(encoder|decoder)\.({_alt(_SIMPLE_INV)})\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.{_SIMPLE_INV[m[2]]}.{m[3]}"),
    (re.compile(rf"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.({_alt(_RES_INV)})\.(weight|bias)$"),
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_RES_INV[m[3]]}.{m[4]}"),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$"),
     lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (re.compile(rf"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.({_alt(_RES_INV)})\.(weight|bias)$"),
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_RES_INV[m[3]]}.{m[4]}"),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$"),
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (re.compile(rf"^(encoder|decoder)\.mid_block\.resnets\.([01])\.({_alt(_RES_INV)})\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RES_INV[m[3]]}.{m[4]}"),
    (re.compile(rf"^(encoder|decoder)\.mid_block\.attentions\.0\.({_alt(_ATTN_INV)})\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid.attn_1.{_ATTN_INV[m[2]]}.{m[3]}"),
    (re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$"), lambda m, n: m[0]),
]

_LDM_ATTN_PROJ = re.compile(rf"\.mid\.attn_1\.({_alt(_ATTN_PROJ_LDM)})\.weight$")


def _count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def ldm_up_blocks(keys) -> int:
    return _count(keys, r"^decoder\.up\.(\d+)\.")


def diffusers_up_blocks(keys) -> int:
    return _count(keys, r"^decoder\.up_blocks\.(\d+)\.")


def _map_key(key: str, rules, n_up: int) -> str | None:
    for pattern, make in rules:
        if m := pattern.match(key):
            return make(m, n_up)
    return None


def _convert(keys, rules, n_up: int, layout: str) -> dict[str, str]:
    mapping, unknown = {}, []
    for key in keys:
        new = _map_key(key, rules, n_up)
        if new is None:
            unknown.append(key)
        else:
            mapping[key] = new
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not part of an {layout}-layout AutoencoderKL, e.g. "
            f"{', '.join(unknown[:5])}"
        )
    return mapping


def ldm_key_map(keys) -> dict[str, str]:
    """LDM key -> diffusers key for every key (``ConversionError`` if one does not map)."""
    keys = list(keys)
    return _convert(keys, _L2D_RULES, ldm_up_blocks(keys), "LDM")


def diffusers_key_map(keys) -> dict[str, str]:
    """diffusers key -> LDM key for every key (``ConversionError`` if one does not map)."""
    keys = list(keys)
    return _convert(keys, _D2L_RULES, diffusers_up_blocks(keys), "diffusers")


def is_ldm_layout(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in keys)


def ldm_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An LDM-layout VAE state dict (no prefix) in the diffusers layout."""
    mapping = ldm_key_map(state)
    out = {}
    for key, new in mapping.items():
        t = state[key]
        if _LDM_ATTN_PROJ.search(key) and t.ndim == 4:
            t = t.reshape(t.shape[0], t.shape[1])
        out[new] = t
    return out


def diffusers_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (attention as 1x1 convs)."""
    mapping = diffusers_key_map(state)
    out = {}
    for key, new in mapping.items():
        t = state[key]
        if _LDM_ATTN_PROJ.search(new) and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)
        out[new] = t
    return out

"""Reading weight files safely, and picking the VAE's tensors out of LDM/SD checkpoints.

Pickled files (``.ckpt``, ``.pt``, ``.bin``) are read only with ``torch.load(weights_only=True)``:
a file that needs arbitrary pickle could run code on load, so it is refused, not "trusted".
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from vaeft.errors import VaeftError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SD_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Training-only parts of a full LDM checkpoint (LPIPS, discriminator, logvar).
IGNORED_PARTS = ("loss.",)


class ModelLoadError(VaeftError, ValueError):
    """A model path that cannot be loaded; the message says why and what was expected."""


class UnsafePickleError(ModelLoadError):
    pass


def read_tensors(path: str | Path) -> dict:
    """The raw content of a weight file: safetensors, or a pickle restricted to tensors and plain data."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own untyped errors
            raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from err
    if path.suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: unknown weight file type {path.suffix!r} "
            f"(expected {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(
            f"{path}: refused: this pickle needs arbitrary Python objects to load, and loading it "
            f"could run code. Only tensors and plain data are accepted (torch.load weights_only=True). "
            f"On a machine you trust, re-save just its state_dict as .safetensors. Detail: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _unwrap(raw: Mapping) -> dict:
    # Lightning checkpoints keep the weights under "state_dict" (sometimes nested).
    while "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _ema_key(key: str) -> str:
    # LitEma registers one buffer per parameter, named with the dots removed.
    return EMA_PREFIX + key.replace(".", "")


def extract_vae_state(raw: Mapping, ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The VAE's tensors (LDM or diffusers key names, no prefix) from any supported checkpoint.

    Handles Lightning dicts, full SD checkpoints (``first_stage_model.``), full LDM training
    checkpoints (``loss.*`` dropped) and their LitEma copy (``model_ema.*``) when ``ema`` is set.
    """
    state = _unwrap(raw)
    if any(k.startswith(SD_PREFIX) for k in state):
        state = {k[len(SD_PREFIX):]: v for k, v in state.items() if k.startswith(SD_PREFIX)}
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    main = {k: v for k, v in state.items() if k.startswith(VAE_PARTS)}
    other = [k for k in state if not k.startswith(VAE_PARTS + IGNORED_PARTS + (EMA_PREFIX,))]
    if other:
        raise ModelLoadError(
            f"{source}: {len(other)} key(s) that belong to no VAE part "
            f"({', '.join(p.rstrip('.') for p in VAE_PARTS)}), e.g. {', '.join(other[:5])}"
        )
    if not main:
        raise ModelLoadError(f"{source}: no VAE weights found (no keys starting with {', '.join(VAE_PARTS)})")
    if not ema:
        return main
    if not has_ema:
        raise ModelLoadError(
            f"{source}: EMA weights requested but the checkpoint has no {EMA_PREFIX}* keys "
            "(ema-pruned release files already hold the EMA weights under the main keys: load without EMA)"
        )
    missing = [k for k in main if _ema_key(k) not in state]
    if missing:
        raise ModelLoadError(
            f"{source}: {len(missing)} weight(s) have no EMA copy, e.g. {', '.join(missing[:3])} "
            f"(looked for {_ema_key(missing[0])})"
        )
    return {k: state[_ema_key(k)] for k in main}

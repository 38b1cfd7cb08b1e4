"""Reading weight files safely, and picking the VAE's tensors out of LDM/SD checkpoints.

Pickled files (``.ckpt``, ``.pt``, ``.bin``) are read only with ``torch.load(weights_only=True)``:
a file that needs arbitrary pickle could run code on load, so it is refused, not "trusted".

The released LDM/SD checkpoints were written by PyTorch Lightning 1.x and name a few globals
beyond tensors and plain data: the ``callbacks`` dict is keyed by the ``ModelCheckpoint`` class
and its scores may be numpy scalars. Those names, and only those, resolve to inert stand-ins
defined here (:data:`LIGHTNING_STANDINS`): a class that is never instantiated with behaviour,
and a numpy-scalar rebuild that accepts numeric dtypes only and returns a Python number. Nothing
from Lightning or numpy is imported or called to build them; every other global is refused by
torch's weights-only unpickler before anything runs.
"""

from __future__ import annotations

import pickle
import re
import struct
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
# A full LDM training checkpoint's discriminator (taming's NLayerDiscriminator).
DISC_PREFIX = "loss.discriminator."


class ModelLoadError(VaeftError, ValueError):
    """A model path that cannot be loaded; the message says why and what was expected."""


class UnsafePickleError(ModelLoadError):
    pass


class LightningCallbackKey:
    """Stands in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``.

    Lightning 1.x (before 1.5) keyed ``checkpoint["callbacks"]`` by the callback's class; the
    pickle only names it, so any hashable object will do as the key. Instances carry plain data.
    """

    lightning_name = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class NumpyDType:
    """Stands in for ``numpy.dtype`` while unpickling: records the type code and byte order only."""

    def __init__(self, code: str, align: bool = False, copy: bool = True) -> None:
        if not isinstance(code, str) or not re.fullmatch(r"[bBhHiIlLqQefd?]|[iuf][1248]|b1", code):
            raise pickle.UnpicklingError(f"numpy dtype {code!r} refused: only numeric scalar dtypes are accepted")
        self.code, self.byteorder = code, "<"

    def __setstate__(self, state) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "<"
        self.byteorder = {"<": "<", ">": ">", "|": "<", "=": "<"}.get(order, "<")


_STRUCT_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                 "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}


def numpy_scalar(dtype: NumpyDType, data) -> float | int | bool:
    """Stands in for ``numpy.core.multiarray.scalar``: the number, decoded from its raw bytes."""
    if not isinstance(dtype, NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy scalar refused: only numeric scalars from raw bytes are accepted")
    code = _STRUCT_CODES.get(dtype.code, dtype.code)
    (value,) = struct.unpack(dtype.byteorder + code, bytes(data))
    return value


# Pickle global -> inert stand-in. Exactly the globals Lightning 1.x checkpoints use beyond torch's own.
LIGHTNING_STANDINS: dict[str, object] = {
    LightningCallbackKey.lightning_name: LightningCallbackKey,
    "numpy.core.multiarray.scalar": numpy_scalar,
    "numpy._core.multiarray.scalar": numpy_scalar,  # the same, as numpy 2 names it
    "numpy.dtype": NumpyDType,
}


def _refused_global(err: Exception) -> str | None:
    m = re.search(r"GLOBAL (\S+)", str(err))
    return m[1] if m else None


def _unpickler_detail(err: Exception) -> str:
    # torch wraps the unpickler's own reason in advice about weights_only=False, which we never take.
    text = str(err)
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip()
    return reason.splitlines()[0] if reason else type(err).__name__


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
        with torch.serialization.safe_globals([(v, k) for k, v in LIGHTNING_STANDINS.items()]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        what = f"it names the global {name}, which" if name else "it needs an object that"
        raise UnsafePickleError(
            f"{path}: refused: {what} is not a tensor, plain data or one of the Lightning 1.x "
            f"checkpoint names vaeft reads with inert stand-ins, and loading it could run code "
            f"(torch.load weights_only=True; nothing was executed). On a machine you trust, re-save "
            f"just its state_dict as .safetensors. Detail: {_unpickler_detail(err)}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


# The GroupNorm group count of an LDM file vaeft wrote: shapes cannot tell it, so the file does.
GROUPS_KEY = "norm_num_groups"


def recorded_groups(path: str | Path, raw: Mapping) -> int | None:
    """The group count a file records (safetensors metadata, or a top-level entry of a .ckpt)."""
    path = Path(path)
    value = None
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(GROUPS_KEY)
    elif isinstance(raw.get(GROUPS_KEY), (int, str)):
        value = raw[GROUPS_KEY]
    if value is None:
        return None
    try:
        groups = int(value)
    except ValueError:
        groups = 0
    if groups <= 0:
        raise ModelLoadError(f"{path}: recorded {GROUPS_KEY} {value!r} is not a positive integer")
    return groups


def _unwrap(raw: Mapping) -> dict:
    # Lightning checkpoints keep the weights under "state_dict" (sometimes nested).
    while "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def extract_discriminator_state(raw: Mapping) -> dict[str, torch.Tensor]:
    """A full LDM training checkpoint's discriminator (``loss.discriminator.*``, prefix removed); {} if none."""
    state = _unwrap(raw)
    return {k[len(DISC_PREFIX):]: v for k, v in state.items() if k.startswith(DISC_PREFIX)}


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

"""Loading and saving autoencoders. Every stage loads models through :func:`load_autoencoder`.

Accepted sources:

- a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``);
- an LDM/CompVis ``.ckpt``/``.safetensors`` file: ema-pruned release files, full training
  checkpoints (``loss.*`` ignored, ``model_ema.*`` taken with ``ema=True``), full SD checkpoints
  (``first_stage_model.`` prefix); also a single diffusers-layout weight file;
- a folder holding exactly one such file (e.g. the unzipped original ``kl-f8``).

Weights are always loaded strictly: a missing, unexpected or differently shaped tensor is an
error that names it, never a silent partial load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vaeft import atomic
from vaeft.config import ArchitectureParams
from vaeft.model.build import autoencoder_class, diffusers_config
from vaeft.model.infer import infer_config
from vaeft.model.ldm import diffusers_to_ldm, is_ldm_layout, ldm_key_map, ldm_to_diffusers
from vaeft.model.state_files import (
    GROUPS_KEY,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ModelLoadError,
    UnsafePickleError,
    extract_vae_state,
    read_tensors,
    recorded_groups,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "DIFFUSERS_CONFIG", "DIFFUSERS_WEIGHTS", "LoadedState", "ModelLoadError", "UnsafePickleError",
    "is_diffusers_folder", "load_autoencoder", "weight_file", "load_with_architecture", "load_state", "load_state_strict", "save_diffusers", "save_ldm",
]

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
ConfigLike = Mapping[str, Any] | ArchitectureParams | str | Path


@dataclass(frozen=True)
class LoadedState:
    """A VAE's tensors in the diffusers layout, where they came from, and the config the source carries."""

    state: dict[str, torch.Tensor]
    source: Path
    layout: str  # "diffusers" or "ldm": the layout of the file read
    config: dict | None  # from config.json (diffusers folders only)
    original_keys: dict[str, str]  # diffusers key -> key as named in the file
    norm_num_groups: int | None = None  # as recorded in an LDM file vaeft wrote


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / DIFFUSERS_CONFIG).is_file() and any((path / w).is_file() for w in DIFFUSERS_WEIGHTS)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable config ({err})") from err


def _single_weight_file(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ModelLoadError(
            f"{folder}: not a diffusers AutoencoderKL folder (expected {DIFFUSERS_CONFIG} and one of "
            f"{', '.join(DIFFUSERS_WEIGHTS)}) nor a folder with exactly one weight file (found: {found})"
        )
    return files[0]


def weight_file(path: str | Path) -> Path:
    """The file holding a source's tensors: a diffusers folder's weights, a folder's one file, or the file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir() and is_diffusers_folder(path):
        return next(path / w for w in DIFFUSERS_WEIGHTS if (path / w).is_file())
    return _single_weight_file(path) if path.is_dir() else path


def load_state(path: str | Path, ema: bool = False) -> LoadedState:
    """The tensors of any supported source, converted to the diffusers layout."""
    path = Path(path)
    weights = weight_file(path)
    config = _read_json(path / DIFFUSERS_CONFIG) if path.is_dir() and is_diffusers_folder(path) else None
    content = read_tensors(weights)
    raw = extract_vae_state(content, ema=ema, source=str(weights))
    if is_ldm_layout(raw):
        keys = ldm_key_map(raw)
        return LoadedState(ldm_to_diffusers(raw), weights, "ldm", config, {v: k for k, v in keys.items()},
                           recorded_groups(weights, content))
    return LoadedState(raw, weights, "diffusers", config, {k: k for k in raw})


def resolve_config(config: ConfigLike | None, loaded: LoadedState, norm_num_groups: int | None = None) -> dict:
    """The config to build: the folder's own, an explicit one, or one inferred from shapes."""
    if loaded.config is not None and config is None:
        return loaded.config
    if config is None:
        groups = norm_num_groups if norm_num_groups is not None else loaded.norm_num_groups
        return infer_config(loaded.state, str(loaded.source), norm_num_groups=groups)
    if isinstance(config, ArchitectureParams):
        return diffusers_config(config)
    if isinstance(config, (str, Path)):
        p = Path(config)
        return _read_json(p / DIFFUSERS_CONFIG if p.is_dir() else p)
    return dict(config)


def load_state_strict(vae: torch.nn.Module, loaded: LoadedState) -> None:
    """Copy ``loaded`` into ``vae``; every key must exist on both sides with the same shape."""
    expected = vae.state_dict()
    name = lambda k: loaded.original_keys.get(k, k)  # noqa: E731
    problems = []
    for key, t in expected.items():
        if key in loaded.state and tuple(loaded.state[key].shape) != tuple(t.shape):
            problems.append(
                f"shape mismatch at {name(key)}: file has {tuple(loaded.state[key].shape)}, "
                f"model expects {tuple(t.shape)}"
            )
            break
    missing = [k for k in expected if k not in loaded.state]
    unexpected = [name(k) for k in loaded.state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if problems:
        raise ModelLoadError(f"{loaded.source}: weights do not fit the model config: " + "; ".join(problems))
    vae.load_state_dict(loaded.state, strict=True)


def load_autoencoder(
    path: str | Path,
    dtype: torch.dtype | None = None,
    *,
    config: ConfigLike | None = None,
    ema: bool = False,
    norm_num_groups: int | None = None,
) -> AutoencoderKL:
    """Load an autoencoder from any supported source (see the module docstring).

    ``config`` (a diffusers config dict, typed architecture, or a folder/``config.json``) overrides
    the one a diffusers folder carries or that shapes imply. Shapes cannot tell the GroupNorm group
    count: an LDM file vaeft wrote records it; otherwise pass ``norm_num_groups`` (default 32, the
    SD VAEs') or a full ``config``. ``norm_num_groups`` overrides what a file records.
    ``ema`` takes a full training checkpoint's ``model_ema.*`` weights.
    """
    loaded = load_state(path, ema=ema)
    cfg = resolve_config(config, loaded, norm_num_groups)
    try:
        vae = autoencoder_class().from_config(cfg)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{loaded.source}: invalid AutoencoderKL config ({err})") from err
    load_state_strict(vae, loaded)
    if dtype is not None:
        # nn.Module.to, not diffusers' override: the latter warns about fp32-kept modules the VAE has none of.
        torch.nn.Module.to(vae, dtype=dtype)
    vae.eval()
    return vae


def load_with_architecture(path: str | Path, arch: ArchitectureParams) -> AutoencoderKL:
    """What pipeline stages use: a diffusers folder with its own config, any other source with ``arch``.

    Giving single files the params' architecture means a file that does not match it fails
    with the offending key, instead of loading with a guessed group count.
    """
    return load_autoencoder(path, config=None if is_diffusers_folder(path) else arch)


def save_diffusers(vae: AutoencoderKL, out_dir: str | Path, *, force: bool = False, marked: bool = True,
                   extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` atomically into ``out_dir``.

    ``out_dir`` is replaced only when it is a model folder vaeft wrote (or empty), or with ``force``.
    ``marked=False`` leaves out the output marker, for a model folder inside a larger output.
    ``extra(folder)`` writes more files into the folder before it takes ``out_dir``'s place.
    """
    out_dir = Path(out_dir)
    with atomic.atomic_dir(out_dir, "model" if marked else None, force=force) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        if extra is not None:
            extra(Path(tmp))
        atomic.apply_umask_tree(tmp)  # safetensors writes its file owner-only
    return out_dir


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the same bytes every time.

    safetensors keeps the metadata in a hash map whose order changes from process to process, so
    two identical saves with two or more metadata keys differ in their header (and in DVC's hash
    of the output). The header is rewritten in place with the metadata sorted: same length, same
    tensors, same offsets.
    """
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        with open(path, "r+b") as fh:
            n = int.from_bytes(fh.read(8), "little")
            raw = fh.read(n)
            header = json.loads(raw)
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            canonical = json.dumps(header, separators=(",", ":"))
            # Only entries were reordered: the text is as long as before (padding aside).
            if len(canonical.encode()) <= n:
                fh.seek(8)
                fh.write(canonical.encode().ljust(n, b" "))


def save_ldm(vae: AutoencoderKL | Mapping[str, torch.Tensor], path: str | Path,
             norm_num_groups: int | None = None) -> Path:
    """Write the LDM layout: ``.safetensors`` (preferred) or a Lightning-style ``.ckpt`` ``{"state_dict": ...}``.

    The GroupNorm group count (the model's, or ``norm_num_groups`` for a bare state dict) is
    recorded beside the tensors (safetensors metadata / a top-level ``.ckpt`` entry): converting
    the file back needs it and the shapes do not hold it.
    """
    path = Path(path)
    state = vae if isinstance(vae, Mapping) else vae.state_dict()
    if norm_num_groups is None and not isinstance(vae, Mapping):
        norm_num_groups = int(vae.config.norm_num_groups)
    extra = {GROUPS_KEY: str(norm_num_groups)} if norm_num_groups is not None else {}
    ldm = {k: v.detach().contiguous() for k, v in diffusers_to_ldm(state).items()}
    with atomic.atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_safetensors(ldm, tmp, metadata={"format": "pt", **extra})
        elif path.suffix == ".ckpt":
            torch.save({"state_dict": ldm, **({GROUPS_KEY: norm_num_groups} if extra else {})}, tmp)
        else:
            raise ModelLoadError(f"{path}: an LDM file must end in .safetensors or .ckpt")
    return path

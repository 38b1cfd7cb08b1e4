"""Loading and saving autoencoders. Every stage loads models through :func:`load_autoencoder`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vaeft import atomic
from vaeft.errors import VaeftError
from vaeft.model.build import autoencoder_class

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ModelLoadError(VaeftError, ValueError):
    """A model path that cannot be loaded; the message says why and what was expected."""


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / DIFFUSERS_CONFIG).is_file() and any((path / w).is_file() for w in DIFFUSERS_WEIGHTS)


def load_autoencoder(path: str | Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """Load an autoencoder from a diffusers folder (``config.json`` + weights)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if not is_diffusers_folder(path):
        raise ModelLoadError(
            f"{path}: not a diffusers AutoencoderKL folder (expected {DIFFUSERS_CONFIG} and one of "
            f"{', '.join(DIFFUSERS_WEIGHTS)})"
        )
    # low_cpu_mem_usage=False: the fast path needs `accelerate`, and without it diffusers warns on every load.
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    vae = autoencoder_class().from_pretrained(path, low_cpu_mem_usage=False, **kwargs)
    vae.eval()
    return vae


def save_diffusers(vae: AutoencoderKL, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic.atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return out_dir

"""Converting a model file between the diffusers and LDM layouts (the ``vaeft convert`` command)."""

from __future__ import annotations

from pathlib import Path

from vaeft.model.io import ConfigLike, ModelLoadError, load_autoencoder, save_diffusers, save_ldm

LDM_SUFFIXES = (".safetensors", ".ckpt")


def convert_model(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    ema: bool = False,
    norm_num_groups: int | None = None,
    config: ConfigLike | None = None,
) -> Path:
    """Load ``src`` (any supported source) and write it to ``dst`` in layout ``to``."""
    dst = Path(dst)
    if to == "ldm" and dst.suffix not in LDM_SUFFIXES:
        raise ModelLoadError(f"{dst}: an LDM file must end in {' or '.join(LDM_SUFFIXES)}")
    if to == "diffusers" and dst.suffix in LDM_SUFFIXES:
        raise ModelLoadError(f"{dst}: --to diffusers writes a folder, not a {dst.suffix} file")
    if to not in ("diffusers", "ldm"):
        raise ModelLoadError(f"unknown target layout {to!r} (expected diffusers or ldm)")
    vae = load_autoencoder(src, config=config, ema=ema, norm_num_groups=norm_num_groups)
    return save_diffusers(vae, dst) if to == "diffusers" else save_ldm(vae, dst)

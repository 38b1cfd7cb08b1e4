"""Converting a model file between the diffusers and LDM layouts (the ``vaeft convert`` command)."""

from __future__ import annotations

from pathlib import Path

from vaeft import atomic
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
    force: bool = False,
) -> Path:
    """Load ``src`` (any supported source) and write it to ``dst`` in layout ``to``.

    ``dst`` is checked before loading: a folder is replaced only when it is a model folder vaeft
    wrote, empty, or with ``force``; ``dst`` may never be, hold or lie inside ``src``.
    """
    dst = Path(dst)
    if to == "ldm" and dst.suffix not in LDM_SUFFIXES:
        raise ModelLoadError(f"{dst}: an LDM file must end in {' or '.join(LDM_SUFFIXES)}")
    if to == "diffusers" and dst.suffix in LDM_SUFFIXES:
        raise ModelLoadError(f"{dst}: --to diffusers writes a folder, not a {dst.suffix} file")
    if to not in ("diffusers", "ldm"):
        raise ModelLoadError(f"unknown target layout {to!r} (expected diffusers or ldm)")
    inputs = [src, *([config] if isinstance(config, (str, Path)) else [])]
    if to == "diffusers":
        atomic.check_dir_target(dst, "model", force=force, inputs=inputs)
    else:
        atomic.check_file_target(dst, LDM_SUFFIXES, force=force, inputs=inputs)
    vae = load_autoencoder(src, config=config, ema=ema, norm_num_groups=norm_num_groups)
    return save_diffusers(vae, dst, force=force) if to == "diffusers" else save_ldm(vae, dst)

"""The ``export`` stage: each fine-tuned model in both layouts, plus ``SHA256SUMS``.

Layout::

    OUT/<model>/diffusers/config.json
    OUT/<model>/diffusers/diffusion_pytorch_model.safetensors
    OUT/<model>/ldm/<model>.safetensors   LDM/CompVis layout (A1111, ComfyUI, original SD code)
    OUT/<model>/README.md          model card (with the eval table when given)
    OUT/SHA256SUMS                 sha256sum-compatible, every file above
    OUT/run_info.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vaeft import atomic, provenance
from vaeft.config import ExportParams
from vaeft.console import banner, console
from vaeft.model.io import load_autoencoder, save_diffusers, save_ldm
from vaeft.hashing import file_sha256

SUMS_FILE = "SHA256SUMS"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    models: dict[str, Path]

    @property
    def sums_file(self) -> Path:
        return self.out_dir / SUMS_FILE


def model_card(name: str, eval_table: str | None, fp16: dict | None = None) -> str:
    lines = [
        f"# {name}",
        "",
        "A kl-f8 autoencoder whose decoder was fine-tuned with vaeft (encoder unchanged, so the",
        "latents are those of the base model and this is a drop-in replacement).",
        "",
        "```python",
        "from diffusers import AutoencoderKL",
        f'vae = AutoencoderKL.from_pretrained("{name}/diffusers")',
        "```",
        "",
        f"`ldm/{name}.safetensors` holds the same weights in the original (CompVis/LDM) layout, for tools",
        "that load single-file VAEs.",
        "",
    ]
    if fp16 is not None:
        after = fp16.get("peaks_after") or {}
        peak = max(after.values(), default=float("nan"))
        lines += ["## float16", "",
                  f"The decoder was made fp16-safe with `vaeft train fp16`: every decoder block's peak |activation| "
                  f"is {peak:.4g} or less on {fp16.get('check_images')} eval images at {fp16.get('check_size')}px "
                  f"(fp16's max: 65504); its fp16 decode is {_db(fp16.get('psnr_fp16_vs_teacher'))} PSNR from the "
                  f"original's fp32 decode, its fp32 decode {_db(fp16.get('psnr_fp32_vs_teacher'))}.", ""]
    if eval_table:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    return "\n".join(lines)


def _db(v) -> str:
    return f"{v:.2f} dB" if isinstance(v, (int, float)) else str(v)


def write_sums(root: Path) -> Path:
    lines = [
        f"{file_sha256(p)}  {p.relative_to(root).as_posix()}"
        # The output marker is vaeft's bookkeeping, not release content.
        for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name not in (SUMS_FILE, atomic.MARKER_FILE))
    ]
    atomic.write_text(root / SUMS_FILE, "\n".join(lines) + "\n")
    return root / SUMS_FILE


def verify_sums(root: Path) -> None:
    """Raise ``ValueError`` naming the first file whose bytes do not match ``SHA256SUMS``."""
    for line in (root / SUMS_FILE).read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{path}: listed in {SUMS_FILE} but missing")
        if file_sha256(path) != digest:
            raise ValueError(f"{path}: sha256 does not match {SUMS_FILE}")


def export_models(
    params: ExportParams,
    models: dict[str, str | Path],
    out_dir: str | Path,
    eval_table: str | Path | None = None,
    *,
    force: bool = False,
) -> ExportResult:
    """``force``: replace ``out_dir`` even when it is not an export vaeft wrote."""
    if not models:
        raise ValueError("export needs at least one model (NAME=PATH)")
    out_dir = Path(out_dir)
    inputs = list(models.values())
    atomic.check_dir_target(out_dir, "export", force=force, inputs=inputs)
    banner("export", f"{', '.join(models)} -> {out_dir}")
    table = Path(eval_table).read_text(encoding="utf-8") if eval_table else None
    dtype = _DTYPES[params.dtype]
    written: dict[str, Path] = {}
    with atomic.atomic_dir(out_dir, "export", force=force, inputs=inputs) as tmp:
        for name, path in models.items():
            vae = load_autoencoder(path, dtype=dtype)
            save_diffusers(vae, tmp / name / "diffusers", marked=False)
            save_ldm(vae, tmp / name / "ldm" / f"{name}.safetensors")
            fp16 = provenance.stage_record(path, "train-fp16", "fp16")
            atomic.write_text(tmp / name / "README.md", model_card(name, table, fp16))
            written[name] = out_dir / name / "diffusers"
        # run_info names the input paths, not the release: SHA256SUMS covers the released files only.
        write_sums(tmp)
        provenance.write_run_info(tmp, "export", {"export": params}, models={k: str(v) for k, v in models.items()})
    provenance.record_run(out_dir, "export")
    for name, p in written.items():
        console.print(f"  {name}: {p}")
    return ExportResult(out_dir, written)

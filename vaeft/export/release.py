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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# Reconstruction loss terms in the order a card lists them (the other LossParams keys are options).
_LOSS_TERMS = ("l1", "mse", "oklab_l1", "oklab_mse", "lpips", "kl")


def lineage(model_dir: str | Path, limit: int = 16) -> list[dict[str, Any]]:
    """The run_info of ``model_dir``, of the model it was trained from (``init``), and so on back
    to the base: oldest first. Stops where a folder has no run_info (a model from elsewhere)."""
    chain: list[dict[str, Any]] = []
    path: Path | None = Path(model_dir)
    while path is not None and len(chain) < limit:
        try:
            info = json.loads((path / provenance.RUN_INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            break
        chain.append(info)
        path = Path(info["init"]) if info.get("init") else None
    return chain[::-1]


def _phase_params(info: dict[str, Any]) -> dict[str, Any]:
    return next((v for k, v in info.get("params", {}).items() if k.startswith("train.")), {})


def _loss_text(cfg: dict[str, Any]) -> str:
    loss = cfg.get("loss") or {}
    terms = [f"{loss[k]:g}·{'LPIPS-' + loss.get('lpips_net', 'vgg').upper() if k == 'lpips' else k.upper()}"
             for k in _LOSS_TERMS if loss.get(k)]
    gan = cfg.get("gan")
    if gan:
        terms.append(f"{gan.get('kind', 'patchgan')} GAN (weight {gan.get('disc_weight', 0):g}, "
                     f"from step {gan.get('disc_start', 0)})")
    return " + ".join(terms) + (f", {loss['reduction']}-reduced" if loss.get("reduction") == "sum" else "")


def _training_table(chain: list[dict[str, Any]]) -> list[str]:
    lines = ["| phase | steps | global batch | lr | loss | trained | weights |", "|---|---|---|---|---|---|---|"]
    for info in chain:
        if info.get("imported_from"):
            lines.append(f"| {info.get('stage', '?')} | — | — | — | — | imported `{info['imported_from']}` | — |")
            continue
        cfg = _phase_params(info)
        ema = f"EMA {cfg['ema_decay']:g}" if info.get("weights") == "ema" and cfg.get("ema_decay") else info.get("weights", "?")
        lines.append(f"| {info.get('stage', '?')} | {info.get('steps', '?')} | {info.get('global_batch', '?')} | "
                     f"{cfg.get('lr', '?')} | {_loss_text(cfg)} | {cfg.get('trainable', '?')} | {ema} |")
    return lines


def _data_lines(data_dir: Path | None) -> list[str]:
    if data_dir is None:
        return ["Not recorded (exported without `--data`)."]
    try:
        report = json.loads((data_dir / "curation_report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"Not recorded (no curation report in `{data_dir.name}`)."]
    sources = ", ".join(f"{name} ({s.get('kept', '?')} kept of {s.get('seen', '?')})"
                        for name, s in (report.get("per_source") or {}).items())
    return [f"{report.get('kept', '?')} curated images ({report.get('train', '?')} for training, "
            f"{report.get('eval', '?')} held out for evaluation), {report.get('rejected', 0)} rejected, "
            f"{report.get('duplicates', 0)} near-duplicate(s) dropped. Sources: {sources or 'not recorded'}."]


def model_card(name: str, eval_table: str | None, chain: list[dict[str, Any]] | None = None,
               data_dir: Path | None = None, fp16: dict | None = None) -> str:
    """The README of one exported model. ``chain``: :func:`lineage` of the model. A model whose
    base vaeft pretrained from scratch is the demo's: the card says so and claims no
    compatibility with any released VAE. ``fp16``: the fp16 phase's record, for its own section."""
    chain = chain or []
    base = chain[0] if chain else {}
    demo = base.get("stage") == "train-pretrain"
    decoder_only = all(_phase_params(i).get("trainable") == "decoder" for i in chain[1:]) and len(chain) > 1
    lines = [f"# {name}", ""]
    if demo:
        arch = base.get("params", {}).get("model", {}).get("architecture", {})
        lines += [
            "**A demo model.** Its base is not a released VAE: vaeft pretrained a small kl-f8-shaped",
            f"autoencoder (block channels {arch.get('block_out_channels', '?')}) from scratch for "
            f"{base.get('steps', '?')} steps on the data below,",
            "then fine-tuned its decoder. It shows the pipeline end to end; it is not a usable Stable",
            "Diffusion VAE and replaces none.",
        ]
    elif base.get("imported_from"):
        lines.append(f"A kl-f8 autoencoder fine-tuned with vaeft from `{base['imported_from']}`.")
        if decoder_only:
            lines.append("The encoder was frozen in every phase, so the latents are the base's: this decoder "
                         "can replace the base's decoder.")
    else:
        lines.append("A kl-f8 autoencoder fine-tuned with vaeft (its training history was not recorded).")
    lines += [
        "",
        "```python",
        "import vaeft  # on a CPU-only torch: torchvision's work-around (diffusers imports torchvision)",
        "from diffusers import AutoencoderKL",
        f'vae = AutoencoderKL.from_pretrained("{name}/diffusers")',
        "```",
        "",
        f"`ldm/{name}.safetensors` holds the same weights in the original (CompVis/LDM) layout, for tools",
        "that load single-file VAEs.",
        "",
    ]
    if chain:
        lines += ["## Training", "", *_training_table(chain), ""]
    lines += ["## Data", "", *_data_lines(data_dir), ""]
    if fp16 is not None:
        after = fp16.get("peaks_after") or {}
        peak = max(after.values(), default=float("nan"))
        lines += ["## float16", "",
                  f"The decoder was made fp16-safe with `vaeft train fp16`: every decoder block's peak |activation| "
                  f"is {peak:.4g} or less on {fp16.get('check_images')} eval images at {fp16.get('check_size')}px "
                  f"(fp16's max: 65504); its fp16 decode is {_db(fp16.get('psnr_fp16_vs_teacher'))} PSNR from the "
                  f"original's fp32 decode, its fp32 decode {_db(fp16.get('psnr_fp32_vs_teacher'))}.", ""]
    if eval_table:
        lines += ["## Evaluation", ""]
        if demo:
            lines += ["`original` in these tables is the demo's own base above, not the released kl-f8.", ""]
        lines += [eval_table.strip(), ""]
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
    data_dir: str | Path | None = None,
    force: bool = False,
) -> ExportResult:
    """``data_dir``: the curated data the models were trained on (its curation report goes into
    the model cards). ``force``: replace ``out_dir`` even when it is not an export vaeft wrote."""
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
            atomic.write_text(tmp / name / "README.md", model_card(name, table, lineage(path),
                                                                   Path(data_dir) if data_dir else None, fp16))
            written[name] = out_dir / name / "diffusers"
        # run_info names the input paths, not the release: SHA256SUMS covers the released files only.
        write_sums(tmp)
        provenance.write_run_info(tmp, "export", {"export": params}, models={k: str(v) for k, v in models.items()})
    provenance.record_run(out_dir, "export")
    for name, p in written.items():
        console.print(f"  {name}: {p}")
    return ExportResult(out_dir, written)

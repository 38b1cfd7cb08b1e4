"""The ``evaluate`` stage: reconstruct the eval set with each model and write the results.

Outputs: a metrics JSON keyed by model (DVC metrics), and in the report directory a markdown
table in the model cards' format, a per-image CSV and a comparison grid PNG.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vaeft import atomic, provenance
from vaeft.config import EvaluateParams
from vaeft.console import banner, console, progress
from vaeft.evaluate.evalset import PROTOCOL, eval_images
from vaeft.evaluate.metrics import mean_std, psnr
from vaeft.model.io import load_autoencoder
from vaeft.train.engine import pick_device

TABLE_FILE = "eval_table.md"
PER_IMAGE_FILE = "per_image.csv"
GRID_FILE = "comparison_grid.png"


@dataclass(frozen=True)
class EvalResult:
    metrics_file: Path
    report_dir: Path
    metrics: dict[str, dict[str, float]]


@torch.no_grad()
def reconstruct(model_path: str | Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 NHWC -> reconstructed uint8 NHWC, decoding the posterior mean (deterministic)."""
    device = pick_device()
    vae = load_autoencoder(model_path).to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample
        u8 = ((x_hat.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        out.append(u8.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if math.isfinite(mean) else "n/a"


def markdown_table(metrics: dict[str, dict[str, float]], train_steps: dict[str, int | None], protocol: str) -> str:
    lines = [
        "| Model | train steps | rFID | PSNR | SSIM | PSIM/LPIPS |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        steps = train_steps.get(name)
        lines.append(
            f"| {name} | {steps if steps is not None else '—'} | n/a | {_fmt(m['psnr_mean'], m['psnr_std'])} | n/a | n/a |"
        )
    lines.append("")
    lines.append(f"Eval set: {next(iter(metrics.values()))['n_images']} images; {protocol}. "
                 "n/a: metric not computed by this version (SSIM, LPIPS/PSIM and rFID arrive with the evaluation issue).")
    return "\n".join(lines) + "\n"


def comparison_grid(originals: np.ndarray, recons: dict[str, np.ndarray], max_rows: int = 4) -> Image.Image:
    """Rows of images; columns: the input, then each model's reconstruction. Labels on top."""
    n = min(max_rows, len(originals))
    size = originals.shape[1]
    columns = [("input", originals), *recons.items()]
    label_h = 14
    grid = Image.new("RGB", (size * len(columns), label_h + size * n), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns):
        draw.text((c * size + 2, 1), label, fill=(0, 0, 0))
        for r in range(n):
            grid.paste(Image.fromarray(images[r]), (c * size, label_h + r * size))
    return grid


def evaluate_models(
    params: EvaluateParams,
    data_dir: str | Path,
    models: dict[str, str | Path],
    metrics_file: str | Path,
    report_dir: str | Path,
    train_steps: dict[str, int | None] | None = None,
) -> EvalResult:
    if not models:
        raise ValueError("evaluate needs at least one model (NAME=PATH)")
    metrics_file, report_dir = Path(metrics_file), Path(report_dir)
    banner("evaluate", f"{len(models)} models -> {metrics_file}, {report_dir}")
    rows, originals = eval_images(data_dir, params.image_size)
    console.print(f"eval set: {len(rows)} images, {PROTOCOL.format(size=params.image_size)}")
    recons: dict[str, np.ndarray] = {}
    per_image: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, float]] = {}
    with progress() as bar:
        task = bar.add_task("evaluate", total=len(models), info="")
        for name, path in models.items():
            bar.update(task, info=name)
            recons[name] = reconstruct(path, originals, params.batch_size)
            per_image[name] = psnr(originals, recons[name])
            mean, std = mean_std(per_image[name])
            metrics[name] = {"psnr_mean": mean, "psnr_std": std, "n_images": len(rows)}
            bar.update(task, advance=1)
    atomic.write_json(metrics_file, metrics)
    with atomic.atomic_dir(report_dir) as tmp:
        atomic.write_text(tmp / TABLE_FILE, markdown_table(metrics, train_steps or {}, PROTOCOL.format(size=params.image_size)))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "location", *[f"psnr_{n}" for n in models]])
        for i, r in enumerate(rows):
            w.writerow([r.sha256[:16], r.location, *[f"{per_image[n][i]:.4f}" for n in models]])
        atomic.write_text(tmp / PER_IMAGE_FILE, buf.getvalue())
        comparison_grid(originals, recons).save(tmp / GRID_FILE)
        provenance.write_run_info(tmp, "evaluate", {"evaluate": params},
                                  models={k: str(v) for k, v in models.items()},
                                  protocol=PROTOCOL.format(size=params.image_size))
    for name, m in metrics.items():
        console.print(f"  {name:>10}: PSNR {_fmt(m['psnr_mean'], m['psnr_std'])} dB")
    return EvalResult(metrics_file, report_dir, metrics)

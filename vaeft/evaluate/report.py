"""The ``evaluate`` stage: reconstruct the eval set with each model and write the results.

Outputs: a short metrics JSON (DVC metrics): per model only the headline numbers, so that
``dvc metrics show`` stays readable; and in the report directory the detail: every summary with
its spread and the reasons a metric is unavailable (``metrics.json``), a markdown table in the
model cards' format, a per-image CSV and a comparison grid PNG.

Images are streamed in batches: each batch is read once, reconstructed and scored by every model
and dropped; only per-image scalars, running FID sums (on the device) and the few grid rows are
kept.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaeft import atomic, provenance
from vaeft.config import EvaluateParams
from vaeft.console import banner, console, progress
from vaeft.data.evalset import PROTOCOL, eval_items, iter_batches
from vaeft.device import pick_device
from vaeft.evaluate.availability import Unavailable
from vaeft.evaluate.suite import NOTES, Accumulator, MetricOptions, PairMetrics, Summary
from vaeft.figures import comparison_grid
from vaeft.metrics.fid import RunningStats
from vaeft.metrics.perceptual import PSIM_DEFINITION, PSIM_LABEL
from vaeft.metrics.summary import COLOR_SHIFT_NOTE, headline, json_safe
from vaeft.model.io import load_autoencoder

TABLE_FILE = "eval_table.md"
PER_IMAGE_FILE = "per_image.csv"
GRID_FILE = "comparison_grid.png"
DETAIL_FILE = "metrics.json"


@dataclass(frozen=True)
class EvalResult:
    metrics_file: Path
    report_dir: Path
    metrics: dict[str, dict[str, float]]  # the headline numbers, as in metrics_file
    detail: dict[str, dict]  # every summary, as in report_dir / DETAIL_FILE


def _autocast(device: torch.device, bf16: bool):
    # bf16 only on CUDA: the reconstruction is rounded to uint8 anyway, and CPU bf16 is slow.
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def reconstruct_tensor(vae, x_u8: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """uint8 N x 3 x H x W (on the model's device) -> reconstructed uint8 N x 3 x H x W there,
    decoding the posterior mean (deterministic)."""
    x = x_u8.float() / 127.5 - 1.0
    with _autocast(x.device, bf16):
        x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((x_hat.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def reconstruct_batch(vae, images: np.ndarray, device: torch.device, bf16: bool = False) -> np.ndarray:
    """uint8 NHWC -> reconstructed uint8 NHWC, decoding the posterior mean (deterministic)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    return reconstruct_tensor(vae, x, bf16).permute(0, 2, 3, 1).cpu().numpy()


def score_batch(vae, pair: PairMetrics, batch: np.ndarray | torch.Tensor, device: torch.device, bf16: bool,
                acc: Accumulator, ref_stats: RunningStats | None) -> torch.Tensor:
    """Reconstruct one uint8 batch (NHWC array, or N x 3 x H x W tensor on ``device``: upload it
    once for several models) and add its per-image metrics and Inception features to ``acc``;
    with ``ref_stats`` also the originals' features (once per eval set, not per model). Values
    stay on the device. The evaluate stage's unit of work (``bench/eval_throughput.py`` times it).
    Returns the reconstructions, uint8 N x 3 x H x W on the device."""
    x = batch if isinstance(batch, torch.Tensor) else \
        torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
    recon = reconstruct_tensor(vae, x, bf16)
    acc.add(pair.per_image_tensors(x, recon), pair.features(recon))
    if ref_stats is not None:
        f = pair.features(x)
        if f is not None:
            ref_stats.update(f)
    return recon


@torch.no_grad()
def reconstruct(model_path: str | Path, images: np.ndarray, batch_size: int, bf16: bool = False) -> np.ndarray:
    """All of ``images`` reconstructed (small sets only; the stage itself streams)."""
    device = pick_device()
    vae = load_autoencoder(model_path).to(device).eval()
    return np.concatenate([reconstruct_batch(vae, images[i : i + batch_size], device, bf16)
                           for i in range(0, len(images), batch_size)])


# ----------------------------------------------------------------------------------------- table


def _pm(values: dict, key: str, digits: int) -> str | None:
    mean, std = values.get(f"{key}_mean"), values.get(f"{key}_std")
    if mean is None or not math.isfinite(mean):
        return None
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _na(unavailable: dict[str, dict], key: str, notes: dict[str, int]) -> str:
    """``n/a [k]``: the reason goes to footnote k once, not into every cell."""
    u = unavailable.get(key)
    text = "not computed" if u is None else (f"{u['reason']}: `{u['fetch']}`" if u.get("fetch") else u["reason"])
    return f"n/a [{notes.setdefault(text, len(notes) + 1)}]"


def _cell(m: dict, key: str, digits: int, notes: dict[str, int]) -> str:
    return _pm(m, key, digits) or _na(m.get("unavailable", {}), key, notes)


def markdown_table(metrics: dict[str, dict], train_steps: dict[str, int | None], protocol: str) -> str:
    """The model cards' table (mean ± std), then a colour/perceptual detail table and notes."""
    lines = [
        "| Model | train steps | rFID | PSNR | SSIM | PSIM/LPIPS |",
        "|---|---|---|---|---|---|",
    ]
    notes: dict[str, int] = {}
    for name, m in metrics.items():
        steps = train_steps.get(name)
        rfid = f"{m['rfid']:.2f}" if isinstance(m.get("rfid"), float) else _na(m.get("unavailable", {}), "rfid", notes)
        perceptual = [f"PSIM-candidate {v}" for v in [_pm(m, PSIM_LABEL, 3)] if v]
        perceptual += [f"LPIPS-VGG {v}" for v in [_pm(m, "lpips_vgg", 3)] if v]
        perceptual += [f"LPIPS-Alex {v}" for v in [_pm(m, "lpips_alex", 3)] if v]
        if not perceptual:
            perceptual = [_na(m.get("unavailable", {}), next(
                (k for k in (PSIM_LABEL, "lpips_vgg", "lpips_alex") if k in m.get("unavailable", {})), PSIM_LABEL),
                notes)]
        lines.append(f"| {name} | {steps if steps is not None else '—'} | {rfid} | {_cell(m, 'psnr', 2, notes)} | "
                     f"{_cell(m, 'ssim', 3, notes)} | {' / '.join(perceptual)} |")
    lines += ["", "| Model | mean shift R / G / B (0-255) | saturation ratio |", "|---|---|---|"]
    for name, m in metrics.items():
        shifts = " / ".join(_pm(m, f"shift_{c}", 2) or "n/a" for c in "rgb")
        lines.append(f"| {name} | {shifts} | {_cell(m, 'saturation_ratio', 3, notes)} |")
    n = next(iter(metrics.values()))["n_images"]
    lines += ["", f"Eval set: {n} images; {protocol}. Per image, then mean ± std over images.",
              f"PSIM-candidate: {PSIM_DEFINITION}. LPIPS: the lpips package (v0.1 linear weights).",
              f"rFID: {NOTES['rfid']}."]
    if notes:
        lines += [""] + [f"[{k}] n/a: {text}" for text, k in notes.items()]
    fp16 = {name: m["fp16"] for name, m in metrics.items() if isinstance(m.get("fp16"), dict)}
    if fp16:
        lines += ["", *fp16_table(fp16)]
    return "\n".join(lines) + "\n"


def _db(v) -> str:
    return f"{v:.2f} dB" if isinstance(v, (int, float)) else str(v)


def fp16_table(fp16: dict[str, dict]) -> list[str]:
    """Per fp16-phase model: per-block peak |activation| before (the teacher) and after, at the
    phase's check size, and how close its fp16 and fp32 decodes stay to the teacher's fp32 one."""
    lines = ["### fp16 safety (`vaeft train fp16`)", "",
             "| Model | fp16 decode vs teacher fp32 (PSNR) | fp32 vs teacher fp32 (PSNR) | check | target |",
             "|---|---|---|---|---|"]
    for name, f in fp16.items():
        lines.append(f"| {name} | {_db(f.get('psnr_fp16_vs_teacher'))} | {_db(f.get('psnr_fp32_vs_teacher'))} | "
                     f"{f.get('check_images')} eval images at {f.get('check_size')}px | {f.get('target'):g} |")
    for name, f in fp16.items():
        before, after = f.get("peaks_before", {}), f.get("peaks_after", {})
        lines += ["", f"Per-block peak |activation| of {name} (fp16's max: 65504):", "",
                  "| Block | before | after | after / 65504 |", "|---|---|---|---|"]
        for block in dict.fromkeys([*before, *after]):
            b, a = before.get(block), after.get(block)
            lines.append(f"| {block} | {b:.4g} | {a:.4g} | {a / 65504:.2%} |" if b is not None and a is not None
                         else f"| {block} | {b} | {a} | |")
    return lines


# ----------------------------------------------------------------------------------------- stage


def metric_options(params: EvaluateParams) -> MetricOptions:
    return MetricOptions(lpips_nets=tuple(params.lpips_nets), psim=params.psim, fid=params.fid,
                         require_weights=params.require_weights)


def evaluate_models(
    params: EvaluateParams,
    data_dir: str | Path,
    models: dict[str, str | Path],
    metrics_file: str | Path,
    report_dir: str | Path,
    train_steps: dict[str, int | None] | None = None,
    *,
    force: bool = False,
) -> EvalResult:
    """``force``: replace ``report_dir`` (and a non-JSON ``metrics_file``) whoever wrote them."""
    if not models:
        raise ValueError("evaluate needs at least one model (NAME=PATH)")
    metrics_file, report_dir = Path(metrics_file), Path(report_dir)
    inputs = [data_dir, *models.values()]
    # Before any reconstruction: refusing after an hour of evaluation helps nobody.
    atomic.check_dir_target(report_dir, "eval-report", force=force, inputs=inputs)
    atomic.check_file_target(metrics_file, (".json",), force=force, inputs=[*inputs, report_dir])
    protocol = PROTOCOL.format(size=params.image_size)
    banner("evaluate", f"{len(models)} models -> {metrics_file}, {report_dir}")
    items = eval_items(data_dir)
    console.print(f"eval set: {len(items)} images, {protocol}")
    device = pick_device()
    pair = PairMetrics(metric_options(params), device)
    for key, u in pair.unavailable.items():
        console.print(f"  [yellow]{key}: unavailable ({u.describe()})[/]")
    ref_stats = RunningStats()
    grid_orig: list[np.ndarray] = []
    summaries: dict[str, Summary] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}
    # Every model on each batch as it is read: the images are decoded from their files and sent
    # to the device once for all models (the stage evaluates several), not once per model.
    vaes = {name: load_autoencoder(path).to(device).eval() for name, path in models.items()}
    accs = {name: Accumulator(pair.per_image_names) for name in models}
    grid_recons = {name: [] for name in models}
    with progress() as bar:
        task = bar.add_task("evaluate", total=len(models) * len(items), info="")
        seen = 0
        for _, batch in iter_batches(items, params.image_size, params.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
            keep = max(0, params.grid_rows - seen)
            for m_idx, (name, vae) in enumerate(vaes.items()):
                bar.update(task, info=name)
                recon = score_batch(vae, pair, x, device, params.bf16_autocast, accs[name],
                                    ref_stats if m_idx == 0 else None)
                if keep:
                    grid_recons[name].extend(recon[:keep].permute(0, 2, 3, 1).cpu().numpy())
                bar.update(task, advance=len(batch))
            grid_orig.extend(batch[:keep])
            seen += len(batch)
    del vaes
    for name, acc in accs.items():
        summaries[name] = acc.summary(pair, ref_stats if pair.inception is not None else None)
        per_image[name] = acc.arrays()
    detail = {name: json_safe(s.as_dict()) for name, s in summaries.items()}
    for name, path in models.items():  # the fp16 phase's record: in the report, not the headline
        if (fp16 := provenance.stage_record(path, "train-fp16", "fp16")) is not None:
            detail[name]["fp16"] = fp16
    metrics = {name: headline(d) for name, d in detail.items()}
    atomic.write_json(metrics_file, metrics)
    with atomic.atomic_dir(report_dir, "eval-report", force=force, inputs=inputs) as tmp:
        atomic.write_json(tmp / DETAIL_FILE, {"models": detail, "protocol": protocol,
                                              "notes": {**NOTES, "color_shift": COLOR_SHIFT_NOTE}})
        atomic.write_text(tmp / TABLE_FILE, markdown_table(detail, train_steps or {}, protocol))
        atomic.write_text(tmp / PER_IMAGE_FILE, _per_image_csv(items, per_image, pair.per_image_names))
        if params.grid_rows and grid_orig:
            comparison_grid(np.stack(grid_orig), {k: np.stack(v) for k, v in grid_recons.items()},
                            params.grid_rows).save(tmp / GRID_FILE)
        provenance.write_run_info(tmp, "evaluate", {"evaluate": params},
                                  models={k: str(v) for k, v in models.items()}, protocol=protocol,
                                  notes=NOTES, device=str(device),
                                  unavailable={k: Unavailable.as_dict(v) for k, v in pair.unavailable.items()})
    provenance.record_run(report_dir, "evaluate")
    for name, m in detail.items():
        console.print(f"  {name:>10}: PSNR {_pm(m, 'psnr', 2) or 'n/a'} dB, SSIM {_pm(m, 'ssim', 3) or 'n/a'}")
    return EvalResult(metrics_file, report_dir, metrics, detail)


def _per_image_csv(items, per_image: dict[str, dict[str, np.ndarray]], names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "location", *[f"{metric}_{model}" for metric in names for model in per_image]])
    for i, it in enumerate(items):
        w.writerow([it.key, it.location, *[f"{per_image[model][metric][i]:.6g}" for metric in names for model in per_image]])
    return buf.getvalue()

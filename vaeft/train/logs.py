"""Training logs: CSV rows (DVC plots), console lines, optional TensorBoard, reconstruction grids.

Only rank 0 logs. TensorBoard is used when its package is installed and silently skipped when
not (it is an optional extra, not a dependency). Grids show fixed eval images reconstructed from
the posterior mode, so consecutive grids differ only by the training, and drawing them consumes
no random numbers (resumed runs stay bit-exact).
"""

from __future__ import annotations

import csv
import io
import resource
from pathlib import Path

import numpy as np
import torch

from vaeft import atomic
from vaeft.console import console
from vaeft.data.evalset import eval_images
from vaeft.figures import comparison_grid, line_chart

# Wall-clock and memory readings: they differ between two identical runs, so they stay out of
# the CSV that DVC hashes (a plots output) and go to the run's record instead (perf_log_path).
PERF_COLUMNS = ("img_per_s", "mem_mb")


def perf_log_path(log_file: str | Path) -> Path:
    """Where the throughput/memory columns of ``log_file`` go: beside its run record, unhashed."""
    from vaeft.provenance import run_record_path

    return run_record_path(log_file).with_suffix(".perf.csv")


def log_csv(rows: list[dict[str, float]], columns: tuple[str, ...] | None = None, drop: tuple[str, ...] = ()) -> str:
    """CSV of ``rows``: every column seen (or ``step`` + ``columns``), less ``drop``."""
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields and k not in drop and (columns is None or k == "step" or k in columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def curve_path(log_file: str | Path) -> Path:
    """The PNG of the loss curves, beside the CSV (``logs/train-ema.csv`` -> ``logs/train-ema.png``)."""
    return Path(log_file).with_suffix(".png")


# The curve is an output nobody named on the command line (it follows --log): it may replace a
# PNG only if that PNG is one of ours, which this text chunk says.
_CURVE_TAG = ("Software", "vaeft training curve")


def check_curve_target(log_file: str | Path, force: bool = False, inputs: list[str | Path] = ()) -> Path:
    """Refuse (before any training) to draw the curve over a PNG that vaeft did not draw."""
    from PIL import Image

    path = atomic.check_file_target(curve_path(log_file), (".png",), force=force, inputs=inputs)
    if path.exists() and not force:
        try:
            with Image.open(path) as img:
                ours = getattr(img, "text", {}).get(_CURVE_TAG[0]) == _CURVE_TAG[1]
        except OSError:
            ours = False
        if not ours:
            raise atomic.OutputRefusedError(
                f"refusing to overwrite {path}: the loss curve of --log {log_file} goes there and this PNG "
                "is not one vaeft drew (move it, log elsewhere, or pass --force)")
    return path


def write_curve(log_file: str | Path, rows: list[dict[str, float]], phase: str) -> Path:
    """Draw every ``*loss`` column of ``rows`` over the step into :func:`curve_path`."""
    from PIL.PngImagePlugin import PngInfo

    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k == "loss" or k.endswith("_loss")]
    chart = line_chart([r["step"] for r in rows], {n: [r.get(n, float("nan")) for r in rows] for n in names},
                       f"{phase}: training loss")
    info = PngInfo()
    info.add_text(*_CURVE_TAG)
    buf = io.BytesIO()
    chart.save(buf, format="PNG", pnginfo=info)
    path = curve_path(log_file)
    atomic.write_bytes(path, buf.getvalue())
    return path


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensorboard_writer(log_file: Path | None):
    if log_file is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV + console only
        return None
    return SummaryWriter(str(log_file.with_name(log_file.stem + "-tb")))


def print_row(phase: str, row: dict[str, float], total: int | None = None, eta_s: float | None = None) -> None:
    parts = [f"{k} {v:.4g}" for k, v in row.items() if k != "step"]
    of = f"/{total}" if total else ""
    eta = f", ETA {_duration(eta_s)}" if eta_s is not None else ""
    console.print(f"[dim]{phase} step {int(row['step'])}{of}{eta}:[/] " + ", ".join(parts))


def _duration(seconds: float) -> str:
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ReconstructionGrids:
    """PNG grids of fixed eval images and their reconstructions into ``<log>-images/``."""

    def __init__(self, log_file: Path, data_dir: str | Path, size: int, count: int) -> None:
        self.dir = log_file.with_name(log_file.stem + "-images")
        self.originals = eval_images(data_dir, size)[1][:count]

    @torch.no_grad()
    def write(self, vae: torch.nn.Module, step: int, device: torch.device) -> Path:
        x = torch.from_numpy(self.originals).permute(0, 3, 1, 2).to(device).float().div(127.5).sub(1.0)
        x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        recon = ((x_hat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:09d}.png"
        comparison_grid(self.originals, {f"step {step}": np.ascontiguousarray(recon)}).save(path)
        return path

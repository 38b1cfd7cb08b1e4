"""Image-pair metrics between two folders of same-named images (no model involved)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vaeft import atomic
from vaeft.console import banner, console, progress
from vaeft.data.evalset import EvalSetError, image_files
from vaeft.device import pick_device
from vaeft.evaluate.suite import NOTES, Accumulator, MetricOptions, PairMetrics, Summary
from vaeft.metrics.fid import RunningStats
from vaeft.metrics.summary import json_float, json_safe


class PairError(EvalSetError):
    pass


@dataclass(frozen=True)
class FolderPairResult:
    names: list[str]
    summary: Summary
    per_image: dict[str, np.ndarray]


def matched_pairs(ref_dir: str | Path, test_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, ref, test) for every image name in both folders; any unmatched name is an error."""
    ref = {p.name: p for p in image_files(ref_dir)}
    test = {p.name: p for p in image_files(test_dir)}
    if not ref:
        raise PairError(f"{ref_dir}: no images")
    only_ref, only_test = sorted(ref.keys() - test.keys()), sorted(test.keys() - ref.keys())
    if only_ref or only_test:
        parts = []
        if only_ref:
            parts.append(f"only in --ref: {', '.join(only_ref[:5])}" + (" ..." if len(only_ref) > 5 else ""))
        if only_test:
            parts.append(f"only in --test: {', '.join(only_test[:5])}" + (" ..." if len(only_test) > 5 else ""))
        raise PairError(f"image names differ ({len(only_ref)} + {len(only_test)}): {'; '.join(parts)}")
    return [(n, ref[n], test[n]) for n in sorted(ref)]


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def folder_metrics(ref_dir: str | Path, test_dir: str | Path, options: MetricOptions, batch_size: int = 8) -> FolderPairResult:
    """All pair metrics between ``ref_dir`` and ``test_dir``; images of one batch must share a size."""
    pairs = matched_pairs(ref_dir, test_dir)
    metrics = PairMetrics(options, pick_device())
    acc = Accumulator(metrics.per_image_names)
    ref_stats = RunningStats()
    with progress() as bar:
        task = bar.add_task("metrics", total=len(pairs), info="")
        # Same-size runs batch together; a size change starts a new batch.
        batch: list[tuple[np.ndarray, np.ndarray]] = []

        def flush() -> None:
            if not batch:
                return
            r, t = np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])
            acc.add(metrics.per_image(r, t), metrics.features(t))
            f = metrics.features(r)
            if f is not None:
                ref_stats.update(f)
            bar.update(task, advance=len(batch))
            batch.clear()

        for name, rp, tp in pairs:
            r, t = _load(rp), _load(tp)
            if r.shape != t.shape:
                raise PairError(f"{name}: size differs, ref {r.shape[1]}x{r.shape[0]} vs test {t.shape[1]}x{t.shape[0]}")
            if batch and batch[0][0].shape != r.shape or len(batch) >= batch_size:
                flush()
            batch.append((r, t))
        flush()
    return FolderPairResult([n for n, _, _ in pairs], acc.summary(metrics, ref_stats), acc.arrays())


def write_folder_metrics(result: FolderPairResult, out: str | Path, ref_dir: str | Path, test_dir: str | Path) -> Path:
    per_image = [{"image": n, **{k: json_float(v[i]) for k, v in result.per_image.items()}}
                 for i, n in enumerate(result.names)]
    doc = {"ref": str(ref_dir), "test": str(test_dir), "metrics": json_safe(result.summary.as_dict()),
           "notes": NOTES, "per_image": per_image}
    atomic.write_json(out, doc)
    return Path(out)


def run_folder_metrics(ref_dir: Path, test_dir: Path, out: Path, options: MetricOptions, batch_size: int = 8,
                       *, force: bool = False) -> FolderPairResult:
    """``out`` is checked first: an existing file is overwritten only when it is a ``.json`` (or with ``force``)."""
    atomic.check_file_target(out, (".json",), force=force)
    banner("metrics", f"{ref_dir} vs {test_dir} -> {out}")
    result = folder_metrics(ref_dir, test_dir, options, batch_size)
    write_folder_metrics(result, out, ref_dir, test_dir)
    for k, v in result.summary.unavailable.items():
        console.print(f"  [yellow]{k}: n/a ({v.describe()})[/]")
    return result

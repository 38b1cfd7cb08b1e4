"""Evaluation: PSNR against scikit-image on real photos, and the multi-model report files."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio

from vaeft.data.evalset import resize_center_crop
from vaeft.evaluate.report import DETAIL_FILE, GRID_FILE, PER_IMAGE_FILE, TABLE_FILE, evaluate_models
from vaeft.metrics.psnr import psnr, psnr_torch
from vaeft.metrics.summary import mean_std


def _jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_psnr_matches_scikit_image(name):
    ref = getattr(skdata, name)()
    test = _jpeg(ref, quality=30)
    ours = psnr(ref, test)
    assert ours.shape == (1,)
    assert ours[0] == pytest.approx(peak_signal_noise_ratio(ref, test, data_range=255), abs=1e-4)


def test_psnr_batch_is_per_image_and_identical_is_inf():
    a = skdata.astronaut()[:64, :64]
    b = _jpeg(a, 50)
    batch = psnr(np.stack([a, a]), np.stack([b, a]))
    assert batch[0] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-4)
    assert np.isinf(batch[1])
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(a, a[:32])
    # The stage's on-device version: the same values to float rounding, inf for identical images.
    t = psnr_torch(*(torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2) for v in ([a, a], [b, a]))).numpy()
    assert t[0] == pytest.approx(batch[0], rel=1e-12) and np.isinf(t[1])
    assert mean_std(np.array([1.0, 3.0])) == (2.0, 1.0)


def test_resize_center_crop_shorter_side():
    img = Image.fromarray(skdata.chelsea())  # 451 x 300
    out = resize_center_crop(img, 64)
    assert out.size == (64, 64)


def test_evaluate_writes_metrics_table_csv_and_grid(tmp_path, curated, base_model, tiny_params, monkeypatch):
    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    result = evaluate_models(tiny_params.evaluate, curated, {"original": base_model, "again": base_model},
                             tmp_path / "metrics.json", tmp_path / "report", {"again": 6})
    short = json.loads((tmp_path / "metrics.json").read_text())
    # DVC's metrics file: the headline numbers only, flat and numeric (the reasons are the report's).
    assert set(short["original"]) == {"psnr", "ssim", "color_shift"}
    assert all(type(v) is float for m in short.values() for v in m.values())
    metrics = json.loads((tmp_path / "report" / DETAIL_FILE).read_text())["models"]
    assert set(metrics) == {"original", "again"}
    assert metrics["original"] == metrics["again"]  # same model, deterministic decode of the mean
    assert 5 < metrics["original"]["psnr_mean"] < 60 and metrics["original"]["psnr_std"] >= 0
    assert short["original"]["psnr"] == metrics["original"]["psnr_mean"]
    assert short["original"]["color_shift"] == pytest.approx(
        sum(abs(metrics["original"][f"shift_{c}_mean"]) for c in "rgb") / 3)
    n = metrics["original"]["n_images"]
    table = (tmp_path / "report" / TABLE_FILE).read_text().splitlines()
    assert table[0] == "| Model | train steps | rFID | PSNR | SSIM | PSIM/LPIPS |"
    # No LPIPS/Inception weights in the test weight store: those columns say why and how to fix.
    # Each reason is a numbered footnote, with no machine-specific path in it.
    assert table[2].startswith("| original | — | n/a [1] |") and table[2].endswith("| n/a [2] |")
    assert table[3].startswith("| again | 6 | n/a [1] |")
    text = "\n".join(table)
    assert "[1] n/a: weights 'fid-inception' not in the weight store: `vaeft weights pull fid-inception`" in text
    assert "[2] n/a: weights 'lpips-vgg' not in the weight store: `vaeft weights pull lpips-vgg`" in text
    assert str(tmp_path) not in text
    assert table[2].count("±") == 2 and "centre crop 32x32" in "\n".join(table)
    assert set(metrics["original"]["unavailable"]) == {"lpips_vgg", "lpips_alex", "psim_candidate", "rfid"}
    assert 0 < metrics["original"]["ssim_mean"] <= 1 and "saturation_ratio_mean" in metrics["original"]
    rows = list(csv.DictReader((tmp_path / "report" / PER_IMAGE_FILE).open()))
    assert len(rows) == n
    assert {"image", "location", "psnr_original", "psnr_again", "ssim_original", "shift_r_again"} <= set(rows[0])
    # Per-image CSV and summary agree.
    assert np.mean([float(r["ssim_original"]) for r in rows]) == pytest.approx(metrics["original"]["ssim_mean"], abs=1e-5)
    grid = Image.open(tmp_path / "report" / GRID_FILE)
    assert grid.size == (32 * 3, 14 + 2 * 32 * min(4, n))
    assert result.metrics == short and result.detail == metrics


def test_evaluate_needs_models(tmp_path, curated, tiny_params):
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_models(tiny_params.evaluate, curated, {}, tmp_path / "m.json", tmp_path / "r")


def test_train_steps_come_from_the_models_run_info(tmp_path, base_model):
    from vaeft.provenance import recorded_steps, write_run_info

    assert recorded_steps(base_model) == 12  # the tiny pretrain phase
    write_run_info(tmp_path, "pretrain", imported_from="weights/kl-f8")  # an imported base: no steps
    assert recorded_steps(tmp_path) is None
    assert recorded_steps(tmp_path / "nowhere") is None

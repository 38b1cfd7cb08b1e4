"""Image-pair metrics against independent references (scikit-image, scipy, lpips, torch-fidelity).

LPIPS / PSIM / FID run on RANDOM backbones written into a temporary weight store
(tests/randweights.py): those tests check plumbing and agreement with the reference code on the
same network, never the value of a real metric.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter
from skimage import color as skcolor
from skimage import data as skdata
from skimage.metrics import structural_similarity

from vaeft.compat.torchvision_cpu import ensure_torchvision
from vaeft.evaluate.suite import MetricOptions, PairMetrics, WeightsRequiredError
from vaeft.metrics import color
from vaeft.metrics.fid import RunningStats, fid_from_stats, frechet_distance, frechet_distance_low_rank
from vaeft.metrics.perceptual import BackboneWeightsError, Perceptual, normalize_features
from vaeft.metrics.ssim import ssim


def _jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius)))


def _t(arr: np.ndarray) -> torch.Tensor:
    arr = arr if arr.ndim == 4 else arr[None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)


PHOTOS = {name: getattr(skdata, name)() for name in ("astronaut", "chelsea", "coffee")}


# ----------------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("distortion", ["jpeg", "blur"])
def test_ssim_matches_scikit_image_on_photos(name, distortion):
    ref = PHOTOS[name]
    test = _jpeg(ref, 20) if distortion == "jpeg" else _blur(ref, 2.0)
    expected = structural_similarity(ref, test, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=-1, data_range=255)
    assert 0.5 < expected < 0.95  # a real distortion, not a trivial pair
    assert ssim(_t(ref), _t(test)).item() == pytest.approx(expected, abs=1e-4)
    # The float32 path (used on GPUs) agrees too.
    assert ssim(_t(ref), _t(test), dtype=torch.float32).item() == pytest.approx(expected, abs=1e-4)


def test_ssim_batches_per_image_and_rejects_bad_input():
    a = PHOTOS["astronaut"][:96, :128]
    b, c = _jpeg(a, 10), _blur(a, 3.0)
    batch = ssim(_t(np.stack([a, a, a])), _t(np.stack([a, b, c])))
    assert batch.shape == (3,) and batch[0].item() == pytest.approx(1.0, abs=1e-6)
    for i, t in ((1, b), (2, c)):
        ref = structural_similarity(a, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    channel_axis=-1, data_range=255)
        assert batch[i].item() == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(_t(a), _t(a[:64]))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(_t(a[:8, :8]), _t(a[:8, :8]))


# ----------------------------------------------------------------------------------------- colour


def test_colour_shift_and_saturation_against_scikit_image_hsv():
    ref = PHOTOS["coffee"][:64, :64]
    shifted = np.clip(ref.astype(int) + np.array([10, 0, -5]), 0, 255).astype(np.uint8)
    exact = shifted.astype(float).mean(axis=(0, 1)) - ref.astype(float).mean(axis=(0, 1))
    assert color.channel_shift(_t(ref), _t(shifted))[0].numpy() == pytest.approx(exact, abs=1e-4)
    grey = np.repeat(ref.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    washed = ((ref.astype(float) + grey) / 2).round().astype(np.uint8)  # halfway to grey: desaturated
    ratio = color.saturation_ratio(_t(ref), _t(washed))[0].item()
    expected = skcolor.rgb2hsv(washed)[..., 1].mean() / skcolor.rgb2hsv(ref)[..., 1].mean()
    assert ratio == pytest.approx(expected, rel=1e-5) and ratio < 0.8
    assert np.isnan(color.saturation_ratio(_t(grey), _t(ref))[0].item())  # grey original: undefined


# ----------------------------------------------------------------------------------------- Fréchet


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Diagonal, then the same eigenbasis rotated: tr((S1 S2)^1/2) = sum sqrt(d1 d2) exactly.
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(closed, rel=1e-10)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_general_case_against_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 32
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:-1], s2)


def test_low_rank_path_equals_full_frechet_distance():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(5, 16)), rng.normal(size=(7, 16)) * 2 + 0.5
    full = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert frechet_distance_low_rank(f1, f2) == pytest.approx(full, rel=1e-7)
    a, b = RunningStats(), RunningStats()
    a.update(f1[:2])
    a.update(f1[2:])
    b.update(f2)
    assert fid_from_stats(a, b) == pytest.approx(full, rel=1e-7)
    many = rng.normal(size=(40, 16))  # more rows than dimensions: the covariance path
    c = RunningStats()
    c.update(many)
    assert c.rows is None
    expected = frechet_distance(many.mean(0), np.cov(many, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert fid_from_stats(c, b) == pytest.approx(expected, rel=1e-7)


def test_running_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 8)) * 3 + 1
    stats = RunningStats()
    for i in range(0, 50, 7):
        stats.update(feats[i : i + 7])
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- weights


def test_missing_weights_make_metrics_unavailable_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path))
    metrics = PairMetrics(MetricOptions())
    assert set(metrics.unavailable) == {"lpips_vgg", "lpips_alex", "psim_candidate", "rfid"}
    assert metrics.unavailable["lpips_vgg"].fetch == "vaeft weights pull lpips-vgg"
    assert metrics.unavailable["rfid"].fetch == "vaeft weights pull fid-inception"
    # Reports are versioned outputs: the reason names the weights, not this machine's path.
    assert metrics.unavailable["lpips_alex"].reason == "weights 'lpips-alex' not in the weight store"
    a = PHOTOS["astronaut"][:64, :64]
    out = metrics.per_image(a[None], _jpeg(a, 30)[None])
    assert set(out) == {"psnr", "ssim", "shift_r", "shift_g", "shift_b", "saturation_ratio"}
    assert metrics.features(a[None]) is None
    with pytest.raises(WeightsRequiredError, match="vaeft weights pull"):
        PairMetrics(MetricOptions(require_weights=True))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_backbone_loaded_from_store_matches_the_lpips_package(random_weights, net):
    ensure_torchvision()
    import lpips

    path = random_weights / f"torchvision/{'vgg16-397923af' if net == 'vgg' else 'alexnet-owt-7be5be79'}.pth"
    state = torch.load(path, weights_only=True)
    ours = Perceptual(net, path)
    # Every backbone tensor came from the file (slice k holds torchvision features.{i}).
    loaded = dict(ours.model.net.named_parameters())
    assert len(loaded) == len(state)
    for key, value in loaded.items():
        assert torch.equal(value, state[f"features.{key.split('.', 1)[1]}"]), key
    a = PHOTOS["chelsea"][:64, :64]
    ref, test = np.stack([a, a]), np.stack([_jpeg(a, 10), a])
    res = ours(_t(ref), _t(test))
    # The lpips package's own forward on the same network is the oracle.
    expected = ours.model(_t(ref).float() / 127.5 - 1, _t(test).float() / 127.5 - 1).flatten()
    torch.testing.assert_close(res.lpips, expected, rtol=1e-5, atol=1e-7)
    assert res.lpips[0] > 0 and res.lpips[1] == 0
    if net == "vgg":
        baseline = lpips.LPIPS(net="vgg", lpips=False, pnet_rand=True, verbose=False)
        baseline.net.load_state_dict(ours.model.net.state_dict())
        expected_psim = baseline(_t(ref).float() / 127.5 - 1, _t(test).float() / 127.5 - 1).flatten()
        torch.testing.assert_close(res.psim_candidate, expected_psim, rtol=1e-5, atol=1e-7)
    else:
        assert res.psim_candidate is None


def test_feature_normalisation_is_finite_for_zero_features():
    f = torch.zeros(1, 4, 2, 2, requires_grad=True)
    out = normalize_features(f)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(f.grad).all()


def test_wrong_backbone_file_is_refused(random_weights, tmp_path):
    wrong = tmp_path / "vgg.pth"
    torch.save(torch.load(random_weights / "torchvision/alexnet-owt-7be5be79.pth", weights_only=True), wrong)
    with pytest.raises(BackboneWeightsError, match="not a torchvision vgg16"):
        Perceptual("vgg", wrong)


def test_rfid_streaming_matches_torch_fidelity(random_weights, tmp_path):
    ensure_torchvision()
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    from vaeft.evaluate.pairs import folder_metrics

    ref_dir, test_dir = tmp_path / "ref", tmp_path / "test"
    ref_dir.mkdir()
    test_dir.mkdir()
    photos = [PHOTOS[n][:64, :64] for n in ("astronaut", "coffee")] + [PHOTOS[n][-64:, -64:] for n in ("astronaut", "coffee")]
    for i, p in enumerate(photos):
        Image.fromarray(p).save(ref_dir / f"{i}.png")
        Image.fromarray(_blur(p, 1.5)).save(test_dir / f"{i}.png")
    weights = random_weights / "torch-fidelity/weights-inception-2015-12-05-6726825d.pth"
    # torch-fidelity's own pipeline (folder loading, TF-style resize, extractor) is the oracle for
    # the features; the distance function is checked separately against closed forms and sqrtm
    # (its 2048x2048 eigendecomposition takes ~30 s on this CPU, so it is not repeated here).
    extractor = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                         feature_extractor_weights_path=str(weights), verbose=False)
    feats = {}
    for i in (1, 2):
        feats[i] = extract_featuresdict_from_input_id(
            i, extractor, input1=str(ref_dir), input2=str(test_dir), cuda=False, save_cpu_ram=True,
            batch_size=4, verbose=False)["2048"].double().numpy()
    expected = frechet_distance_low_rank(feats[1], feats[2])
    import os

    os.environ["VAEFT_WEIGHTS_DIR"] = str(random_weights)
    try:
        result = folder_metrics(ref_dir, test_dir, MetricOptions(lpips_nets=(), psim=False), batch_size=3)
    finally:
        del os.environ["VAEFT_WEIGHTS_DIR"]
    assert expected > 1.0  # Kaiming re-init: not the degenerate ~0 of a default-initialised network
    assert result.summary.values["rfid"] == pytest.approx(expected, rel=1e-3)
    assert result.summary.values["n_images"] == 4 and "rfid" not in result.summary.unavailable

"""Loss terms on fixed tensors: golden values from hand arithmetic or independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from vaeft.config import LossParams
from vaeft.losses import oklab, pixel
from vaeft.losses.reconstruction import ReconstructionLoss
from vaeft.losses.reduction import nll
from vaeft.weights import MissingWeightsError

from .randweights import write_random_backbone


def test_pixel_terms_golden():
    x = torch.tensor([0.0, 0.5, -1.0])
    y = torch.tensor([1.0, 0.0, -0.5])
    assert pixel.l1(x, y).tolist() == [1.0, 0.5, 0.5]
    assert pixel.mse(x, y).tolist() == [1.0, 0.25, 0.25]


@pytest.mark.parametrize("rgb01, lab", [
    # Ottosson's published reference values (bottosson.github.io/posts/oklab, sRGB primaries).
    ((1.0, 1.0, 1.0), (1.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (0.62795536, 0.22486306, 0.12584630)),
    ((0.0, 1.0, 0.0), (0.86643961, -0.23388757, 0.17949847)),
    ((0.0, 0.0, 1.0), (0.45201371, -0.03245698, -0.31152815)),
])
def test_oklab_reference_colours(rgb01, lab):
    x = (torch.tensor(rgb01, dtype=torch.float64).view(1, 3, 1, 1) * 2 - 1)
    got = oklab.model_to_oklab(x).flatten().tolist()
    assert got == pytest.approx(lab, abs=2e-4)


def test_srgb_transfer_golden():
    # 0.5 sRGB -> ((0.5 + 0.055) / 1.055) ** 2.4 = 0.21404...; below the knee it is linear / 12.92.
    v = oklab.srgb_to_linear(torch.tensor([0.5, 0.04]))
    assert v[0].item() == pytest.approx(((0.5 + 0.055) / 1.055) ** 2.4, rel=1e-6)
    assert v[1].item() == pytest.approx(0.04 / 12.92, rel=1e-6)


def test_oklab_terms_are_differentiable_at_black():
    x = torch.full((1, 3, 2, 2), -1.0)  # exact black: the cube root's gradient would be infinite
    x_hat = x.clone().requires_grad_(True)
    (oklab.oklab_l1(x, x_hat + 0.1).mean() + oklab.oklab_mse(x, x_hat).mean()).backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    # White vs black: |ΔL| = 1 in Oklab, a and b equal: mean over 3 channels = 1/3.
    white = torch.ones(1, 3, 1, 1)
    assert oklab.oklab_l1(x[:, :, :1, :1], white).mean().item() == pytest.approx(1 / 3, abs=1e-4)


def test_ldm_reduction_golden():
    rec = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 1, 1, 2)
    lv = torch.tensor(0.5)
    per = [r / math.exp(0.5) + 0.5 for r in (1, 2, 3, 4)]
    assert nll(rec, lv, "sum").item() == pytest.approx(sum(per) / 2, rel=1e-6)
    assert nll(rec, lv, "mean").item() == pytest.approx(sum(per) / 4, rel=1e-6)
    assert nll(rec, torch.tensor(0.0), "sum").item() == pytest.approx(5.0)  # LDM default: logvar 0


def test_reconstruction_mean_matches_weighted_term_means():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    total, logs = ReconstructionLoss(LossParams(l1=1.0, mse=0.5))(x, y)
    expected = (x - y).abs().mean() + 0.5 * (x - y).square().mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total, _ = ReconstructionLoss(LossParams(l1=1.0, reduction="sum"))(x, y)
    assert total.item() == pytest.approx((x - y).abs().sum().item() / 2, rel=1e-6)


def test_learned_logvar_gets_gradient():
    loss = ReconstructionLoss(LossParams(l1=1.0, learn_logvar=True, logvar_init=0.25))
    total, _ = loss(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2))
    total.backward()
    # rec = 1 everywhere: d/dlv mean(1 / e^lv + lv) = 1 - e^-lv
    assert loss.logvar.grad.item() == pytest.approx(1 - math.exp(-0.25), rel=1e-5)


def test_lpips_without_weights_names_the_fetch_command(tmp_path, monkeypatch):
    from vaeft.losses.lpips import load_lpips_loss

    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="vaeft weights pull lpips-vgg"):
        load_lpips_loss("vgg")


def test_lpips_term_gives_the_decoder_a_gradient(tmp_path, monkeypatch):
    """Plumbing only (random backbone): LPIPS alone must move the decoder, unlike peers' no_grad LPIPS."""
    from vaeft.config import ArchitectureParams
    from vaeft.losses.lpips import load_lpips_loss
    from vaeft.model.build import build_autoencoder

    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(tmp_path))
    write_random_backbone(tmp_path, "lpips-alex")
    lp = load_lpips_loss("alex")
    assert not any(p.requires_grad for p in lp.parameters())
    torch.manual_seed(0)
    vae = build_autoencoder(ArchitectureParams(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample
    loss_fn = ReconstructionLoss(LossParams(lpips=1.0, lpips_net="alex"), lp)
    total, logs = loss_fn(x, x_hat)
    assert set(logs) >= {"lpips", "loss"}
    total.backward()
    grad = vae.decoder.conv_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    # Per image, broadcast over C x H x W (LDM): "mean" of the broadcast equals the mean of per-image values.
    assert total.item() == pytest.approx(lp(x, x_hat).mean().item(), rel=1e-5)


def test_lpips_bf16_backbone_matches_fp32(random_weights, monkeypatch):
    """bf16 phases run LPIPS-VGG's convs in bf16 (fp32 scaling, normalisation and distance).
    Against the all-fp32 loss on the same pairs (CPU autocast; random backbone, the lpips
    package's linear heads; measured 0.1%): per-image values within 1% and the gradient at x̂ with cosine >= 0.99."""
    from vaeft.losses.lpips import load_lpips_loss

    monkeypatch.setenv("VAEFT_WEIGHTS_DIR", str(random_weights))
    normal = torch.nn.init.normal_
    with monkeypatch.context() as m:
        # torchvision's VGG16 classifier, which lpips drops, need not be initialised (seconds).
        m.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
        m.setattr(torch.nn.init, "normal_", lambda t, *a, **k: t if t.dim() == 2 else normal(t, *a, **k))
        lp = load_lpips_loss("vgg", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 6, 16), torch.linspace(0, 6, 16), indexing="ij")
    x = torch.stack([torch.sin(xx + k) * torch.cos(yy * (k + 1)) for k in range(3)])[None].repeat(2, 1, 1, 1) * 0.8
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    values, grads = [], []
    for dtype in (None, torch.bfloat16):
        lp.backbone_dtype = dtype
        xh = x_hat.clone().requires_grad_(True)
        v = lp(x, xh).flatten()
        v.sum().backward()
        values.append(v.detach())
        grads.append(xh.grad.flatten())
    assert values[1].dtype == torch.float32
    assert torch.allclose(values[1], values[0], rtol=0.01, atol=0), (values[0], values[1])
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) >= 0.99

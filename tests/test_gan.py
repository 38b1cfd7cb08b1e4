"""Adversarial terms: golden losses, adaptive weight vs explicit autograd, D really steps, guards, engine."""

from __future__ import annotations

import pytest
import torch

from vaeft.config import GanParams, ParamsError, parse_params
from vaeft.losses.adversarial import adaptive_weight, generator_loss, gradient_penalty, hinge_d_loss, wgan_d_loss
from vaeft.losses.discriminator import DiscriminatorBatchError, NLayerDiscriminator
from vaeft.train.gan import GanTrainer

from .conftest import tiny_params_dict


def test_hinge_and_wgan_golden():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(0.5), relu(-1)) + mean(relu(-1), relu(1.5))) = 0.5 * (0.25 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert wgan_d_loss(real, fake).item() == pytest.approx(-0.75 - 1.25)
    assert generator_loss(fake).item() == pytest.approx(0.75)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # D(x) = sum(w * x): gradient w, norm 5 everywhere
    critic = lambda x: (x * w).sum(dim=(1, 2, 3))  # noqa: E731
    gp = gradient_penalty(critic, torch.zeros(3, 2, 1, 1), torch.ones(3, 2, 1, 1))
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)


def test_adaptive_weight_matches_explicit_autograd():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(2, 3, 1)
    inp = torch.randn(2, 2, 4, 4)
    out = layer(inp)
    nll = out.square().sum()
    g = -(out * torch.randn_like(out)).mean()
    got = adaptive_weight(nll, g, layer.weight, disc_weight=0.5)
    layer.weight.grad = None
    nll.backward(retain_graph=True)
    gn = layer.weight.grad.clone()
    layer.weight.grad = None
    g.backward()
    expected = 0.5 * min(max(gn.norm().item() / (layer.weight.grad.norm().item() + 1e-4), 0.0), 1e4)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert not got.requires_grad


def test_adaptive_weight_is_clamped():
    p = torch.nn.Parameter(torch.ones(2))
    nll, g = (p * 1e6).sum(), (p * 0.0).sum()  # ‖∇g‖ = 0: the ratio is 1e6·√2 / 1e-4, clamped
    assert adaptive_weight(nll, g, p, 1.0).item() == pytest.approx(1e4)


@pytest.mark.parametrize("kind", ["patchgan", "wgan-gp"])
def test_discriminator_is_stepped(kind):
    torch.manual_seed(0)
    gan = GanTrainer(GanParams(kind=kind, ndf=8, n_layers=2), 1e-3, (0.5, 0.9), torch.device("cpu"), seed=0)
    before = {k: v.clone() for k, v in gan.disc.state_dict().items()}
    x, x_hat = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs = gan.discriminator_loss(x, x_hat, step=0)
    assert ("gp" in logs) == (kind == "wgan-gp")
    loss.backward()
    gan.opt.step()
    after = gan.disc.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "weight" in k)


def test_disc_start_gates_both_terms():
    gan = GanTrainer(GanParams(ndf=8, n_layers=2, disc_start=5), 1e-3, (0.5, 0.9), torch.device("cpu"), seed=0)
    assert not gan.active(4) and gan.active(5)
    loss, _ = gan.discriminator_loss(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), step=4)
    assert loss.item() == 0.0


def test_batchnorm_patchgan_refuses_batch_one():
    with pytest.raises(DiscriminatorBatchError, match="at least 2 images"):
        NLayerDiscriminator(ndf=8, n_layers=2, norm="batch")(torch.zeros(1, 3, 32, 32))
    NLayerDiscriminator(ndf=8, n_layers=2, norm="layer")(torch.zeros(1, 3, 32, 32))  # the critic is per sample
    raw = tiny_params_dict()
    raw["train"]["ema"].update(batch_size=1, gan={"kind": "patchgan"})
    with pytest.raises(ParamsError, match="batch_size >= 2"):
        parse_params(raw)


def test_engine_gan_accumulate_bf16_logs_and_grids(tmp_path, curated, base_model):
    from vaeft.train.engine import train_phase

    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=2, batch_size=2, accumulate=2, precision="bf16", log_every=1, image_every=2,
                               gan={"kind": "patchgan", "ndf": 8, "n_layers": 2})
    log = tmp_path / "log.csv"
    result = train_phase("ema", parse_params(raw), curated, tmp_path / "out", init=base_model, log_file=log,
                         state_root=tmp_path / "state")
    header = log.read_text().splitlines()[0].split(",")
    assert {"l1", "g_loss", "d_weight", "d_loss", "grad_norm", "lr"} <= set(header)
    # Timings vary run to run: not in the CSV that DVC hashes, but kept beside the run record.
    assert not {"img_per_s", "mem_mb"} & set(header)
    from vaeft.train.logs import perf_log_path

    perf = perf_log_path(log).read_text().splitlines()
    assert perf[0] == "step,img_per_s,mem_mb" and len(perf) == 3
    assert (tmp_path / "log-images" / "step-000000002.png").is_file()
    assert result.skipped_steps == 0

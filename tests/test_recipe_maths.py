"""The released recipe's maths against LDM's, written out here: no gradient clip, D's Adam before
disc_start. (The EMA warm-up's golden decays are in test_train.py.)"""

from __future__ import annotations

import copy

import torch

from vaeft.config import GanParams, LossParams, load_params
from vaeft.losses.reconstruction import ReconstructionLoss
from vaeft.model.io import load_autoencoder
from vaeft.train.gan import GanTrainer
from vaeft.train.step import LAST_LAYER, TrainStep

from .conftest import REPO_ROOT

SEED = 0


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(n)]


def _ldm_steps(vae, disc, cfg, batches) -> torch.optim.Adam:
    """LDM's LPIPSWithDiscriminator + Adam, without a clip (lpips 0, logvar 0): nll = sum|x - x̂| / B,
    g = -mean D(x̂), d_weight = disc_weight * clamp(|∇nll| / (|∇g| + 1e-4), 0, 1e4) at conv_out,
    loss = nll + d_weight * g; D: hinge loss on (x, x̂) (x̂ from the same forward, as vaeft)."""
    named = {n: p for n, p in vae.named_parameters() if p.requires_grad}
    last = named[LAST_LAYER]
    opt = torch.optim.Adam(named.values(), lr=cfg.lr, betas=cfg.betas)
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    noise = torch.Generator().manual_seed(SEED + 1)
    for batch in batches:
        x = batch.float() / 127.5 - 1.0
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample(generator=noise)).sample
        nll = (x - x_hat).abs().sum() / x.shape[0]
        disc.requires_grad_(False)
        g = -disc(x_hat).mean()
        disc.requires_grad_(True)
        (nll_grad,) = torch.autograd.grad(nll, last, retain_graph=True)
        (g_grad,) = torch.autograd.grad(g, last, retain_graph=True)
        d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * cfg.gan.disc_weight
        opt.zero_grad()
        (nll + d_weight * g).backward()
        opt.step()
        d_opt.zero_grad()
        real, fake = disc(x), disc(x_hat.detach())
        (0.5 * (torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())).backward()
        d_opt.step()
    return opt


def _vaeft_steps(cfg, base_model, batches):
    torch.manual_seed(SEED)
    vae = load_autoencoder(base_model)
    runner = TrainStep(cfg, vae, ReconstructionLoss(cfg.loss), torch.device("cpu"), SEED)
    start = (copy.deepcopy(runner.vae), copy.deepcopy(runner.gan.disc))
    it = iter(batches)
    norms = [runner(step, it).grad_norm.item() for step in range(len(batches))]
    return runner, start, norms


def _moments(opt: torch.optim.Adam, params) -> torch.Tensor:
    """Adam's first and second moments, which hold the gradients it was given (scaled, if clipped)."""
    return torch.cat([torch.cat([opt.state[p]["exp_avg"].flatten(), opt.state[p]["exp_avg_sq"].flatten().sqrt()])
                      for p in params]).double()


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum((a[k].detach() - b[k].detach()).double().square().sum() for k in a).sqrt().item()


def test_ldm_recipes_do_not_clip_and_update_as_ldm(base_model):
    for name in ("sd-vae-ft", "sdxl"):
        recipe = load_params(REPO_ROOT / "vaeft" / "recipes" / f"{name}.yaml")
        assert recipe.train.ema.grad_clip is None and recipe.train.mse.grad_clip is None, name
    recipe = load_params(REPO_ROOT / "vaeft" / "recipes" / "sd-vae-ft.yaml").train.ema
    # The recipe's phase at toy scale: its optimizer, reduction, GAN and clip; LPIPS off (no
    # backbone here), fp32 so the reference can be plain float32 autograd.
    cfg = recipe.model_copy(update={
        "batch_size": 2, "precision": "fp32", "num_workers": 0,
        "loss": LossParams(l1=1.0, reduction="sum"),
        "gan": recipe.gan.model_copy(update={"ndf": 8, "n_layers": 2}),
    })
    batches = _batches(2)
    runner, (ref_vae, ref_disc), norms = _vaeft_steps(cfg, base_model, batches)
    assert min(norms) > 10.0  # a clip at 1.0 would have rescaled both updates
    ref_opt = _ldm_steps(ref_vae, ref_disc, cfg, batches)
    ref_named = dict(ref_vae.named_parameters())
    expected = _moments(ref_opt, [ref_named[n] for n in runner.named])
    clipped, _, _ = _vaeft_steps(cfg.model_copy(update={"grad_clip": 1.0}), base_model, batches)

    def off(r) -> float:
        return ((_moments(r.opt, r.named.values()) - expected).norm() / expected.norm()).item()

    # Float32 rounding only (the two sum the same terms in a different order) ...
    assert off(runner) < 1e-4, off(runner)
    # ... where the clip, at LDM's gradient norms, gives Adam gradients thousands of times smaller.
    assert off(clipped) > 0.9, off(clipped)
    # The weights after two steps: Adam's sign-like first step turns rounding in near-zero
    # gradients into whole-lr differences on a few elements, so the bound is looser than the moments'.
    got = {n: p for n, p in runner.named.items()}
    want = {n: ref_named[n] for n in runner.named}
    assert _distance(got, want) < 0.5 * _distance(clipped.named, want)


def test_disc_adam_catches_up_with_ldm_zero_loss_steps():
    """Before disc_start LDM steps D's Adam on factor 0 * loss; vaeft runs no D step until then and
    gives Adam the same counter at its first step, so D's first update equals LDM's (and is not a
    fresh Adam's)."""
    disc_start = 5
    torch.manual_seed(0)
    gan = GanTrainer(GanParams(ndf=8, n_layers=2, disc_start=disc_start), 1e-3, (0.5, 0.9),
                     torch.device("cpu"), seed=0, adam_kwargs={"foreach": False})
    ldm_disc, fresh_disc = copy.deepcopy(gan.disc), copy.deepcopy(gan.disc)
    x, x_hat = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    def ldm_step(disc, opt, factor):
        opt.zero_grad()
        (factor * 0.5 * (torch.relu(1.0 - disc(x)).mean() + torch.relu(1.0 + disc(x_hat)).mean())).backward()
        opt.step()

    ldm_opt = torch.optim.Adam(ldm_disc.parameters(), lr=1e-3, betas=(0.5, 0.9), foreach=False)
    for _ in range(disc_start):
        ldm_step(ldm_disc, ldm_opt, 0.0)
    ldm_step(ldm_disc, ldm_opt, 1.0)
    fresh_opt = torch.optim.Adam(fresh_disc.parameters(), lr=1e-3, betas=(0.5, 0.9), foreach=False)
    ldm_step(fresh_disc, fresh_opt, 1.0)

    before = {k: v.clone() for k, v in gan.disc.state_dict().items()}
    for step in range(disc_start):  # what the engine does before disc_start: nothing on D's side
        assert not gan.active(step)
    assert all(torch.equal(before[k], v) for k, v in gan.disc.state_dict().items()) and not gan.opt.state
    gan.opt.zero_grad()
    loss, _ = gan.discriminator_loss(x, x_hat, disc_start)
    loss.backward()
    gan.catch_up(disc_start)
    gan.opt.step()
    assert next(iter(gan.opt.state.values()))["step"].item() == disc_start + 1
    ldm, fresh, ours = ldm_disc.state_dict(), fresh_disc.state_dict(), gan.disc.state_dict()
    weights = [k for k in ours if k.endswith("weight")]
    assert all(torch.allclose(ours[k], ldm[k], rtol=0, atol=1e-7) for k in weights)
    assert any((ours[k] - fresh[k]).abs().max() > 1e-5 for k in weights)  # the catch-up matters
    gan.catch_up(disc_start + 1)  # a stepped (or resumed) Adam keeps its own counter
    assert next(iter(gan.opt.state.values()))["step"].item() == disc_start + 1

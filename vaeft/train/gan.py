"""The discriminator side of a phase: D, its own optimizer, and the G / D adversarial terms.

Per optimizer step the generator gets g = -mean D(x̂) weighted by the adaptive weight (either
as a loss term, :meth:`GanTrainer.generator_term`, or as its gradient at x̂,
:meth:`GanTrainer.generator_grad_at_output`, which saves a second LPIPS and D backward), and D
takes its own step on (x, x̂.detach()) from the same forward pass (LDM recomputes x̂ with the
updated G for its D step; reusing it saves a decoder forward and changes D's input by one
generator step). Both terms are gated by ``disc_start``. While the generator term is computed,
D's parameters do not require grad, so G's backward leaves D's gradients alone.

D between phases: a phase with a GAN leaves D beside its model, in the output folder
(``discriminator.safetensors``, weights and BatchNorm statistics; ``discriminator-adam.pt``, its
Adam state). A later phase with ``gan.init: from-base`` whose ``--init`` is that folder starts from
both, as a resumed run would (LDM's ft-MSE resumed ft-EMA's full checkpoint); an LDM training
checkpoint as ``--init`` gives D from its ``loss.discriminator.*`` (Adam starts fresh: the
released files keep D's moments in Lightning's ``optimizer_states``, whose order vaeft does not
rely on).

Before ``disc_start`` LDM still steps D's Adam on a zero loss (factor 0). A zero gradient leaves
D's weights and Adam's moments exactly as they were (all zero before the first real step), and
only advances Adam's step counter, which sets the bias correction of D's first updates: with
beta2 0.9 and the counter at 50,001, LDM's first D update is ~1.6x as large as a fresh Adam's.
vaeft runs no D forward/backward before ``disc_start`` (it would cost D's compute for nothing)
and, at D's first step, starts Adam's counter at the number of zero-loss steps LDM would have
taken (:meth:`GanTrainer.catch_up`), so D's updates are LDM's. (LDM's zero-loss forwards also
move BatchNorm's running statistics; D always runs in train mode, so they are never used, and
ranks do not average them either.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaeft.config import GanParams
from vaeft.errors import VaeftError
from vaeft.losses.adversarial import (
    adaptive_weight,
    adaptive_weight_at_output,
    disc_factor,
    generator_loss,
    gradient_penalty,
    hinge_d_loss,
    wgan_d_loss,
)
from vaeft.losses.discriminator import NLayerDiscriminator
from vaeft.model.io import ModelLoadError, is_diffusers_folder, save_safetensors, weight_file
from vaeft.model.state_files import extract_discriminator_state, read_tensors

DISC_FILE = "discriminator.safetensors"
DISC_ADAM_FILE = "discriminator-adam.pt"


class DiscriminatorInitError(VaeftError, ValueError):
    pass


def base_discriminator(init: str | Path | None) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """D's tensors, its Adam state (or None) and where they came from, for ``gan.init: from-base``."""
    if init is None:
        raise DiscriminatorInitError("gan.init is from-base but the phase has no base model (--init)")
    init = Path(init)
    if init.is_dir() and (init / DISC_FILE).is_file():
        state = read_tensors(init / DISC_FILE)
        adam = None
        if (init / DISC_ADAM_FILE).is_file():
            adam = torch.load(init / DISC_ADAM_FILE, map_location="cpu", weights_only=True)
        return state, adam, str(init / DISC_FILE)
    source = weight_file(init) if not is_diffusers_folder(init) else None
    state = extract_discriminator_state(read_tensors(source)) if source is not None else {}
    if not state:
        raise DiscriminatorInitError(
            f"gan.init is from-base but {init} holds no discriminator (looked for {DISC_FILE} in a model "
            f"folder a GAN phase wrote, and loss.discriminator.* in an LDM training checkpoint); "
            f"set gan.init: fresh to start D from scratch")
    return state, None, str(source)


class GanTrainer:
    def __init__(self, cfg: GanParams, g_lr: float, g_betas: tuple[float, float], device: torch.device,
                 seed: int, in_channels: int = 3, adam_kwargs: dict | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.disc = NLayerDiscriminator(in_channels, cfg.ndf, cfg.n_layers, cfg.norm).to(device).train()
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr or g_lr, betas=cfg.betas or g_betas,
                                    **(adam_kwargs or {}))
        # The gradient penalty's interpolation points: its own stream on the device, checkpointed
        # for exact resume; one stream for all ranks, each taking its slice of the global batch.
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.rank, self.world_size = rank, world_size

    def active(self, step: int) -> bool:
        return disc_factor(step, self.cfg.disc_start, self.cfg.disc_factor) > 0

    def catch_up(self, step: int) -> None:
        """Call before D's optimizer steps at ``step``: an Adam that has not stepped yet gets the
        state LDM's ``step`` zero-loss steps leave (moments zero, counter ``step``)."""
        if step == 0:
            return
        for group in self.opt.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                if self.opt.state.get(p):
                    continue
                # The counter's dtype and device as torch.optim.Adam creates it.
                dtype = torch.float32 if group.get("fused") or torch.get_default_dtype() != torch.float64 \
                    else torch.float64
                self.opt.state[p] = {
                    "step": torch.tensor(float(step), dtype=dtype, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    def _generator_loss(self, x_hat: torch.Tensor) -> torch.Tensor:
        # D is frozen for G's term: its weights get no gradient from the generator's loss.
        self.disc.requires_grad_(False)
        try:
            return generator_loss(self.disc(x_hat))
        finally:
            self.disc.requires_grad_(True)

    def generator_term(self, x_hat: torch.Tensor, nll: torch.Tensor, last_layer: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        factor = disc_factor(step, self.cfg.disc_start, self.cfg.disc_factor)
        g = self._generator_loss(x_hat)
        if self.cfg.adaptive_weight:
            d_weight = adaptive_weight(nll, g, last_layer, self.cfg.disc_weight)
        else:
            d_weight = torch.tensor(self.cfg.disc_weight, device=g.device)
        return d_weight * factor * g, {"g_loss": g.detach(), "d_weight": d_weight}

    def generator_grad_at_output(self, x_hat: torch.Tensor, nll: torch.Tensor, last_layer: torch.Tensor,
                                 step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The same term as :meth:`generator_term`, for a caller that back-propagates from x̂.

        Returns (∂(nll + term)/∂x̂, the term's value, logs). ``x_hat`` must be the decoder's output
        as produced by ``last_layer`` (a dtype cast of it is fine). LDM's way takes the adaptive
        weight's gradients at the last layer and then back-propagates nll + term again from the
        loss: LPIPS and D each go backward twice. Here each goes backward once, to x̂; the two
        gradients there give the last layer's weight gradients (one small conv each) and, combined,
        the gradient the decoder needs. Same maths, up to float summation order.
        """
        factor = disc_factor(step, self.cfg.disc_start, self.cfg.disc_factor)
        g = self._generator_loss(x_hat)
        (nll_grad,) = torch.autograd.grad(nll, x_hat)
        (g_grad,) = torch.autograd.grad(g, x_hat)
        if self.cfg.adaptive_weight:
            d_weight = adaptive_weight_at_output(nll_grad, g_grad, x_hat, last_layer, self.cfg.disc_weight)
        else:
            d_weight = torch.tensor(self.cfg.disc_weight, device=g.device)
        weight = d_weight * factor
        return nll_grad + weight * g_grad, weight * g.detach(), {"g_loss": g.detach(), "d_weight": d_weight}

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, step: int
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        factor = disc_factor(step, self.cfg.disc_start, self.cfg.disc_factor)
        real, fake = x.detach(), x_hat.detach()
        logits_real, logits_fake = self.disc(real), self.disc(fake)
        logs = {"logits_real": logits_real.detach().float().mean(), "logits_fake": logits_fake.detach().float().mean()}
        if self.cfg.kind == "patchgan":
            loss = hinge_d_loss(logits_real, logits_fake)
        else:
            loss = wgan_d_loss(logits_real, logits_fake)
            gp = gradient_penalty(self.disc, real, fake, self.rng, self.rank, self.world_size)
            logs["gp"] = gp.detach()
            loss = loss + self.cfg.gp_weight * gp
        logs["d_loss"] = loss.detach()
        return factor * loss, logs

    def load_base(self, init: str | Path | None) -> str:
        """Start D (and its Adam moments, where the base has them) from ``init``; returns the source.

        D's weights load strictly. The optimizer keeps this phase's hyper-parameters (lr, betas):
        only the moments and step counts carry over.
        """
        state, adam, source = base_discriminator(init)
        try:
            self.disc.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise DiscriminatorInitError(
                f"{source}: its discriminator does not fit gan (kind {self.cfg.kind}, ndf {self.cfg.ndf}, "
                f"n_layers {self.cfg.n_layers}): {detail[:400]}") from err
        if adam is not None:
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
            try:
                self.opt.load_state_dict(adam)
            except (ValueError, KeyError) as err:
                raise ModelLoadError(f"{source}: {DISC_ADAM_FILE} does not fit the discriminator ({err})") from err
            for group, h in zip(self.opt.param_groups, hyper, strict=True):
                group.update(h)
        return source

    def save_files(self, folder: str | Path) -> None:
        """D's weights and Adam state into ``folder`` (a phase's model output), for a later phase."""
        write_discriminator(folder, self.disc.state_dict(), self.opt.state_dict(),
                            {"kind": self.cfg.kind, "ndf": str(self.cfg.ndf), "n_layers": str(self.cfg.n_layers)})

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:  # this run's lr, as for G's optimizer
            group["lr"] = self.opt.defaults["lr"]
        self.rng.set_state(state["rng"])


def write_discriminator(folder: str | Path, state: dict, adam: dict | None = None,
                        metadata: dict[str, str] | None = None) -> None:
    folder = Path(folder)
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / DISC_FILE, metadata=metadata)
    if adam is not None:
        torch.save(_to_cpu(adam), folder / DISC_ADAM_FILE)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj

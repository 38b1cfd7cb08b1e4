"""One optimizer step of a training phase, as a reusable unit.

:class:`TrainStep` owns what a step touches (the model's trainable parameters, the optimizer,
the GAN, the loss scaler, the EMA, the sampling noise) and runs one step: ``accumulate``
micro-batches, the loss and adversarial terms, backward, gradient averaging across ranks,
clipping, the finite checks and the optimizer/EMA updates. The engine's loop
(:mod:`vaeft.train.engine`) calls it once per step and keeps the bookkeeping around it (skipped
steps, logging, checkpoints); ``bench/train_step.py`` times the same object, so the benchmark
measures the code the engine runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vaeft.config import TrainPhaseParams
from vaeft.data.loader import to_model_range
from vaeft.errors import VaeftError
from vaeft.losses.reconstruction import ReconstructionLoss
from vaeft.model.freeze import configure_trainable
from vaeft.train import distributed as dist_
from vaeft.train.ema import Ema
from vaeft.train.gan import GanTrainer
from vaeft.train.precision import autocast, grad_scaler

# The decoder's last layer, where LDM takes the gradients of its adaptive GAN weight.
LAST_LAYER = "decoder.conv_out.weight"
# TrainPhaseParams.adam_impl -> torch.optim.Adam keyword arguments (for G and D alike).
ADAM_IMPLS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
}


def _mean_logs(acc: dict[str, torch.Tensor], logs: dict[str, torch.Tensor], k: int) -> None:
    for name, v in logs.items():
        if not name.startswith("_"):
            acc[name] = acc.get(name, 0.0) + v.detach().float() / k


def compile_decoder(decoder: torch.nn.Module) -> None:
    """torch.compile the decoder block by block, in place (state-dict keys unchanged).

    Not as one graph: the adaptive GAN weight asks for the gradient of conv_out.weight alone, and
    a compiled graph's backward computes every input's gradient, so a whole-decoder graph would
    run the decoder's backward three times per step. conv_norm_out, the activation and conv_out
    stay eager. (Toy scale on CPU: whole decoder 0.76x of eager, block by block 1.00x.)

    Callers that run the model otherwise (another batch, dtype or grad mode: the reconstruction
    grids) do so under :func:`eager`, which neither recompiles nor counts against the limit.
    """
    blocks = [decoder.conv_in, decoder.mid_block, *decoder.up_blocks]
    # Same-class blocks share one code object, and each block is a cache entry of its own on it:
    # the default limit (8) would leave later blocks eager, silently, after one extra shape.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for block in blocks:
        block.compile()


def compiles(option: bool | str, device: torch.device) -> bool:
    """Whether TrainPhaseParams.compile ``option`` compiles on ``device`` ("cuda": on GPUs only)."""
    return option is True or (option == "cuda" and device.type == "cuda")


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules as plain eager code inside (no recompilation, no graph-cache use)."""
    return torch.compiler.set_stance("force_eager")


@dataclass
class StepResult:
    """What a step did, as device tensors: reading them (``bool``, ``float``) waits for the GPU,
    so the engine reads them only when it logs (:class:`vaeft.train.engine` defers its checks)."""

    finite: torch.Tensor  # bool: False = non-finite loss or gradient on some rank, nothing was updated
    logs: dict[str, torch.Tensor]  # micro-batch means of the loss terms (+ d_grad_norm with the GAN)
    grad_norm: torch.Tensor  # the generator's gradient norm before clipping (NaN when non-finite)

    @property
    def ok(self) -> bool:
        return bool(self.finite)


class TrainStep:
    """Sets the model up for a phase and runs its optimizer steps.

    ``grad_at_output`` (on): with the GAN on, back-propagate the loss from the decoder's output
    (LPIPS and D backward once) instead of from the loss after LDM's last-layer gradients (LPIPS
    and D backward twice). Same maths; bench/train_step.py --levers measures it (off = LDM's way).

    ``vae`` is the freshly built or loaded autoencoder (on the CPU, as loaded): the constructor
    enables gradient checkpointing, moves it to ``device``, applies channels_last, freezes what
    does not train and compiles the decoder, in the order the engine always did, so global RNG
    draws (the discriminator's initialisation) are unchanged. ``loss_fn`` must already be on
    ``device``.
    """

    def __init__(self, cfg: TrainPhaseParams, vae: torch.nn.Module, loss_fn: ReconstructionLoss,
                 device: torch.device, seed: int, ctx: dist_.DistContext | None = None) -> None:
        self.cfg, self.vae, self.loss_fn, self.device = cfg, vae, loss_fn, device
        self.ctx = ctx or dist_.DistContext(0, 1, 0, device)
        if cfg.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        vae.to(device)
        if cfg.channels_last:
            vae.to(memory_format=torch.channels_last)
        self.named = configure_trainable(vae, cfg.trainable)
        self.g_params = list(self.named.values())
        groups: list[dict] = [{"params": self.g_params}]
        if cfg.loss.learn_logvar:
            groups.append({"params": [loss_fn.logvar]})
            self.g_params = self.g_params + [loss_fn.logvar]
        adam = ADAM_IMPLS[cfg.adam_impl]
        self.opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **adam)
        self.gan = (GanTrainer(cfg.gan, cfg.lr, cfg.betas, device, seed + 2, adam_kwargs=adam,
                               rank=self.ctx.rank, world_size=self.ctx.world_size)
                    if cfg.gan is not None else None)
        if self.gan is not None and LAST_LAYER not in self.named:
            raise VaeftError(f"the GAN's adaptive weight needs {LAST_LAYER} to train")
        self.last_layer = self.named.get(LAST_LAYER)
        self.scaler = grad_scaler(cfg.precision, device)
        self.ema = Ema(self.named, cfg.ema_decay) if cfg.ema else None
        # On the device (a CPU generator would cost a blocking copy per micro-batch), one stream
        # for all ranks: each draws the noise of the whole global micro-batch and keeps its slice,
        # so N ranks at batch B sample what 1 rank at batch N*B does.
        self.noise = torch.Generator(device=device).manual_seed(seed + 1)
        self.decoder_only = cfg.trainable == "decoder"
        if compiles(cfg.compile, device):
            compile_decoder(vae.decoder)
            if self.decoder_only:
                vae.encoder.compile()  # frozen and run under no_grad: one graph, forward only
        # The generator's gradients are averaged over ranks while backward still runs.
        self.reducer = dist_.GradReducer(self.ctx, self.g_params, dist_.BUCKET_BYTES) if self.ctx.enabled else None
        # Skipping a non-finite step without reading the flag on the host: fused Adam takes it as
        # found_inf and leaves the step out on the device. fp16's GradScaler sets found_inf itself.
        self.device_skip = cfg.adam_impl == "fused" and not self.scaler.is_enabled()

    grad_at_output = True

    def posterior(self, x: torch.Tensor):
        """The encoder's posterior of ``x`` (no graph when only the decoder trains)."""
        with torch.set_grad_enabled(not self.decoder_only):
            return self.vae.encode(x).latent_dist

    def sample(self, posterior) -> torch.Tensor:
        """z = mean + std * eps, eps this rank's slice of the global micro-batch's noise (with one
        rank: diffusers' ``posterior.sample(generator)``, draw for draw)."""
        mean = posterior.mean
        n, r, w = mean.shape[0], self.ctx.rank, self.ctx.world_size
        eps = torch.randn((n * w, *mean.shape[1:]), generator=self.noise, device=mean.device, dtype=mean.dtype)
        return mean + posterior.std * eps[r * n : (r + 1) * n]

    def release_grads(self) -> None:
        """Drop the gradients the last step left (each step starts by dropping them anyway)."""
        self.opt.zero_grad(set_to_none=True)
        if self.gan is not None:
            self.gan.opt.zero_grad(set_to_none=True)

    def __call__(self, step: int, batches: Iterator[torch.Tensor]) -> StepResult:
        """Optimizer step number ``step`` on the next ``accumulate`` uint8 batches of ``batches``."""
        cfg, ctx, vae, gan, scaler = self.cfg, self.ctx, self.vae, self.gan, self.scaler
        acc = cfg.accumulate
        gan_on = gan is not None and gan.active(step)
        self.release_grads()
        logs: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for i in range(acc):
            # Every micro-batch runs even after a bad one: the data stay aligned with the step, and
            # no flag is read on the host before the step ends.
            x = to_model_range(next(batches), self.device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(cfg.precision, self.device):
                posterior = self.posterior(x)
                z = self.sample(posterior)
                x_hat = vae.decode(z).sample
            kl = posterior.kl() if (cfg.loss.kl > 0 and not self.decoder_only) else None
            # With the GAN on, the loss reaches the trained weights only through x̂ (unless logvar
            # or the KL term train too): back-propagate from x̂ (see generator_grad_at_output).
            at_output = gan_on and self.grad_at_output and kl is None and not cfg.loss.learn_logvar
            if at_output:
                x_hat = x_hat.float()  # the gradient at x̂ in fp32: a mean loss's would underflow fp16
            loss, micro = self.loss_fn(x, x_hat, kl)
            if gan_on:
                with autocast(cfg.precision, self.device):
                    if at_output:
                        out_grad, g_term, g_logs = gan.generator_grad_at_output(x_hat, micro["_nll"],
                                                                                self.last_layer, step)
                    else:
                        g_term, g_logs = gan.generator_term(x_hat, micro["_nll"], self.last_layer, step)
                loss = loss + g_term
                micro.update(g_logs)
                micro["loss"] = loss.detach()
            finite &= torch.isfinite(loss.detach())
            if self.reducer is not None and i == acc - 1:
                self.reducer.arm()  # the last backward into G's gradients: all-reduce as they complete
            if at_output:
                x_hat.backward(scaler.scale(out_grad / acc))
            else:
                scaler.scale(loss / acc).backward()
            if gan_on:
                with autocast(cfg.precision, self.device):
                    d_loss, d_logs = gan.discriminator_loss(x, x_hat, step)
                micro.update(d_logs)
                scaler.scale(d_loss / acc).backward()
            _mean_logs(logs, micro, acc)
        if self.reducer is not None:
            self.reducer.finish()
        scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.g_params, cfg.grad_clip or math.inf)
        finite &= torch.isfinite(grad_norm)
        if gan_on:
            dist_.average_gradients(ctx, gan.disc.parameters())
            scaler.unscale_(gan.opt)
            d_norm = torch.nn.utils.clip_grad_norm_(gan.disc.parameters(), math.inf)
            finite &= torch.isfinite(d_norm)
            logs["d_grad_norm"] = d_norm
        # A non-finite loss on one rank makes every rank skip (the gradients mostly tell already).
        finite = dist_.all_true_tensor(ctx, finite)
        if self.device_skip:
            self._masked_update(step, gan_on, finite)
            return StepResult(finite, logs, torch.where(finite, grad_norm, math.nan))
        if not bool(finite):
            if scaler.is_enabled() and grad_norm.isfinite().logical_not().item():
                scaler.update()  # fp16 overflow: lower the scale, as GradScaler would
            self.opt.zero_grad(set_to_none=True)
            return StepResult(finite, logs, grad_norm.new_tensor(math.nan))
        scaler.step(self.opt)
        if gan_on:
            gan.catch_up(step)
            scaler.step(gan.opt)
        scaler.update()
        if self.ema is not None:
            self.ema.update(self.named)
        return StepResult(finite, logs, grad_norm)

    def _masked_update(self, step: int, gan_on: bool, finite: torch.Tensor) -> None:
        """The optimizer and EMA updates, left out on the device when ``finite`` is False."""
        skip = (~finite).float()
        opts = [self.opt] + ([self.gan.opt] if gan_on else [])
        if gan_on:
            self.gan.catch_up(step)
        for opt in opts:
            opt.found_inf = skip
            try:
                opt.step()
            finally:
                del opt.found_inf
        if self.ema is not None:
            self.ema.update(self.named, keep=finite)

    def state_dict(self) -> dict:
        """What a resumed step needs, part by part (the sampling noise is per rank: the engine's)."""
        return {
            "model": self.vae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "logvar": self.loss_fn.logvar.detach().cpu(),
            "gan": self.gan.state_dict() if self.gan is not None else None,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        # The saved param groups carry the old lr; this run's (train.lr may change across a resume).
        for group in self.opt.param_groups:
            group["lr"] = self.opt.defaults["lr"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.loss_fn.logvar.data.copy_(state["logvar"])
        if self.gan is not None:
            self.gan.load_state_dict(state["gan"])
        self.scaler.load_state_dict(state["scaler"])

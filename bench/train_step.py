"""Train-step throughput: vaeft's engine step vs a naive loop, side by side in one run.

    python bench/train_step.py                          # toy scale on CPU, SD size on CUDA (auto)
    python bench/train_step.py --scale sd --device cuda  # the performance issue's setting: 256², batch 12
    python bench/train_step.py --levers                 # each lever alone vs the recipe's config
    python bench/train_step.py --smoke                  # tiny, seconds (CI)

Both sides fine-tune the decoder side of a diffusers ``AutoencoderKL`` with the sd-vae-ft recipe's
loss (vaeft/recipes/sd-vae-ft.yaml, train.ema): L1 + LPIPS-VGG summed over pixels / batch, LDM's hinge
PatchGAN with the adaptive weight at decoder.conv_out, a discriminator step, EMA.

* naive: what a straightforward script does - eager fp32, the encoder under ``no_grad``, the
  ``lpips`` package, ``torch.optim.AdamW(foreach=False, fused=False)``, LDM's loss written out,
  EMA as a per-parameter loop. Its D step reuses the same reconstruction (LDM recomputes it).
* vaeft: :class:`vaeft.train.step.TrainStep`, the object the engine's loop calls every step, in
  the recipe's configuration (precision, memory format, compile, Adam, LPIPS backbone dtype as
  the engine derives it; cuDNN autotuning as the engine sets it). On CPU the precision defaults
  to fp32 (the recipes are GPU recipes; bf16 convs are slow on CPUs); every option can be
  overridden on the command line, and the header prints what ran.

Steps alternate between the two sides (naive first on even steps, vaeft first on odd ones), so
load from other processes hits both alike; the ratio is the number to read on a busy machine.
Warm-up steps (compilation, allocator growth, Adam state creation) are timed but excluded.
Data loading is excluded: both sides read one fixed uint8 batch already on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import torch
import yaml

H100_DENSE_BF16_TFLOPS = 989.0  # H100 SXM spec sheet, dense (no sparsity)
H100_MEASURED_MATMUL_TFLOPS = 790.0  # a large bf16 matmul on one H100 here (REFERENCE §5)
TARGET_IMG_S, TARGET_RATIO, TARGET_MEM_GIB = 200.0, 2.0, 20.0  # issue 17, per H200

TOY_ARCH = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8}
SMOKE_ARCH = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}
# scale -> (architecture overrides or None for the recipe's SD config, resolution, batch, steps, warmup)
PRESETS = {
    "smoke": (SMOKE_ARCH, 16, 2, 2, 1),
    "toy": (TOY_ARCH, 64, 4, 16, 2),
    "sd": (None, 256, 12, 20, 3),
}
# The recipe's PatchGAN (3 layers) needs >= 32²; the smoke run's 16² crops get a 2-layer one.
GAN_OVERRIDES = {"smoke": {"ndf": 16, "n_layers": 2}}


# ------------------------------------------------------------------------------------------ setup


def recipe() -> tuple[dict, dict]:
    raw = yaml.safe_load((common.ROOT / "vaeft" / "recipes" / "sd-vae-ft.yaml").read_text())
    return raw["model"]["architecture"], raw["train"]["ema"]


def make_arch(scale: str, res: int):
    from vaeft.config import ArchitectureParams

    sd_arch, _ = recipe()
    over = PRESETS[scale][0]
    return ArchitectureParams(**{**sd_arch, **(over or {}), "sample_size": res})


def make_cfg(scale: str, batch: int, **options):
    """recipes/sd-vae-ft.yaml's train.ema at ``batch`` (+ ``options``), as TrainPhaseParams."""
    from vaeft.config import TrainPhaseParams

    _, train = recipe()
    train = {**train, "batch_size": batch, **options}
    train["gan"] = {**train["gan"], **GAN_OVERRIDES.get(scale, {})}
    return TrainPhaseParams(**train)


def lpips_file(net: str) -> Path:
    from vaeft.weights import registry

    return common.current_weight_store() / registry()[f"lpips-{net}"].filename


_LPIPS_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def lpips_module(kind: str, net: str) -> torch.nn.Module:
    """A fresh copy of the side's LPIPS: vaeft's LpipsLoss (backbone from the random store) or the
    lpips package's own module (naive). Built once per process, then copied: a build costs seconds."""
    if (kind, net) not in _LPIPS_CACHE:
        with common.skip_linear_init():
            if kind == "naive":
                import lpips

                model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False).eval()
                _LPIPS_CACHE[kind, net] = model.requires_grad_(False)
            else:
                from vaeft.losses.lpips import LpipsLoss

                _LPIPS_CACHE[kind, net] = LpipsLoss(net, lpips_file(net))
    return copy.deepcopy(_LPIPS_CACHE[kind, net])


def build_vaeft(cfg, arch, device: torch.device, seed: int, variant: Variant | None = None):
    """The engine's step object, built in the engine's order (loss, seed, model, TrainStep)."""
    from vaeft.losses.reconstruction import ReconstructionLoss
    from vaeft.model.build import build_autoencoder
    from vaeft.train.step import TrainStep

    lp = lpips_module("vaeft", cfg.loss.lpips_net)
    lp.backbone_dtype = torch.bfloat16 if cfg.precision == "bf16" else None  # as engine.build_loss
    loss_fn = ReconstructionLoss(cfg.loss, lp).to(device)
    torch.manual_seed(seed)
    vae = build_autoencoder(arch)
    cls = _cached_moments_class() if variant is not None and variant.cached_moments else TrainStep
    step = cls(cfg, vae, loss_fn, device, seed)
    if variant is not None:
        variant.apply(step)
    return step


def _cached_moments_class():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from vaeft.train.step import TrainStep

    class _Cached(TrainStep):
        """The engine's step with the frozen encoder replaced by a lookup of its posterior moments.

        The benchmark feeds one fixed batch, so moments computed once (:meth:`prime`) are exact
        for every step: this measures the saving of a perfect cache (materialised crops seen again).
        """

        _moments: torch.Tensor | None = None

        def prime(self, batch_u8: torch.Tensor) -> None:
            """Fill the cache as the step would see the batch (range, layout, autocast)."""
            from vaeft.data.loader import to_model_range
            from vaeft.train.precision import autocast

            x = to_model_range(batch_u8, self.device)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.cfg.precision, self.device):
                self._moments = super().posterior(x).parameters.detach()

        def posterior(self, x):
            return DiagonalGaussianDistribution(self._moments)

    return _Cached


@dataclass
class Variant:
    """One lever: config changes for TrainStep, and/or a change applied to the built step."""

    name: str
    cfg: dict = field(default_factory=dict)
    # The LPIPS backbone in the other dtype than the engine picks for the config (bf16 <-> fp32).
    lpips_flip: bool = False
    compile_lpips: bool = False
    classic_attention: bool = False
    cached_moments: bool = False
    ldm_backward: bool = False  # the adaptive weight LDM's way: LPIPS and D backward twice
    note: str = ""
    # No "whole decoder as one graph" / CUDA-graph levers: they pull conv_out into the compiled
    # graph, whose backward then runs whole for the adaptive weight's autograd.grad at conv_out
    # (see vaeft.train.step.compile_decoder), so they measure a different step, not a lever.

    def apply(self, step) -> None:
        step.grad_at_output = not self.ldm_backward
        lp = step.loss_fn.lpips
        if self.lpips_flip:
            lp.backbone_dtype = None if lp.backbone_dtype is not None else torch.bfloat16
        if self.compile_lpips:
            lp.model.net.compile()
        if self.classic_attention:
            from diffusers.models.attention_processor import AttnProcessor

            step.vae.set_attn_processor(AttnProcessor())


# ------------------------------------------------------------------------------------ naive side


class NaiveStep:
    """A straightforward fine-tuning loop: eager fp32, LDM's loss written out, plain AdamW."""

    def __init__(self, cfg, arch, device: torch.device, seed: int) -> None:
        common.ensure_torchvision()
        from diffusers import AutoencoderKL

        from vaeft.losses.discriminator import NLayerDiscriminator  # the same PatchGAN network
        from vaeft.model.build import diffusers_config

        self.cfg, self.device = cfg, device
        self.lpips = lpips_module("naive", cfg.loss.lpips_net).to(device)
        torch.manual_seed(seed)
        self.vae = AutoencoderKL(**diffusers_config(arch)).to(device)
        self.vae.encoder.requires_grad_(False).eval()
        self.vae.quant_conv.requires_grad_(False)
        self.params = {n: p for n, p in self.vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
        self.opt = torch.optim.AdamW(self.params.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0,
                                     foreach=False, fused=False)
        g = cfg.gan
        self.disc = NLayerDiscriminator(3, g.ndf, g.n_layers, g.norm).to(device).train()
        self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0,
                                       foreach=False, fused=False)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        self.updates = 0

    def release_grads(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.d_opt.zero_grad(set_to_none=True)

    def __call__(self, step: int, batches) -> dict[str, float]:
        x = next(batches).to(self.device).float() / 127.5 - 1.0
        with torch.no_grad():
            posterior = self.vae.encode(x).latent_dist
        x_hat = self.vae.decode(posterior.sample()).sample
        w = self.cfg.loss
        rec = w.l1 * (x_hat - x).abs() + w.lpips * self.lpips(x, x_hat)
        nll = rec.sum() / x.shape[0] if w.reduction == "sum" else rec.mean()
        self.disc.requires_grad_(False)
        g_loss = -self.disc(x_hat).mean()
        self.disc.requires_grad_(True)
        last = self.vae.decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.cfg.gan.disc_weight
        loss = nll + d_weight * g_loss
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        logits_real, logits_fake = self.disc(x.detach()), self.disc(x_hat.detach())
        d_loss = 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
        self.d_opt.zero_grad()
        d_loss.backward()
        self.d_opt.step()
        with torch.no_grad():
            decay = min(self.cfg.ema_decay, (1 + self.updates) / (10 + self.updates))
            self.updates += 1
            for n, p in self.params.items():
                self.ema[n].sub_((1.0 - decay) * (self.ema[n] - p))
        return {"loss": float(loss.detach())}


def run_vaeft(step_obj, i: int, batches) -> dict[str, float]:
    result = step_obj(i, batches)
    if not result.ok:
        raise RuntimeError(f"vaeft step {i} was skipped (non-finite loss or gradient)")
    return {"loss": float(result.logs["loss"])}


# ---------------------------------------------------------------------------------------- measure


@dataclass
class Side:
    name: str
    obj: object
    run: object  # (obj, i, batches) -> logs
    batches: object
    steps_done: int = 0
    warmup_s: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    first_loss: float = math.nan
    resident_mib: float = math.nan
    peak_mib: float = math.nan  # CUDA: resident state + the largest transient of a step
    mem_base: int = 0  # CUDA: bytes allocated before this side was built
    flops: float = math.nan  # per step

    def step(self) -> dict[str, float]:
        logs = self.run(self.obj, self.steps_done, self.batches)
        self.steps_done += 1
        return logs


def make_side(kind: str, cfg, arch, device, seed: int, batch_u8: torch.Tensor, variant: Variant | None = None) -> Side:
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    batches = itertools.repeat(batch_u8)
    if kind == "naive":
        side = Side("naive", NaiveStep(cfg, arch, device, seed), lambda o, i, b: o(i, b), batches)
    else:
        if variant is not None and variant.cfg:
            cfg = cfg.model_copy(update=variant.cfg)
        step = build_vaeft(cfg, arch, device, seed, variant)
        if variant is not None and variant.cached_moments:
            step.prime(batch_u8)
        side = Side(variant.name if variant else "vaeft", step, run_vaeft, batches)
    side.mem_base = base
    return side


def warm_up(side: Side, n: int, device: torch.device, flops: bool = False) -> None:
    """``n`` >= 1 warm-up steps, timed but not counted; on CUDA also the side's resident memory and
    its warm-up peak. ``flops``: count the FLOPs of the last warm-up step (not a timed one)."""
    # Everything this side allocated since before it was built (weights, LPIPS, D) counts.
    base = side.mem_base
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k in range(max(1, n)):
        holder = {}
        if flops and k == max(1, n) - 1:
            side.warmup_s.append(common.timed(lambda holder=holder: holder.update(count_flops(side)), device))
        else:
            side.warmup_s.append(common.timed(lambda holder=holder: holder.update(side.step()), device))
        if k == 0:
            side.first_loss = holder["loss"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        side.obj.release_grads()
        side.resident_mib = (torch.cuda.memory_allocated(device) - base) / 2**20
        side.peak_mib = peak / 2**20


def timed_step(side: Side, other: Side | None, device: torch.device) -> None:
    if device.type == "cuda":
        # The other side's gradients would count against this side's peak; each step drops its
        # own at the start anyway, so releasing them early changes nothing else.
        if other is not None:
            other.obj.release_grads()
        side.obj.release_grads()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    side.times.append(common.timed(side.step, device))
    if device.type == "cuda":
        transient = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        side.peak_mib = max(side.peak_mib, side.resident_mib + transient)


def interleave(a: Side, b: Side, steps: int, device: torch.device) -> None:
    for i in range(steps):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        timed_step(first, second, device)
        timed_step(second, first, device)


def count_flops(side: Side) -> dict[str, float]:
    """One step under torch's FlopCounterMode (FLOPs of everything it executes, into
    ``side.flops``); returns the step's logs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, depth=1) as counter:
        logs = side.step()
    side.flops = float(counter.get_total_flops())
    return logs


def img_s(side: Side, batch: int) -> float:
    return batch * len(side.times) / sum(side.times)


# --------------------------------------------------------------------------------------- memory


def cpu_memory_probe(kind: str, cfg, arch, seed: int, res: int, batch: int, steps: int) -> float | None:
    """Peak RSS growth of building ``kind`` and running ``steps`` steps, alone in a forked child."""

    def work(_) -> None:
        x = torch.from_numpy(common.photo_batch(batch, res))
        side = make_side(kind, cfg, arch, torch.device("cpu"), seed, x)
        for _ in range(steps):
            side.step()

    return common.forked_peak_rss_mib(lambda: lpips_module(kind, cfg.loss.lpips_net), work)


# ----------------------------------------------------------------------------------------- levers


def lever_variants(device: torch.device, with_compile: bool, base) -> list[Variant]:
    """Each lever changes one thing of ``base`` (the recipe's configuration as the vaeft side runs it)."""
    from vaeft.train.step import compiles

    other_precision = "fp32" if base.precision != "fp32" else "bf16"
    lpips_now = "bf16" if base.precision == "bf16" else "fp32"
    levers = [
        Variant(f"channels_last {'off' if base.channels_last else 'on'}", {"channels_last": not base.channels_last},
                note="engine option channels_last"),
        Variant("adam foreach", {"adam_impl": "foreach"}, note="engine option adam_impl (recipe: fused)"),
        Variant("adam for-loop", {"adam_impl": "for-loop"}, note="engine option adam_impl (recipe: fused)"),
        Variant(f"precision {other_precision}", {"precision": other_precision}, note="engine option precision"),
        Variant(f"LPIPS backbone {'fp32' if lpips_now == 'bf16' else 'bf16'}", lpips_flip=True,
                note=f"bench variant (the engine runs it in {lpips_now} for precision {base.precision})"),
        Variant("cached posterior moments", cached_moments=True, note="bench variant: encoder skipped"),
        Variant("attention without SDPA", classic_attention=True,
                note="diffusers AttnProcessor instead of the default AttnProcessor2_0 (SDPA)"),
        Variant("LDM's double LPIPS/D backward", ldm_backward=True,
                note="TrainStep.grad_at_output off: the default back-propagates from x̂ once"),
    ]
    if with_compile:
        on = compiles(base.compile, device)
        levers += [
            Variant("compile off" if on else "compile decoder blocks + encoder", {"compile": not on},
                    note="engine option compile (recipe: cuda)"),
            Variant("compile LPIPS backbone", compile_lpips=True, note="bench variant"),
        ]
    return levers


def lpips_bf16_difference(cfg, device: torch.device, x_u8: torch.Tensor) -> float:
    """Max relative difference of per-image LPIPS, backbone in bf16 vs fp32 (random backbone)."""
    lp = lpips_module("vaeft", cfg.loss.lpips_net).to(device)
    x = x_u8.to(device).float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(0)
    # A plausible reconstruction error: a little blur and noise.
    y = torch.nn.functional.avg_pool2d(x, 3, 1, 1) + 0.05 * torch.randn(x.shape, generator=gen).to(device)
    with torch.no_grad():
        lp.backbone_dtype = None
        ref = lp(x, y).flatten()
        lp.backbone_dtype = torch.bfloat16
        low = lp(x, y).flatten()
    return float(((low - ref).abs() / ref.abs().clamp_min(1e-12)).max())


def paired(base: Side, other: Side) -> tuple[float, float, float]:
    """Speed-up of ``other`` over ``base`` from interleaved step pairs: median, min, max of the
    per-pair ratios. A load burst hits one pair (and both of its steps), not the median."""
    ratios = sorted(b / o for b, o in zip(base.times, other.times))
    return statistics.median(ratios), ratios[0], ratios[-1]


def run_levers(args, cfg, arch, device, x_u8) -> None:
    print()
    from vaeft.train.step import compiles

    print(f"levers: each vs the recipe's configuration as run here (precision {cfg.precision}, channels_last "
          f"{cfg.channels_last}, compile {cfg.compile} -> {'on' if compiles(cfg.compile, device) else 'off'} on "
          f"{device.type}, adam {cfg.adam_impl}), "
          f"{args.warmup} warm-up + {args.lever_steps} interleaved steps each; speed-up = median over "
          f"step pairs of (default step time / lever step time), [min, max] over pairs")
    base = make_side("vaeft", cfg, arch, device, args.seed, x_u8)
    warm_up(base, args.warmup, device, flops=True)
    mem_col = device.type == "cuda"
    print(f"{'lever':<46} {'base img/s':>10} {'lever img/s':>11} {'speed-up':>8} {'[min, max]':>14} "
          f"{'GFLOP/img':>9} {'first step s':>12} {'step-0 loss rel diff':>20}" + ("  peak MiB" if mem_col else "")
          + "  note")
    print(f"{'(recipe config)':<46} {'':>10} {'':>11} {'':>8} {'':>14} {base.flops / args.batch / 1e9:9.6g} "
          f"{base.warmup_s[0]:12.2f} {0.0:20.2e}" + (f"  {base.peak_mib:8.0f}" if mem_col else ""))
    variants = lever_variants(device, args.compile_levers, cfg)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        variants = [v for v in variants if any(w in v.name for w in wanted)]
    for v in variants:
        base.times.clear()
        try:
            side = make_side("vaeft", cfg, arch, device, args.seed, x_u8, v)
            # FlopCounterMode cannot look inside compiled graphs.
            compiled = v.compile_lpips or compiles(side.obj.cfg.compile, device)
            warm_up(side, args.warmup, device, flops=not compiled)
            interleave(base, side, args.lever_steps, device)
        except Exception as err:  # noqa: BLE001 - one failing lever must not hide the others
            print(f"lever {v.name:<40} | failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        b, s_ = img_s(base, args.batch), img_s(side, args.batch)
        med, lo, hi = paired(base, side)
        rel = abs(side.first_loss - base.first_loss) / max(abs(base.first_loss), 1e-12)
        note = v.note
        if v.lpips_flip:
            note += f"; per-image LPIPS bf16 vs fp32 max rel diff {lpips_bf16_difference(cfg, device, x_u8):.2e}"
        mem = f"  {side.peak_mib:8.0f}" if mem_col else ""
        print(f"lever {v.name:<40} {b:10.2f} {s_:11.2f} {med:7.2f}x [{lo:5.2f}, {hi:5.2f}] "
              f"{side.flops / args.batch / 1e9:9.6g} {side.warmup_s[0]:12.2f} {rel:20.2e}{mem}  {note}")
        del side
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("('first step' includes compilation where a lever compiles, from an empty inductor cache unless "
          "TORCHINDUCTOR_CACHE_DIR is set; the last warm-up step counts FLOPs)")


def run_update_costs(args, device) -> None:
    """The optimizer and EMA updates alone, on the SD decoder side's parameters (49.49 M): the part
    of a step the Adam implementation and the EMA code change, measured without the rest of the
    step's noise. Rounds alternate the order of the variants."""
    from vaeft.model.build import build_autoencoder
    from vaeft.model.freeze import configure_trainable
    from vaeft.train.ema import Ema
    from vaeft.train.step import ADAM_IMPLS

    torch.manual_seed(args.seed)
    vae = build_autoencoder(make_arch("sd", 256)).to(device)
    named = configure_trainable(vae, "decoder")
    params = list(named.values())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    cfg = make_cfg("sd", 12)
    impls = list(ADAM_IMPLS)
    opts = {k: torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, **ADAM_IMPLS[k]) for k in impls}
    ema = Ema(named, cfg.ema_decay)
    loop_shadow = {k: v.clone() for k, v in ema.shadow.items()}

    def ema_loop() -> None:
        # LitEma's per-parameter update, three kernels per tensor (vaeft's EMA before the lerp).
        with torch.no_grad():
            for name, p in named.items():
                s = loop_shadow[name]
                s.sub_((1.0 - ema.current_decay()) * (s - p.detach().float()))

    jobs = [*((f"adam {k}", opts[k].step) for k in impls), ("ema (vaeft, foreach lerp)", lambda: ema.update(named)),
            ("ema per-parameter loop", ema_loop)]
    times: dict[str, list[float]] = {name: [] for name, _ in jobs}
    for r in range(args.steps + 1):  # round 0 creates the optimizer states: not timed
        for name, fn in (jobs if r % 2 == 0 else jobs[::-1]):
            t = common.timed(fn, device)
            if r:
                times[name].append(t)
    print(f"update costs on the SD decoder side ({n / 1e6:.2f} M parameters in {len(params)} tensors), "
          f"median of {args.steps} rounds:")
    for name, _ in jobs:
        print(f"update {name:<26} {1e3 * statistics.median(times[name]):8.1f} ms per step")


# ------------------------------------------------------------------------------------------- main


def preload() -> None:
    """Import everything the sides need once, before the memory probes fork (or each child would)."""
    import diffusers.models.autoencoders.vae  # noqa: F401
    import lpips  # noqa: F401
    from diffusers import AutoencoderKL  # noqa: F401

    import vaeft.losses.lpips
    import vaeft.losses.reconstruction
    import vaeft.model.build
    import vaeft.train.step  # noqa: F401


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["toy", "sd"], default=None, help="toy (CPU default) or sd (CUDA default)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--res", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side before timing")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                    help="vaeft side; default the recipe's on CUDA (bf16), fp32 on CPU")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="vaeft side; default the recipe's (off)")
    ap.add_argument("--adam-impl", choices=["fused", "foreach", "for-loop"], default=None,
                    help="vaeft side; default the recipe's (fused)")
    ap.add_argument("--compile", choices=["recipe", "on", "off"], default="recipe",
                    help="vaeft side: the engine option compile; recipe: its 'cuda' (on GPUs only)")
    ap.add_argument("--levers", action="store_true", help="the lever table instead of the naive comparison")
    ap.add_argument("--update-costs", action="store_true",
                    help="only time Adam (each implementation) and the EMA on the SD decoder's parameters")
    ap.add_argument("--lever-steps", type=int, default=None)
    ap.add_argument("--only", default=None, help="levers whose name contains one of these comma-separated words")
    ap.add_argument("--compile-levers", action=argparse.BooleanOptionalAction, default=None,
                    help="include torch.compile levers (default: on CUDA only; slow to compile on CPU)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FlopCounterMode step")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--peak-tflops", type=float, default=H100_DENSE_BF16_TFLOPS,
                    help="the GPU's dense bf16 peak for MFU (default: H100 SXM, 989)")
    ap.add_argument("--matmul-tflops", type=float, default=H100_MEASURED_MATMUL_TFLOPS,
                    help="a measured large-matmul rate, MFU is also printed against it (default 790)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 16², 2 steps, both tables (CI)")
    common.add_weights_dir_arg(ap)
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    scale = "smoke" if args.smoke else (args.scale or ("sd" if device.type == "cuda" else "toy"))
    _, res, batch, steps, warmup = PRESETS[scale]
    args.scale_name = scale
    args.res = args.res or res
    args.batch = args.batch or batch
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.lever_steps = args.lever_steps or (1 if args.smoke else max(4, args.steps // 2))
    if args.compile_levers is None:
        args.compile_levers = device.type == "cuda" and not args.smoke  # compiling takes minutes
    cuda = device.type == "cuda"
    _, train = recipe()
    args.precision = args.precision or (train.get("precision", "fp32") if cuda else "fp32")
    args.channels_last = train.get("channels_last", False) if args.channels_last is None else args.channels_last
    args.adam_impl = args.adam_impl or train.get("adam_impl", "fused")
    args.compile = {"recipe": train.get("compile", False), "on": True, "off": False}[args.compile]
    return args, device


def main(argv=None) -> None:
    args, device = parse_args(argv)
    with contextlib.ExitStack() as stack:
        from vaeft.train.step import compiles

        if (compiles(args.compile, device) or args.compile_levers) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            # A fresh inductor cache: first-step times are then cold compile times, as on a new
            # machine. Removed at exit, like the weight store: nothing of a run stays in the temp dir.
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="vaeft-bench-inductor-"))
            stack.callback(os.environ.pop, "TORCHINDUCTOR_CACHE_DIR", None)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        # Written before any fork: the memory probes' children read it.
        stack.enter_context(common.random_weight_store(args.weights_dir))
        from vaeft.train.determinism import deterministic_mode

        stack.enter_context(deterministic_mode(False))  # cuDNN autotuning, as the engine runs a phase
        run(args, device)


def run(args, device: torch.device) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    common.ensure_torchvision()
    arch = make_arch(args.scale_name, args.res)
    base_cfg = make_cfg(args.scale_name, args.batch)  # the naive side takes its hyper-parameters only
    vaeft_cfg = base_cfg.model_copy(update={"precision": args.precision, "channels_last": args.channels_last,
                                            "adam_impl": args.adam_impl, "compile": args.compile})
    preload()

    # CPU peak RSS per side, each alone in a forked child: before this process runs any torch op.
    cpu_mem: dict[str, float | None] = {}
    if device.type == "cpu" and not (args.no_memory or args.levers or args.update_costs):
        for kind, cfg in (("naive", base_cfg), ("vaeft", vaeft_cfg)):
            cpu_mem[kind] = cpu_memory_probe(kind, cfg, arch, args.seed, args.res, args.batch, args.warmup + 1)

    mode = ", --levers" if args.levers else ", --update-costs" if args.update_costs else ""
    print(f"== vaeft train-step benchmark ({args.scale_name}{mode}) ==")
    print(common.machine_line(device))
    if args.update_costs:
        run_update_costs(args, device)
        return
    print(f"model: AutoencoderKL block_out_channels {arch.block_out_channels}, layers_per_block "
          f"{arch.layers_per_block}, norm_num_groups {arch.norm_num_groups}; batch {args.batch} at {args.res}²")
    print(f"loss: {base_cfg.loss.l1:g}*L1 + {base_cfg.loss.lpips:g}*LPIPS-{base_cfg.loss.lpips_net} "
          f"(reduction {base_cfg.loss.reduction}) + PatchGAN hinge (ndf {base_cfg.gan.ndf}, {base_cfg.gan.n_layers} "
          f"layers) with the adaptive weight, D step, EMA {base_cfg.ema_decay}, grad clip {base_cfg.grad_clip}")
    print(f"note: {common.RANDOM_WEIGHTS_NOTE}")
    x_u8 = torch.from_numpy(common.photo_batch(args.batch, args.res)).to(device)

    if args.levers:
        run_levers(args, vaeft_cfg, arch, device, x_u8)
        return
    compare(args, device, arch, base_cfg, vaeft_cfg, x_u8, cpu_mem)
    if args.smoke:
        run_levers(args, vaeft_cfg, arch, device, x_u8)


def compare(args, device, arch, base_cfg, vaeft_cfg, x_u8, cpu_mem) -> None:
    from vaeft.train.step import compiles

    print("naive: eager fp32 diffusers AutoencoderKL, encoder under no_grad, lpips package, "
          "AdamW(foreach=False, fused=False), EMA per parameter")
    print(f"vaeft: vaeft.train.step.TrainStep (the engine's step), precision {args.precision}, channels_last "
          f"{args.channels_last}, adam_impl {args.adam_impl}, compile {args.compile} -> "
          f"{'on' if compiles(vaeft_cfg.compile, device) else 'off'}; the recipe's config unless overridden")
    naive = make_side("naive", base_cfg, arch, device, args.seed, x_u8)
    warm_up(naive, args.warmup, device, flops=not args.no_flops)
    ours = make_side("vaeft", vaeft_cfg, arch, device, args.seed, x_u8)
    # FlopCounterMode cannot see inside compiled graphs: a compiled side uses the naive count.
    compiled = compiles(vaeft_cfg.compile, device)
    warm_up(ours, args.warmup, device, flops=not (args.no_flops or compiled))
    n_dec = sum(p.numel() for p in ours.obj.named.values()) / 1e6
    print(f"trainable decoder side: {n_dec:.2f} M parameters; warm-up {args.warmup} steps each "
          f"(first step naive {naive.warmup_s[0]:.2f} s, vaeft {ours.warmup_s[0]:.2f} s; the last one counts "
          f"FLOPs); {args.steps} timed steps each, interleaved")

    flops = {s.name: s.flops / args.batch for s in (naive, ours) if not math.isnan(s.flops)}
    interleave(naive, ours, args.steps, device)

    rate = {s.name: img_s(s, args.batch) for s in (naive, ours)}
    if device.type == "cuda":
        mem = {s.name: (s.peak_mib, "MiB peak allocated (torch.cuda.max_memory_allocated: resident state + largest "
                        "step transient)") for s in (naive, ours)}
    else:
        mem = {k: (v if v is not None else math.nan,
                   "MiB peak RSS growth (building the side + its steps, alone in a forked child)")
               for k, v in cpu_mem.items()} if cpu_mem else {}
    for s in (naive, ours):
        med = statistics.median(s.times) * 1e3
        m = f"  peak_mem_mib {mem[s.name][0]:.0f}" if s.name in mem else ""
        print(f"{s.name:<6} img/s {rate[s.name]:9.3f}  step_ms median {med:10.1f}  "
              f"min {min(s.times) * 1e3:10.1f}{m}")
    if mem:
        print(f"memory: {next(iter(mem.values()))[1]}")
    ratio = rate["vaeft"] / rate["naive"]
    med, lo, hi = paired(naive, ours)
    print(f"ratio vaeft/naive: {ratio:.2f}x  (median over interleaved step pairs {med:.2f}x, [{lo:.2f}, {hi:.2f}]; "
          f"target >= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    print(f"first-step loss (same init, same batch): naive {naive.first_loss:.6g}, vaeft {ours.first_loss:.6g} "
          f"(LPIPS backbones differ: both random)")
    if flops:
        f = flops.get("vaeft", flops["naive"])
        print(f"FLOPs per image (FlopCounterMode, one whole step): naive {flops['naive'] / 1e9:.4g} GFLOP, vaeft "
              + (f"{flops['vaeft'] / 1e9:.4g} GFLOP" if "vaeft" in flops else "n/a (compiled; naive's count used)")
              + " (vaeft back-propagates LPIPS and D once, the naive loop twice, as LDM)")
        for s in (naive, ours):
            print(f"achieved {s.name}: {f * rate[s.name] / 1e12:.3f} TFLOP/s")
        if device.type == "cuda":
            for s in (naive, ours):
                print(f"MFU {s.name}: {100 * f * rate[s.name] / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:g} "
                      f"TFLOP/s dense bf16 peak, {100 * f * rate[s.name] / (args.matmul_tflops * 1e12):.1f}% of the "
                      f"measured {args.matmul_tflops:g} TFLOP/s matmul rate")
    if device.type == "cuda" and args.scale_name == "sd" and args.res == 256 and args.batch == 12:
        ok = rate["vaeft"] >= TARGET_IMG_S
        print(f"target >= {TARGET_IMG_S:g} img/s per GPU: {'met' if ok else 'NOT met'} ({rate['vaeft']:.1f})")
        gib = mem["vaeft"][0] / 1024
        print(f"target peak memory <= {TARGET_MEM_GIB:g} GiB: {'met' if gib <= TARGET_MEM_GIB else 'NOT met'} "
              f"({gib:.1f} GiB, gradient checkpointing {'on' if ours.obj.cfg.gradient_checkpointing else 'off'})")


if __name__ == "__main__":
    main()

"""The ``fp16`` phase: a decoder that decodes in float16 without overflow, and decodes the same.

SD-family decoders overflow fp16 (activations past 65,504 -> inf -> NaN -> black images). This
phase keeps the decoder's output and shrinks its activations, decoder side only (the encoder and
quant_conv stay byte-identical, so the latent space and every diffusion model on it stay valid):

1. measure every probe point's peak (:mod:`vaeft.model.probes`) in fp32 on real latents: the
   eval images encoded at ``check_size``, the largest decode size asked for;
2. exact rescaling (:mod:`vaeft.model.rescale`): what sits above ``aim * target`` on the residual
   stream or a hidden resnet output is scaled down to it; the fp32 output does not change;
3. if some block is still at or above ``target`` (what rescaling cannot reach: post_quant_conv,
   the attention's inside, conv_norm_out's affine), a fine-tune against the frozen original as
   teacher: the student's decode of a latent matches the teacher's fp32 decode of the same latent
   (``loss`` terms, LPIPS when its weights are present), plus ``penalty`` x the squared relative
   excess of each probe's largest activations over ``aim * target``; peaks are measured again
   every ``check_every`` steps and training stops once all are below ``target``.

Then the student is decoded in fp16 on the check latents (emulated on CPU, see
:func:`vaeft.model.fp16.decode_fp16`): the phase fails, writing nothing,
if that overflows or if the fp32 reconstructions drifted below ``min_teacher_psnr`` of the
teacher's. ``run_info.json`` records the per-block peaks before and after and both PSNRs; the
evaluate stage puts them in the eval table (and so in the model card).

No checkpoints or resume: the phase is short (at most ``steps``) and starts from its input.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vaeft import atomic, provenance
from vaeft.config import Params
from vaeft.console import banner, console, progress
from vaeft.data.evalset import eval_items, load_eval_image
from vaeft.data.loader import to_model_range, train_batches
from vaeft.device import pick_device
from vaeft.errors import VaeftError
from vaeft.hashing import tree_sha256
from vaeft.losses.reconstruction import ReconstructionLoss
from vaeft.model.fp16 import decode_fp16
from vaeft.model.freeze import configure_trainable, encoder_state, set_modes
from vaeft.model.io import load_with_architecture, save_diffusers
from vaeft.model.probes import FP16_MAX, ActivationProbe
from vaeft.model.rescale import fit_rescale, rescale_decoder
from vaeft.train.engine import build_loss, check_outputs
from vaeft.train.logs import log_csv
from vaeft.weights import MissingWeightsError

STAGE = "train-fp16"


class Fp16PhaseError(VaeftError, RuntimeError):
    """The phase could not make the decoder fp16-safe within its limits; nothing was written."""


@dataclass(frozen=True)
class Fp16Result:
    out_dir: Path
    steps: int  # fine-tune steps run (0: the rescaling alone was enough)
    peaks_before: dict[str, float]  # per block, fp32, at check_size
    peaks_after: dict[str, float]
    stream_scale: list[float]
    psnr_fp16_vs_teacher: float
    psnr_fp32_vs_teacher: float
    seconds: float


@torch.no_grad()
def eval_latents(vae: torch.nn.Module, data_dir: str | Path, size: int, count: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The posterior means of the first ``count`` eval images at ``size`` x ``size`` (fp32)."""
    items = eval_items(data_dir)[:count]
    vae = vae.to(device)
    out = []
    for it in items:
        x = torch.from_numpy(load_eval_image(it, size).copy()).permute(2, 0, 1)[None]
        out.append(vae.encode(to_model_range(x, torch.device(device))).latent_dist.mode().float())
    return torch.cat(out)


@torch.no_grad()
def measure(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[ActivationProbe, torch.Tensor]:
    """One probe over the decodes of ``latents`` (one at a time) and the decodes themselves."""
    outs = []
    with ActivationProbe(vae) as probe:
        for z in latents.split(1):
            outs.append(vae.decode(z).sample.float())
    return probe, torch.cat(outs)


def psnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR of two [-1, 1] images mapped to [0, 1]; -inf when ``test`` is not finite."""
    if not bool(torch.isfinite(test).all()):
        return -math.inf
    mse = float(((ref.clamp(-1, 1) - test.float().clamp(-1, 1)) / 2).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def fp16_decode(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """A float16 copy of ``vae`` decodes ``latents`` (emulated on CPU, :func:`vaeft.model.fp16.decode_fp16`):
    (output, blocks with inf/NaN)."""
    device = next(vae.parameters()).device
    out, probe = decode_fp16(copy.deepcopy(vae), latents, device)
    return out, probe.block_nonfinite()


def _all_below(peaks: dict[str, float], target: float) -> bool:
    return all(v < target for v in peaks.values())


def _worst(peaks: dict[str, float]) -> str:
    name = max(peaks, key=peaks.get)
    return f"{name} {peaks[name]:.4g}"


def train_fp16(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    init: str | Path,
    log_file: str | Path | None = None,
    crops_dir: str | Path | None = None,
    *,
    force: bool = False,
) -> Fp16Result:
    """Make ``init``'s decoder fp16-safe; write it to ``out_dir`` (a diffusers folder)."""
    cfg = params.train.fp16
    check_outputs(out_dir, log_file, [data_dir, init, crops_dir], force)
    out_dir = Path(out_dir)
    device = pick_device()
    t0 = time.perf_counter()
    aim = cfg.aim * cfg.target
    banner("train fp16", f"{init} -> {out_dir}: every block's peak below {cfg.target:g} "
                         f"at {cfg.check_size}x{cfg.check_size}, at most {cfg.steps} steps")
    torch.manual_seed(params.seed)
    teacher = load_with_architecture(init, params.model.architecture).to(device).eval()
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    frozen = encoder_state(student)

    latents = eval_latents(teacher, data_dir, cfg.check_size, cfg.check_images, device)
    probe, teacher_out = measure(teacher, latents)
    before, before_points = probe.block_peaks(), dict(probe.peaks)
    console.print(f"before: largest peak {_worst(before)} ({max(before.values()) / FP16_MAX:.3g} of fp16's max)")
    stream: list[float] = [1.0] * len(student.decoder.up_blocks)
    hidden: dict[str, float] = {}
    if cfg.rescale:
        stream, hidden = fit_rescale(student, before_points, aim)
        rescale_decoder(student, stream, hidden)
    rescaled = bool(hidden) or any(s != 1.0 for s in stream)
    # An already-safe decoder is left as it is: nothing to measure again.
    peaks = measure(student, latents)[0].block_peaks() if rescaled else dict(before)
    if rescaled:
        console.print(f"rescaled: stream x {', '.join(f'{s:.3g}' for s in stream)}; {len(hidden)} hidden "
                      f"output(s); largest peak now {_worst(peaks)}")

    steps = 0
    rows: list[dict[str, float]] = []
    if not _all_below(peaks, cfg.target):
        steps, rows, peaks = _finetune(params, student, teacher, latents, data_dir, crops_dir, device, aim)
    if not _all_below(peaks, cfg.target):
        raise Fp16PhaseError(f"train fp16: after {steps} steps the largest peak is {_worst(peaks)}, not below "
                             f"train.fp16.target = {cfg.target:g}; raise train.fp16.steps, penalty or lr")

    student.eval()
    student_out = measure(student, latents)[1] if rescaled or steps else teacher_out
    half_out, overflow = fp16_decode(student, latents)
    psnr16, psnr32 = psnr_db(teacher_out, half_out), psnr_db(teacher_out, student_out)
    if overflow:
        raise Fp16PhaseError(f"train fp16: peaks are below target in fp32 but the fp16 decode still overflows "
                             f"in {', '.join(sorted(overflow))}; lower train.fp16.target")
    if psnr32 < cfg.min_teacher_psnr:
        raise Fp16PhaseError(f"train fp16: the fp32 reconstructions drifted to {psnr32:.2f} dB PSNR of the "
                             f"teacher's, below train.fp16.min_teacher_psnr = {cfg.min_teacher_psnr:g}; "
                             f"lower train.fp16.lr or penalty")
    for k, v in encoder_state(student.cpu()).items():
        if not torch.equal(v.cpu(), frozen[k].cpu()):  # a bug, not a user error: never ship it
            raise RuntimeError(f"train fp16: frozen tensor {k} changed")

    seconds = time.perf_counter() - t0
    save_diffusers(student.cpu(), out_dir, force=force)
    report = {
        "target": cfg.target, "check_size": cfg.check_size, "check_images": int(latents.shape[0]),
        "stream_scale": stream, "hidden_scale": hidden,
        "peaks_before": before, "peaks_after": peaks,
        "psnr_fp16_vs_teacher": psnr16, "psnr_fp32_vs_teacher": psnr32,
    }
    provenance.write_run_info(out_dir, STAGE, {"train.fp16": cfg, "augment": params.augment, "model": params.model},
                              init=str(init), init_sha256=tree_sha256(init), seed=params.seed, steps=steps,
                              fp16=_json_safe(report))
    provenance.record_run(out_dir, STAGE)
    if log_file is not None:
        atomic.write_text(log_file, log_csv(rows) if rows else "step,loss\n")
    console.print(f"train fp16: {steps} steps in {seconds:.1f}s; largest peak {_worst(before)} -> {_worst(peaks)}; "
                  f"fp16 decode vs teacher fp32 {psnr16:.2f} dB, fp32 vs teacher {psnr32:.2f} dB -> {out_dir}")
    return Fp16Result(out_dir, steps, before, peaks, stream, psnr16, psnr32, seconds)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _finetune(params: Params, student: torch.nn.Module, teacher: torch.nn.Module, latents: torch.Tensor,
              data_dir: str | Path, crops_dir: str | Path | None, device: torch.device,
              aim: float) -> tuple[int, list[dict[str, float]], dict[str, float]]:
    """Fine-tune until every block's peak is below target; (steps run, log rows, last peaks)."""
    cfg = params.train.fp16
    try:
        loss_fn = build_loss(cfg).to(device)
    except MissingWeightsError as err:  # the pixel terms alone still pin the output to the teacher's
        console.print(f"[yellow]train fp16: LPIPS off: {err}[/]")
        pixel = any((cfg.loss.l1, cfg.loss.mse, cfg.loss.oklab_l1, cfg.loss.oklab_mse))
        loss_fn = ReconstructionLoss(cfg.loss.model_copy(update={"lpips": 0.0, **({} if pixel else {"mse": 1.0})}))
        loss_fn = loss_fn.to(device)
    named = configure_trainable(student, "decoder")
    opt = torch.optim.Adam(list(named.values()), lr=cfg.lr, betas=cfg.betas)
    noise = torch.Generator().manual_seed(params.seed + 1)
    loader = iter(train_batches(data_dir, params.augment, params.seed, cfg.batch_size, 0, cfg.steps,
                                crops_dir=crops_dir))
    rows: list[dict[str, float]] = []
    peaks: dict[str, float] = {}
    train_probe = ActivationProbe(student, penalty_above=aim)
    with progress() as bar:
        task = bar.add_task("train fp16", total=cfg.steps, info="")
        for step in range(cfg.steps):
            x = to_model_range(next(loader), device)
            with torch.no_grad():
                z = teacher.encode(x).latent_dist.sample(generator=noise)
                target = teacher.decode(z).sample
            train_probe.reset()
            with train_probe:
                y = student.decode(z).sample
            rec, logs = loss_fn(target, y)
            pen = train_probe.penalty if isinstance(train_probe.penalty, torch.Tensor) else y.new_zeros(())
            loss = rec + cfg.penalty * pen
            if not bool(torch.isfinite(loss)):
                raise Fp16PhaseError(f"train fp16: non-finite loss at step {step + 1}; lower train.fp16.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip or math.inf)
            opt.step()
            done = step + 1
            bar.update(task, advance=1, info=f"loss {loss.item():.4g}")
            if done % cfg.check_every == 0 or done == cfg.steps:
                student.eval()
                probe, _ = measure(student, latents)
                set_modes(student, "decoder")
                peaks = probe.block_peaks()
            if done % cfg.log_every == 0 or done == cfg.steps or (peaks and _all_below(peaks, cfg.target)):
                rows.append({"step": done, "loss": loss.item(), "rec": rec.item(), "penalty": float(pen.detach()),
                             "grad_norm": float(grad_norm),
                             "max_peak": max(peaks.values()) if peaks else math.nan})
            if peaks and _all_below(peaks, cfg.target):
                bar.update(task, total=done)
                return done, rows, peaks
    return cfg.steps, rows, peaks

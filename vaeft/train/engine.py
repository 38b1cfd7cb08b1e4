"""The training engine: one function runs one phase (pretrain, ft-EMA or ft-MSE).

Decoder-only phases run the frozen encoder under ``no_grad`` and sample z = mean + std * eps
fresh every step (as LDM trained). The phase's output is a diffusers folder of the EMA weights
(or the raw weights when ``ema`` is off), plus a CSV log DVC can plot.

One optimizer step = ``accumulate`` micro-batches of ``batch_size`` on each of the torchrun
ranks; micro-batch i of rank r is a pure function of (seed, i, r), so resume is exact. Only
rank 0 writes checkpoints, logs and the model. The step itself (micro-batches, losses, backward,
optimizer, EMA) is :class:`vaeft.train.step.TrainStep`; this module is the loop around it: data,
resume, skipped steps, divergence (:mod:`.divergence`: stop, roll the checkpoints back, no model), logs and checkpoints. Helpers: :mod:`.distributed`, :mod:`.precision`,
:mod:`.gan`, :mod:`.logs`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vaeft import atomic, provenance
from vaeft.config import Params, TrainPhaseParams
from vaeft.console import banner, console, progress
from vaeft.data.loader import train_batches
from vaeft.data.manifest import is_url, manifest_sha256
from vaeft.data.materialize import INDEX_FILE, has_crops
from vaeft.errors import VaeftError
from vaeft.hashing import tree_sha256
from vaeft.losses.reconstruction import ReconstructionLoss
from vaeft.model.build import build_autoencoder
from vaeft.model.io import load_with_architecture, save_diffusers
from vaeft.train import determinism
from vaeft.train import distributed as dist_
from vaeft.train.checkpoint import CheckpointStore, StateError, StateLock, run_config, state_dir
from vaeft.train.determinism import deterministic_mode
from vaeft.train.divergence import DivergenceGuard, weight_norm, weight_norm_tensor
from vaeft.train.gan import DiscriminatorInitError, base_discriminator, write_discriminator
from vaeft.train.logs import (
    PERF_COLUMNS,
    ReconstructionGrids,
    check_curve_target,
    log_csv,
    memory_mb,
    perf_log_path,
    print_row,
    tensorboard_writer,
    write_curve,
)
from vaeft.train.step import StepResult, TrainStep, eager

PHASES = ("pretrain", "ema", "mse")
MAX_CONSECUTIVE_NONFINITE = 20


class DivergedError(VaeftError, RuntimeError):
    """The run exploded: its checkpoints from the step before the explosion on are deleted."""


class NonFiniteError(DivergedError):
    pass


class ReplicaMismatchError(VaeftError, RuntimeError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a whole step; the message says where and how to resume."""


class _DeferredInterrupt:
    """Turn the first SIGINT into a flag the loop reads between steps.

    Stopping inside a step could leave the optimizer stepped and the EMA not, which a checkpoint
    must never capture; a second Ctrl-C still interrupts at once. Only single-process runs: the
    ranks of a torchrun job would see the signal at different steps and disagree on the last
    collective, so they keep the default behaviour (resume from the last periodic checkpoint).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.hit = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self) -> _DeferredInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


@dataclass(frozen=True)
class TrainResult:
    phase: str
    out_dir: Path
    steps: int
    resumed_from: int
    skipped_steps: int
    final_loss: float
    seconds: float


@dataclass
class Progress:
    """The loop's counters as one checkpointed part: the step counter, the loader's position
    (micro-batches drawn by each rank; a batch is a pure function of it), skipped steps, log rows."""

    step: int = 0
    micro_batch: int = 0
    skipped: int = 0
    log: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batch": self.micro_batch, "skipped": self.skipped, "log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_batch = int(state["step"]), int(state["micro_batch"])
        self.skipped, self.log = int(state["skipped"]), list(state["log"])


def phase_params(params: Params, phase: str) -> TrainPhaseParams:
    if phase not in PHASES:
        raise ValueError(f"unknown training phase {phase!r} (expected one of {', '.join(PHASES)})")
    return getattr(params.train, phase)


def build_loss(cfg: TrainPhaseParams) -> ReconstructionLoss:
    """The phase's loss; with LPIPS on, its backbone must be in the weight store (else
    MissingWeightsError naming `vaeft weights pull lpips-NET`) - checked before any training."""
    lpips = None
    if cfg.loss.lpips > 0:
        from vaeft.losses.lpips import load_lpips_loss

        # bf16 phases run LPIPS's backbone in bf16 too (normalisation and distance stay fp32).
        lpips = load_lpips_loss(cfg.loss.lpips_net, torch.bfloat16 if cfg.precision == "bf16" else None)
    return ReconstructionLoss(cfg.loss, lpips)


def check_outputs(out_dir: str | Path, log_file: str | Path | None, inputs: list[str | Path | None],
                  force: bool = False) -> None:
    """Refuse, before any training, an ``out_dir`` or log that would destroy something else."""
    ins = [p for p in inputs if p is not None and not is_url(p)]  # a URL cannot be overwritten from here
    atomic.check_dir_target(out_dir, "model", force=force, inputs=ins)
    if log_file is not None:
        atomic.check_file_target(log_file, (".csv",), force=force, inputs=ins)
        check_curve_target(log_file, force=force, inputs=ins)


def train_phase(
    phase: str,
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    init: str | Path | None = None,
    log_file: str | Path | None = None,
    state_root: str | Path = ".vaeft/state",
    crops_dir: str | Path | None = None,
    *,
    force: bool = False,
    fresh: bool = False,
) -> TrainResult:
    """Train one phase and write its model to ``out_dir`` (resumes from ``state_root`` if possible).

    ``crops_dir``: materialised crops (the ``augment`` stage) to train on instead of online crops.
    ``force``: replace ``out_dir`` even when it is not a model folder vaeft wrote.
    ``fresh``: move this output's saved state aside (kept, renamed) and start from step 0.
    """
    check_outputs(out_dir, log_file, [data_dir, init, crops_dir], force)
    cfg = phase_params(params, phase)
    # Before the process group and the first CUDA op: cuBLAS reads its workspace setting once.
    with deterministic_mode(determinism.requested(cfg.deterministic)):
        ctx = dist_.init_distributed()
        state = state_dir(state_root, phase, out_dir)
        try:
            # Rank 0 writes the output and the state: it alone holds the lock, for the whole run.
            with StateLock(state, out_dir) if ctx.is_main else contextlib.nullcontext():
                return _train(phase, params, cfg, ctx, data_dir if is_url(data_dir) else Path(data_dir),
                              Path(out_dir), init,
                              Path(log_file) if log_file is not None else None, state,
                              Path(crops_dir) if crops_dir is not None else None, force, fresh)
        finally:
            dist_.shutdown(ctx)


def _train(phase: str, params: Params, cfg: TrainPhaseParams, ctx: dist_.DistContext, data_dir: str | Path,
           out_dir: Path, init: str | Path | None, log_file: Path | None, state: Path,
           crops_dir: Path | None, force: bool = False, fresh: bool = False) -> TrainResult:
    main = ctx.is_main
    device = ctx.device
    global_batch = cfg.batch_size * cfg.accumulate * ctx.world_size
    if main:
        banner(f"train {phase}", f"{cfg.steps} steps, batch {global_batch} ({cfg.batch_size} x {cfg.accumulate} "
                                 f"accumulated x {ctx.world_size} processes), {cfg.trainable} -> {out_dir}")
    loss_fn = build_loss(cfg).to(device)

    torch.manual_seed(params.seed)
    if init is None:
        vae = build_autoencoder(params.model.architecture)
        init_digest = "scratch"
    else:
        vae = load_with_architecture(init, params.model.architecture)
        init_digest = tree_sha256(init)
    runner = TrainStep(cfg, vae, loss_fn, device, params.seed, ctx)
    ema, noise, named, gan = runner.ema, runner.noise, runner.named, runner.gan
    if gan is not None and cfg.gan.init == "from-base":
        source = gan.load_base(init)  # a checkpoint restored below supersedes it
        if main:
            console.print(f"discriminator from {source}")

    store = CheckpointStore(
        state,
        run_config(
            phase=phase,
            train=cfg.model_dump(mode="json"),
            augment=params.augment.resume_key(),
            seed=params.seed,
            init=init_digest,
            # The manifest's bytes: a run may resume from a local copy of a remote dataset or back.
            data=manifest_sha256(data_dir),
            crops=tree_sha256(Path(crops_dir) / INDEX_FILE) if has_crops(crops_dir) else None,
            world_size=ctx.world_size,
        ),
        keep=cfg.keep_checkpoints,
    )
    counters = Progress()
    # Rank 0 looks first (it holds the lock): it moves state aside, cleans a killed write's
    # temporary files and sets damaged checkpoints aside; the others then only read.
    if main:
        if fresh and (moved := store.move_aside()) is not None:
            console.print(f"--fresh: previous training state moved aside to {moved}")
        if removed := store.clean_temp():
            console.print(f"removed {len(removed)} temporary file(s) a killed run left in {store.dir}")
    saved = store.load() if main else None
    dist_.barrier(ctx)
    if not main:
        saved = store.load(readonly=True)
    if saved is not None:
        parts = saved["parts"]
        try:
            runner.load_state_dict(parts["train_step"])
            noise.set_state(parts["noise_rng"][ctx.rank])
        except RuntimeError as err:
            # The random streams live on the training device: a CPU run's state does not fit a GPU's.
            if "rng state" not in str(err).lower() and "generator" not in str(err).lower():
                raise
            raise StateError(f"the training state in {store.dir} was saved on another kind of device "
                             f"({' '.join(str(err).split())[:160]}); resume it there, or pass --fresh") from None
        counters.load_state_dict(parts["progress"])
        if counters.step > cfg.steps:
            raise StateError(f"the training state in {store.dir} is at step {counters.step}, past steps = "
                             f"{cfg.steps}: raise steps, or pass --fresh to move it aside and start over")
        if main:
            console.print(f"resuming {phase} from step {counters.step} ({store.dir})")
    start, skipped, log_rows = counters.step, counters.skipped, counters.log
    if main:
        console.print(f"loss = {loss_fn.describe()}; LPIPS {'on' if cfg.loss.lpips else 'off (weight 0)'}; "
                      f"GAN {cfg.gan.kind + ' from step ' + str(cfg.gan.disc_start) if cfg.gan else 'off'}; "
                      f"{cfg.precision}; device {device}")

    grids = (ReconstructionGrids(log_file, data_dir, params.augment.crop_size, cfg.image_count)
             if main and log_file is not None and cfg.image_every else None)
    tb = tensorboard_writer(log_file) if main else None
    guard = DivergenceGuard(weight_norm(runner.g_params))
    # The reconstruction terms, never negative (the total can be: the GAN term, a learned logvar).
    recon_terms = [*loss_fn.terms, *(["lpips"] if loss_fn.lpips is not None else [])]
    last_loss = math.nan
    t0 = time.perf_counter()
    curve_at = 0.0  # when the PNG curve was last drawn (live: at most every CURVE_EVERY_S)
    acc = cfg.accumulate
    step_images = cfg.batch_size * acc * ctx.world_size
    checks = _DeferredChecks(ctx, guard, recon_terms, skipped, main)
    t_window = time.perf_counter()
    loader = iter(train_batches(data_dir, params.augment, params.seed, cfg.batch_size, counters.micro_batch, cfg.steps * acc,
                                cfg.num_workers, rank=ctx.rank, world_size=ctx.world_size, crops_dir=crops_dir))
    interrupt = _DeferredInterrupt(not ctx.enabled)

    def settle() -> None:
        """Judge the steps not judged yet; a diverged or stuck run is rolled back and stops here."""
        failure = checks.settle()
        if failure is not None:
            bad_step, reason, error = failure
            raise error(_rolled_back(ctx, store, phase, bad_step, reason))

    with progress() as bar, interrupt:
        task = bar.add_task(f"train {phase}", total=cfg.steps, completed=start, info="", visible=main)
        for step in range(start, cfg.steps):
            if interrupt.hit:
                settle()
                _save_checkpoint(ctx, store, runner, Progress(step, step * acc, checks.skipped, log_rows))
                message = (f"interrupted at step {step} of {cfg.steps}; checkpoint in {store.dir}; "
                           f"run the same command to resume")
                # Printed here: the CLI framework turns Ctrl-C into a bare exit status 130.
                console.print(f"[red]{message}[/]")
                raise TrainingInterrupted(message)
            result = runner(step, loader)
            checks.add(step, result, weight_norm_tensor(runner.g_params))
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            grid_now = grids is not None and done % cfg.image_every == 0
            checkpoint_now = done % cfg.checkpoint_every == 0 and done < cfg.steps
            if not (log_now or grid_now or checkpoint_now):
                bar.update(task, advance=1)
                continue
            # The step's flags are read here only: waiting for the device every step would stall
            # its queue. No checkpoint is written before the steps it holds were judged.
            settle()
            if not checks.last_ok:
                bar.update(task, advance=1)
                continue
            if log_now:
                logs, grad_norm = result.logs, result.grad_norm
                last_loss = float(logs["loss"])
                now = time.perf_counter()
                row = {"step": done, **{k: float(v) for k, v in logs.items()}, "grad_norm": float(grad_norm),
                       "lr": cfg.lr, "img_per_s": checks.good_since_log * step_images / max(now - t_window, 1e-9),
                       "mem_mb": memory_mb(device)}
                t_window = now
                checks.good_since_log = 0
                if main:
                    log_rows.append(row)
                    elapsed = time.perf_counter() - t0
                    print_row(phase, row, cfg.steps, elapsed / (done - start) * (cfg.steps - done))
                    if log_file is not None:  # as it goes, so a live run can be plotted
                        curve_at = _write_logs(log_file, log_rows, phase, curve_at)
                    if tb is not None:
                        for k, v in row.items():
                            if k != "step":
                                tb.add_scalar(f"{phase}/{k}", v, done)
            if grid_now:
                with eager():  # another batch, no grad: the compiled blocks would recompile
                    grids.write(vae, done, device)
            bar.update(task, advance=1, info=f"loss {last_loss:.4f}")
            if checkpoint_now:
                _save_checkpoint(ctx, store, runner, Progress(done, done * acc, checks.skipped, log_rows))
    skipped = checks.skipped

    if ema is not None and not math.isfinite(weight_norm(list(ema.shadow.values()))):
        raise DivergedError(_rolled_back(ctx, store, phase, cfg.steps, "non-finite EMA weights"))
    digests = dist_.replica_digests(ctx, {**named, **(ema.shadow if ema is not None else {})})
    if len(set(digests)) != 1:
        raise ReplicaMismatchError(f"{phase}: the {ctx.world_size} replicas ended different: {digests}")
    if ema is not None:
        ema.copy_to(vae)
    seconds = time.perf_counter() - t0
    if main:
        vae.eval()
        # D rides along in the model folder, so a later phase can start from it (gan.init: from-base).
        save_diffusers(vae.to("cpu"), out_dir, force=force, extra=gan.save_files if gan is not None else None)
        provenance.write_run_info(
            out_dir, f"train-{phase}", {f"train.{phase}": cfg, "augment": params.augment, "model": params.model},
            init=str(init) if init is not None else None, seed=params.seed, steps=cfg.steps,
            skipped_steps=skipped, weights="ema" if ema is not None else "raw",
            world_size=ctx.world_size, global_batch=global_batch, replica_sha256=digests,
        )
        provenance.record_run(out_dir, f"train-{phase}")
        if log_file is not None:
            _write_logs(log_file, log_rows, phase)
        if tb is not None:
            tb.close()
        store.clear()
        console.print(f"train {phase}: {cfg.steps} steps in {seconds:.1f}s, final loss {last_loss:.4f}, "
                      f"{ctx.world_size} replica(s) identical -> {out_dir}")
    dist_.barrier(ctx)
    return TrainResult(phase, out_dir, cfg.steps, start, skipped, last_loss, seconds)


class _DeferredChecks:
    """The per-step checks (skipped steps, the divergence guard) on values read in batches.

    :meth:`add` keeps a step's device tensors; :meth:`settle` reads all kept steps at once and
    judges them in step order, as if each had been judged when it ran: a NaN or an explosion is
    caught at the next log, grid or checkpoint step (at most ``log_every`` steps later), and the
    first bad step is what the rollback names. The ranks agree on the earliest bad step.
    """

    def __init__(self, ctx: dist_.DistContext, guard: DivergenceGuard, recon_terms: list[str], skipped: int,
                 main: bool) -> None:
        self.ctx, self.guard, self.recon_terms, self.main = ctx, guard, recon_terms, main
        self.skipped, self.consecutive_bad, self.good_since_log = skipped, 0, 0
        self.last_ok = True
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, result: StepResult, weights: torch.Tensor) -> None:
        loss = sum((result.logs[k].float() for k in self.recon_terms), torch.zeros((), device=weights.device))
        values = torch.stack([result.finite.float().to(weights.device), loss.to(weights.device),
                              result.grad_norm.float().to(weights.device), weights.float()])
        self._pending.append((step, values))

    def settle(self) -> tuple[int, str, type[DivergedError]] | None:
        """None, or (first bad step, why, the error to raise) once all ranks agree on it."""
        if not self._pending:
            return None
        rows = torch.stack([v for _, v in self._pending]).tolist()
        steps = [s for s, _ in self._pending]
        self._pending = []
        failure: tuple[int, str, type[DivergedError]] | None = None
        for step, (finite, loss, grad_norm, weights) in zip(steps, rows, strict=True):
            self.last_ok = bool(finite)
            if not self.last_ok:
                self.skipped += 1
                self.consecutive_bad += 1
                if self.main:
                    console.print(f"[yellow]step {step + 1}: non-finite loss or gradient, step skipped[/]")
                reason = self.guard.check_skipped(weights)
                if reason is None and self.consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                    first = step + 1 - self.consecutive_bad
                    failure = (first, f"{self.consecutive_bad} consecutive non-finite steps", NonFiniteError)
                    break
            else:
                self.consecutive_bad = 0
                self.good_since_log += 1
                reason = self.guard.check_step(loss, grad_norm, weights)
            if reason is not None:
                failure = (step, reason, DivergedError)
                break
        # Every rank sees the same weights and gradient norms but its own loss: decide together,
        # on the earliest step any rank found bad.
        none = 2**62
        first_bad = dist_.min_over_ranks(self.ctx, failure[0] if failure is not None else none)
        if first_bad == none:
            return None
        if failure is None or failure[0] != first_bad:
            return first_bad, "on another rank", DivergedError
        return failure


def _rolled_back(ctx: dist_.DistContext, store: CheckpointStore, phase: str, step: int, reason: str) -> str:
    """Delete the checkpoints that may hold the explosion and say what is left, in one line.

    ``step`` (0-based) is the first step that looked wrong; its weights came from the update of
    step - 1, which may already have been the explosion (its loss was finite), so checkpoints
    from ``step`` on (they hold that update) are dropped and the EMA never exports."""
    kept = store.discard_from(step) if ctx.is_main else None
    dist_.barrier(ctx)
    where = (f"rolled back to {kept[1]} (step {kept[0]}), which the next run resumes from"
             if kept else "no checkpoint before it was kept, so the next run starts from step 0")
    return (f"{phase}: training diverged at step {step + 1} ({reason}); no model written; {where}; "
            f"lower train.{phase}.lr or check the data")


# Drawing the PNG takes tens of ms: on short log intervals it would slow a toy run noticeably.
CURVE_EVERY_S = 30.0


def _write_logs(log_file: Path, log_rows: list[dict], phase: str, curve_at: float | None = None) -> float:
    """The CSVs every time; the PNG curve when ``curve_at`` is None (the end) or long enough ago.
    Returns when the curve was last drawn."""
    atomic.write_text(log_file, log_csv(log_rows, drop=PERF_COLUMNS))
    atomic.write_text(perf_log_path(log_file), log_csv(log_rows, columns=PERF_COLUMNS))
    now = time.perf_counter()
    if curve_at is None or now - curve_at >= CURVE_EVERY_S:
        write_curve(log_file, log_rows, phase)
        return now
    return curve_at


def _save_checkpoint(ctx: dist_.DistContext, store: CheckpointStore, runner: TrainStep, counters: Progress) -> None:
    """A checkpoint is the sum of the parts' state dicts; every rank's sampling noise state goes
    into rank 0's file, and only rank 0 writes."""
    noise_states = [runner.noise.get_state()]
    if ctx.enabled:
        import torch.distributed as dist

        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, runner.noise.get_state())
        noise_states = gathered
    if ctx.is_main:
        store.save(counters.step, {"train_step": runner.state_dict(), "noise_rng": noise_states,
                                   "progress": counters.state_dict()})
    dist_.barrier(ctx)


def prepare_base(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    log_file: str | Path | None = None,
    state_root: str | Path = ".vaeft/state",
    crops_dir: str | Path | None = None,
    *,
    force: bool = False,
    fresh: bool = False,
) -> TrainResult:
    """The ``pretrain`` stage: import ``model.base`` if set, else pretrain from scratch."""
    if params.model.base is None:
        return train_phase("pretrain", params, data_dir, out_dir, None, log_file, state_root, crops_dir=crops_dir,
                           force=force, fresh=fresh)
    if not Path(params.model.base).exists():
        from vaeft.weights import missing_model_hint

        raise VaeftError(f"model.base {missing_model_hint(params.model.base)}")
    check_outputs(out_dir, log_file, [data_dir, params.model.base, crops_dir], force)
    banner("pretrain", f"model.base is set: importing {params.model.base} (no pretraining)")
    t0 = time.perf_counter()
    vae = load_with_architecture(params.model.base, params.model.architecture)
    # The base's discriminator (an LDM training checkpoint's, or a GAN phase's) is kept beside it,
    # for gan.init: from-base. This reads the base a second time: a one-off import.
    try:
        disc, adam, _ = base_discriminator(params.model.base)
    except DiscriminatorInitError:
        disc = adam = None
    save_diffusers(vae, out_dir, force=force,
                   extra=(lambda d: write_discriminator(d, disc, adam)) if disc is not None else None)
    provenance.write_run_info(out_dir, "pretrain", {"model": params.model}, imported_from=params.model.base)
    provenance.record_run(out_dir, "pretrain")
    if log_file is not None:
        atomic.write_text(log_file, "step,loss\n")
        write_curve(log_file, [], "pretrain (imported base)")
    return TrainResult("pretrain", Path(out_dir), 0, 0, 0, math.nan, time.perf_counter() - t0)

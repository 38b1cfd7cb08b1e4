"""The training engine: one function runs one phase (pretrain, ft-EMA or ft-MSE).

Decoder-only phases run the frozen encoder under ``no_grad`` and sample z = mean + std * eps
fresh every step (as LDM trained). The phase's output is a diffusers folder of the EMA weights
(or the raw weights when ``ema`` is off), plus a CSV log DVC can plot.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vaeft import atomic, provenance
from vaeft.augment.materialize import INDEX_FILE, has_crops
from vaeft.config import Params, TrainPhaseParams
from vaeft.console import banner, console, progress
from vaeft.data.loader import to_model_range, train_batches
from vaeft.data.manifest import MANIFEST_FILE
from vaeft.errors import VaeftError
from vaeft.losses.reconstruction import ReconstructionLoss
from vaeft.model.build import build_autoencoder
from vaeft.model.freeze import configure_trainable
from vaeft.model.io import load_with_architecture, save_diffusers
from vaeft.hashing import tree_sha256
from vaeft.train.checkpoint import CheckpointStore, fingerprint
from vaeft.train.ema import Ema

PHASES = ("pretrain", "ema", "mse")
MAX_CONSECUTIVE_NONFINITE = 20


class NonFiniteError(VaeftError, RuntimeError):
    pass


@dataclass(frozen=True)
class TrainResult:
    phase: str
    out_dir: Path
    steps: int
    resumed_from: int
    skipped_steps: int
    final_loss: float
    seconds: float


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def phase_params(params: Params, phase: str) -> TrainPhaseParams:
    if phase not in PHASES:
        raise ValueError(f"unknown training phase {phase!r} (expected one of {', '.join(PHASES)})")
    return getattr(params.train, phase)


def _log_csv(rows: list[dict[str, float]]) -> str:
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def train_phase(
    phase: str,
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    init: str | Path | None = None,
    log_file: str | Path | None = None,
    state_root: str | Path = ".vaeft/state",
    crops_dir: str | Path | None = None,
) -> TrainResult:
    """Train one phase and write its model to ``out_dir`` (resumes from ``state_root`` if possible).

    ``crops_dir``: materialised crops (the ``augment`` stage) to train on instead of online crops.
    """
    cfg = phase_params(params, phase)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    banner(f"train {phase}", f"{cfg.steps} steps, batch {cfg.batch_size}, {cfg.trainable} -> {out_dir}")
    loss_fn = ReconstructionLoss(cfg.loss)
    device = pick_device()

    torch.manual_seed(params.seed)
    if init is None:
        vae = build_autoencoder(params.model.architecture)
        init_digest = "scratch"
    else:
        vae = load_with_architecture(init, params.model.architecture)
        init_digest = tree_sha256(init)
    vae.to(device)
    named = configure_trainable(vae, cfg.trainable)
    opt = torch.optim.Adam(named.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = Ema(named, cfg.ema_decay) if cfg.ema else None
    noise = torch.Generator().manual_seed(params.seed + 1)

    store = CheckpointStore(
        Path(state_root) / phase,
        fingerprint(
            phase=phase,
            train=cfg.model_dump(mode="json"),
            augment=params.augment.model_dump(mode="json"),
            seed=params.seed,
            init=init_digest,
            data=tree_sha256(data_dir / MANIFEST_FILE),
            crops=tree_sha256(Path(crops_dir) / INDEX_FILE) if has_crops(crops_dir) else None,
        ),
        keep=cfg.keep_checkpoints,
    )
    start, skipped, log_rows = 0, 0, []
    state = store.latest()
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        noise.set_state(state["noise_rng"])
        start, skipped, log_rows = state["step"], state["skipped"], list(state["log"])
        console.print(f"resuming {phase} from step {start} ({store.dir})")
    console.print(f"loss = {loss_fn.describe()}; LPIPS {'on' if cfg.loss.lpips else 'off (weight 0)'}; device {device}")

    decoder_only = cfg.trainable == "decoder"
    consecutive_bad = 0
    last_loss = math.nan
    t0 = time.perf_counter()
    t_window, n_window = time.perf_counter(), 0
    loader = train_batches(data_dir, params.augment, params.seed, cfg.batch_size, start, cfg.steps, cfg.num_workers,
                           crops_dir=crops_dir)
    with progress() as bar:
        task = bar.add_task(f"train {phase}", total=cfg.steps, completed=start, info="")
        for step, batch in enumerate(loader, start=start):
            x = to_model_range(batch, device)
            if decoder_only:
                with torch.no_grad():
                    posterior = vae.encode(x).latent_dist
            else:
                posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=noise)
            x_hat = vae.decode(z).sample
            kl = posterior.kl() if (cfg.loss.kl > 0 and not decoder_only) else None
            loss, logs = loss_fn(x, x_hat, kl)
            opt.zero_grad(set_to_none=True)
            ok = torch.isfinite(loss).item()
            if ok:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(named.values(), cfg.grad_clip or math.inf)
                ok = torch.isfinite(grad_norm).item()
            if not ok:
                skipped += 1
                consecutive_bad += 1
                opt.zero_grad(set_to_none=True)
                console.print(f"[yellow]step {step}: non-finite loss or gradient, step skipped[/]")
                if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                    raise NonFiniteError(
                        f"{phase}: {consecutive_bad} consecutive non-finite steps at step {step}; "
                        f"stopping (last good checkpoint kept in {store.dir})"
                    )
                bar.update(task, advance=1)
                continue
            consecutive_bad = 0
            opt.step()
            if ema is not None:
                ema.update(named)
            last_loss = logs["loss"]
            n_window += x.shape[0]
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                row = {"step": done, **logs, "grad_norm": float(grad_norm), "lr": cfg.lr,
                       "img_per_s": n_window / max(now - t_window, 1e-9)}
                log_rows.append(row)
                t_window, n_window = now, 0
            bar.update(task, advance=1, info=f"loss {last_loss:.4f}")
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                store.save(done, {
                    "model": vae.state_dict(),
                    "optimizer": opt.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "noise_rng": noise.get_state(),
                    "skipped": skipped,
                    "log": log_rows,
                })

    if ema is not None:
        ema.copy_to(vae)
    vae.eval()
    save_diffusers(vae.to("cpu"), out_dir)
    provenance.write_run_info(
        out_dir, f"train-{phase}", {f"train.{phase}": cfg, "augment": params.augment, "model": params.model},
        init=str(init) if init is not None else None, seed=params.seed, steps=cfg.steps,
        skipped_steps=skipped, weights="ema" if ema is not None else "raw",
    )
    if log_file is not None:
        atomic.write_text(log_file, _log_csv(log_rows))
    store.clear()
    seconds = time.perf_counter() - t0
    console.print(f"train {phase}: {cfg.steps} steps in {seconds:.1f}s, final loss {last_loss:.4f} -> {out_dir}")
    return TrainResult(phase, out_dir, cfg.steps, start, skipped, last_loss, seconds)


def prepare_base(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    log_file: str | Path | None = None,
    state_root: str | Path = ".vaeft/state",
) -> TrainResult:
    """The ``pretrain`` stage: import ``model.base`` if set, else pretrain from scratch."""
    if params.model.base is None:
        return train_phase("pretrain", params, data_dir, out_dir, None, log_file, state_root)
    banner("pretrain", f"model.base is set: importing {params.model.base} (no pretraining)")
    t0 = time.perf_counter()
    vae = load_with_architecture(params.model.base, params.model.architecture)
    save_diffusers(vae, out_dir)
    provenance.write_run_info(out_dir, "pretrain", {"model": params.model}, imported_from=params.model.base)
    if log_file is not None:
        atomic.write_text(log_file, "step,loss\n")
    return TrainResult("pretrain", Path(out_dir), 0, 0, 0, math.nan, time.perf_counter() - t0)

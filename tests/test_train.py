"""The training engine at toy scale: freezing, EMA maths, exact resume after SIGKILL, divergence."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vaeft.cli import main
from vaeft.config import load_params, parse_params
from vaeft.model.freeze import configure_trainable, encoder_state, is_decoder_side
from vaeft.model.io import load_autoencoder
from vaeft.train.checkpoint import state_dir
from vaeft.train.divergence import DivergenceGuard
from vaeft.train.ema import Ema
from vaeft.train.engine import DivergedError, train_phase

from .conftest import tiny_params_dict

WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_finetune_trains_decoder_side_only(tmp_path, curated, base_model, tiny_params):
    before = load_autoencoder(base_model)
    frozen_before = encoder_state(before)
    result = train_phase("ema", tiny_params, curated, tmp_path / "ft", init=base_model,
                         log_file=tmp_path / "log.csv", state_root=tmp_path / "state")
    after = load_autoencoder(result.out_dir)
    frozen_after = encoder_state(after)
    assert frozen_after.keys() == frozen_before.keys() and frozen_before
    for k in frozen_before:
        assert torch.equal(frozen_before[k], frozen_after[k]), k  # bit-identical
    moved = [k for k, v in after.state_dict().items() if is_decoder_side(k) and not torch.equal(v, before.state_dict()[k])]
    assert moved, "the decoder did not train"
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and "l1" in log[0] and len(log) == 1 + tiny_params.train.ema.steps // 2
    # ... and its curve as a PNG beside it: a real image, with the loss line drawn across the plot.
    from PIL import Image

    png = Image.open(tmp_path / "log.png")
    assert png.format == "PNG" and png.size == (640, 360)
    line = np.all(np.asarray(png.convert("RGB")) == (31, 119, 180), axis=2)[26:330, 64:624]  # the plot area
    cols = np.flatnonzero(line.any(axis=0))
    assert cols.size and cols.min() <= 2 and cols.max() >= line.shape[1] - 3  # first step to last
    assert np.ptp(np.flatnonzero(line.any(axis=1))) > 20  # the loss moved: not a flat line
    assert not list((tmp_path / "state").rglob("*.pt"))  # state cleared after success


def test_configure_trainable_modes(base_model):
    vae = load_autoencoder(base_model)
    named = configure_trainable(vae, "decoder")
    assert named and all(is_decoder_side(n) for n in named)
    assert not vae.encoder.training and vae.decoder.training
    assert not any(p.requires_grad for n, p in vae.named_parameters() if not is_decoder_side(n))
    assert len(configure_trainable(vae, "all")) == len(list(vae.parameters()))


def test_ema_warmup_golden_values():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = Ema({"w": p}, decay=0.9999)
    # LitEma increments num_updates before computing its decay: the first decays are 2/11, 3/12, 4/13.
    assert [round(d, 4) for d in _decays(Ema({"w": p}, decay=0.9999), p, 4)] == [0.1818, 0.25, 0.3077, 0.3571]
    expected = torch.zeros(3)
    for value in [1.0, 2.0, 4.0]:
        with torch.no_grad():
            p.fill_(value)
        d = ema.current_decay()
        expected = expected - (1 - d) * (expected - value)
        ema.update({"w": p})
    assert torch.allclose(ema.shadow["w"], expected)
    # By hand: (9/11)*1 = 0.818181...; + (3/4)*(2 - 0.818181) = 1.704545...; + (9/13)*(4 - 1.704545) = 3.293706...
    assert ema.shadow["w"][0].item() == pytest.approx(3.2937063, abs=1e-6)
    assert ema.num_updates == 3
    # The cap: decay never exceeds its setting once (1 + n) / (10 + n) passes it.
    assert Ema({"w": p}, decay=0.5).current_decay() == pytest.approx(2 / 11)
    late = Ema({"w": p}, decay=0.5)
    late.num_updates = 100
    assert late.current_decay() == 0.5


def _decays(ema: Ema, p: torch.nn.Parameter, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(ema.current_decay())
        ema.update({"w": p})
    return out


def _write_params(path: Path, **ema_overrides) -> Path:
    raw = tiny_params_dict()
    raw["train"]["ema"].update(ema_overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_cmd(params: Path, init: Path, data: Path, out: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "vaeft", "train", "ema", "--params", str(params), "--init", str(init),
            "--data", str(data), "--out", str(out), "--state-dir", str(state)]


def test_resume_after_sigkill_is_bit_exact(tmp_path, curated, base_model):
    """A run SIGKILLed mid-run (here just after its first checkpoint, with steps to go) and started
    again ends with the same bytes as a run never killed.

    The run never killed trains in this process while the resumed one runs (one thread each, so
    on two cores they overlap; a third interpreter would only add its imports): the same bytes from
    another process are a stronger check, not a weaker one. The checkpoint pruning (keep 2) runs in
    the resumed part.
    """
    params = _write_params(tmp_path / "params.yaml", steps=16, checkpoint_every=4, keep_checkpoints=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _train_cmd(params, base_model, curated, tmp_path / "b", tmp_path / "sb")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = None
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "sb").glob("ema-b-*/step-*.pt")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "b").exists(), "killed too late: the run had finished"

        resumed = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        train_phase("ema", load_params(params), curated, tmp_path / "a", init=base_model, state_root=tmp_path / "sa")
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-3000:]
    finally:
        for p in (proc, resumed):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    resumed_from = re.search(r"resuming ema from step (\d+)", err)
    assert resumed_from and 0 < int(resumed_from.group(1)) < 16, err[-3000:]
    a, b = load_file(tmp_path / "a" / WEIGHTS), load_file(tmp_path / "b" / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()


def _diverge_at(k: int, params, curated, base_model, tmp_path) -> tuple[DivergedError, int]:
    """Train ema with optimizer step k's lr at 1e30 (0-based; its own loss is finite); returns the
    divergence error and how many optimizer steps ran."""
    calls = {"n": 0}

    def huge_lr(opt, args, kwargs):
        calls["n"] += 1
        opt.param_groups[0]["lr"] = 1e30 if calls["n"] == k + 1 else params.train.ema.lr

    handle = register_optimizer_step_pre_hook(huge_lr)
    try:
        with pytest.raises(DivergedError) as err:
            train_phase("ema", params, curated, tmp_path / "out", init=base_model, state_root=tmp_path / "state")
    finally:
        handle.remove()
    return err.value, calls["n"]


def test_explosion_at_step_k_rolls_back_and_fails(tmp_path, curated, base_model):
    """Step k's update uses lr 1e30 (its own loss is finite): the run stops there with one line naming
    the step and a checkpoint written before it that still exists, deletes none of the earlier ones,
    keeps only sane weights and EMA, and writes no model."""
    k = 5  # 0-based: the 6th step; checkpoints at steps 2 and 4 are before it
    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=8, checkpoint_every=2, keep_checkpoints=10, grad_clip=None)
    err, calls = _diverge_at(k, parse_params(raw), curated, base_model, tmp_path)
    message = str(err)
    kept = state_dir(tmp_path / "state", "ema", tmp_path / "out") / "step-000000004.pt"
    assert "weight" in message.split(";")[0]  # found in the weights it wrote, before any non-finite loss
    assert "\n" not in message and f"diverged at step {k + 1} (" in message and str(kept) in message
    assert sorted(p.name for p in kept.parent.glob("step-*.pt")) == [f"step-00000000{i}.pt" for i in (2, 4)]
    assert not (tmp_path / "out").exists()
    state = torch.load(kept, weights_only=True)
    shadow = state["parts"]["train_step"]["ema"]["shadow"]
    assert state["step"] == 4 and all(t.abs().max() < 100 for t in shadow.values())


def test_diverged_run_exits_nonzero_with_one_line(tmp_path, curated, base_model, capsys):
    """lr 1e30 from the first step, 5 steps (fewer than the 20 non-finite steps that used to stop a
    run, so it used to end with exit 0 and weights of 1e30): exit 2, one line, no model."""
    params = _write_params(tmp_path / "params.yaml", steps=5, lr=1e30, grad_clip=None, loss={"mse": 1.0},
                           checkpoint_every=1, keep_checkpoints=5)
    with pytest.raises(SystemExit) as exit_:
        main(_train_cmd(params, base_model, curated, tmp_path / "out", tmp_path / "state")[3:])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ema: training diverged at step 1 ("), err
    assert "next run starts from step 0" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "state").rglob("step-*.pt"))


def test_divergence_guard_thresholds():
    guard = DivergenceGuard(initial_weight_norm=10.0)
    assert guard.check_step(1.0, 50.0, 10.5) is None
    assert "weight norm" in guard.check_step(1.0, 50.0, 110.0)  # > 10x the median of the weights so far
    for loss in (0.9, 1.2, 0.8, 1.0):  # a noisy but sane run
        assert guard.check_step(loss, 50.0, 10.5) is None
    assert guard.check_step(60.0, 1000.0, 10.5) is None  # 60x the loss, 20x the gradient: a bad batch
    assert "reconstruction loss" in guard.check_step(150.0, 50.0, 10.5)  # finite, 150x the median
    assert "gradient norm" in guard.check_step(1.0, 6000.0, 10.5)
    assert guard.check_skipped(10.6) is None and "non-finite" in guard.check_skipped(float("inf"))


def test_ctrl_c_checkpoints_at_the_interrupt_and_the_same_command_resumes(tmp_path, curated, base_model):
    params = _write_params(tmp_path / "params.yaml", steps=16, checkpoint_every=1000, log_every=1, keep_checkpoints=1)
    log = tmp_path / "log.csv"
    cmd = _train_cmd(params, base_model, curated, tmp_path / "out", tmp_path / "state") + ["--log", str(log)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # The CSV grows while training runs: wait for a few rows, then press Ctrl-C.
    while not log.exists() or len(log.read_text().splitlines()) < 4:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = next(line for line in err.splitlines() if "interrupted at step" in line)
    step = int(last.split("interrupted at step ")[1].split()[0])
    assert 3 <= step < 16 and last.endswith("run the same command to resume"), last
    assert [p.name for p in state_dir(tmp_path / "state", "ema", tmp_path / "out").glob("step-*.pt")] == [f"step-{step:09d}.pt"]
    rows = log.read_text().splitlines()
    assert rows[-1].startswith(f"{step},") and len(rows) == 1 + step  # every row up to the interrupt
    assert "/16, ETA " in err  # rows carry the total and an ETA

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming ema from step {step}" in resumed.stderr
    assert len(log.read_text().splitlines()) == 1 + 16


def test_deferred_checks_stop_within_log_every_steps(tmp_path, curated, base_model):
    """The step's flags are read at log steps only (no wait for the device per step): an explosion
    at step k is still named as step k, and the run stops by the next log step, with no
    checkpoint written after it."""
    k, log_every = 4, 4  # 0-based: the 5th step; judged at step 8
    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=16, log_every=log_every, checkpoint_every=100, grad_clip=None)
    err, calls = _diverge_at(k, parse_params(raw), curated, base_model, tmp_path)
    assert f"diverged at step {k + 1} (" in str(err)
    assert k + 1 < calls <= (k // log_every + 1) * log_every
    assert not list((tmp_path / "state").rglob("step-*.pt")) and not (tmp_path / "out").exists()

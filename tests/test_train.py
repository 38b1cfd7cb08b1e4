"""The training engine at toy scale: freezing, EMA maths, exact resume after SIGKILL, NaN handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vaeft.config import parse_params
from vaeft.model.freeze import configure_trainable, encoder_state, is_decoder_side
from vaeft.model.io import load_autoencoder
from vaeft.train.checkpoint import CheckpointStore
from vaeft.train.ema import Ema
from vaeft.train.engine import NonFiniteError, train_phase

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
    assert not list((tmp_path / "state" / "ema").glob("*.pt"))  # state cleared after success


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
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            p.fill_(value)
        d = min(0.9999, (1 + n) / (10 + n))  # LitEma's warm-up: 0.1, 0.1818..., 0.25
        expected = expected - (1 - d) * (expected - value)
        ema.update({"w": p})
    assert torch.allclose(ema.shadow["w"], expected)
    # By hand: 0.9*1 = 0.9; 0.9 + (9/11)*(2 - 0.9) = 1.8; 1.8 + 0.75*(4 - 1.8) = 3.45
    assert ema.shadow["w"][0].item() == pytest.approx(3.45, abs=1e-6)
    assert ema.num_updates == 3


def _write_params(path: Path, **ema_overrides) -> Path:
    raw = tiny_params_dict()
    raw["train"]["ema"].update(ema_overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_cmd(params: Path, init: Path, data: Path, out: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "vaeft", "train", "ema", "--params", str(params), "--init", str(init),
            "--data", str(data), "--out", str(out), "--state-dir", str(state)]


def test_resume_after_sigkill_is_bit_exact(tmp_path, curated, base_model):
    params = _write_params(tmp_path / "params.yaml", steps=60, checkpoint_every=10, keep_checkpoints=2)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(_train_cmd(params, base_model, curated, tmp_path / "a", tmp_path / "sa"),
                   check=True, env=env, capture_output=True, timeout=300)

    cmd = _train_cmd(params, base_model, curated, tmp_path / "b", tmp_path / "sb")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "sb" / "ema").glob("step-*.pt")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "resuming ema from step" in resumed.stderr
    a, b = load_file(tmp_path / "a" / WEIGHTS), load_file(tmp_path / "b" / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()


def test_nonfinite_steps_are_skipped_then_stop_with_last_good_checkpoint(tmp_path, curated, base_model):
    raw = tiny_params_dict()
    # One good step, then weights ~1e30: the next MSE overflows to inf on every step.
    raw["train"]["ema"].update(steps=40, lr=1e30, grad_clip=None, loss={"mse": 1.0}, checkpoint_every=1, keep_checkpoints=1)
    params = parse_params(raw)
    with pytest.raises(NonFiniteError, match="consecutive non-finite steps"):
        train_phase("ema", params, curated, tmp_path / "out", init=base_model, state_root=tmp_path / "state")
    assert not (tmp_path / "out").exists()
    ckpts = list((tmp_path / "state" / "ema").glob("step-*.pt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["ema"]["shadow"].values())  # EMA never absorbed NaN


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    a = CheckpointStore(tmp_path, "run-a", keep=2)
    for step in (1, 2, 3):
        a.save(step, {"x": torch.tensor(step)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002.pt", "step-000000003.pt"]
    assert a.latest()["step"] == 3
    (tmp_path / "step-000000004.pt").write_bytes(b"torn write")  # unreadable newest file is passed over
    assert a.latest()["step"] == 3
    assert CheckpointStore(tmp_path, "run-b", keep=2).latest() is None
    assert not list(tmp_path.glob("step-00000000[23].pt"))  # stale state removed


def test_ctrl_c_checkpoints_at_the_interrupt_and_the_same_command_resumes(tmp_path, curated, base_model):
    params = _write_params(tmp_path / "params.yaml", steps=60, checkpoint_every=1000, log_every=1, keep_checkpoints=1)
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
    assert 3 <= step < 60 and last.endswith("run the same command to resume"), last
    assert [p.name for p in (tmp_path / "state" / "ema").glob("step-*.pt")] == [f"step-{step:09d}.pt"]
    rows = log.read_text().splitlines()
    assert rows[-1].startswith(f"{step},") and len(rows) == 1 + step  # every row up to the interrupt
    assert "/60, ETA " in err  # rows carry the total and an ETA

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming ema from step {step}" in resumed.stderr
    assert len(log.read_text().splitlines()) == 1 + 60

"""The training engine at toy scale: freezing, EMA maths, exact resume after SIGKILL, NaN handling."""

from __future__ import annotations

import os
import re
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
from vaeft.train.checkpoint import state_dir
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
    """A run SIGKILLed mid-run (here just after its first checkpoint, with steps to go) and started
    again ends with the same bytes as a run never killed.

    The uninterrupted run and the one to kill start together: each is one process on one thread,
    so on two cores their start-up (most of the cost: imports) overlaps. Identical environments,
    so identical maths; the checkpoint pruning (keep 2) runs in the resumed part.
    """
    params = _write_params(tmp_path / "params.yaml", steps=24, checkpoint_every=4, keep_checkpoints=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    reference = subprocess.Popen(_train_cmd(params, base_model, curated, tmp_path / "a", tmp_path / "sa"),
                                 env=env, **quiet)
    cmd = _train_cmd(params, base_model, curated, tmp_path / "b", tmp_path / "sb")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "sb").glob("ema-b-*/step-*.pt")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "b").exists(), "killed too late: the run had finished"

        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True)
        _, err = reference.communicate(timeout=300)
        assert reference.returncode == 0, err[-3000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
                p.wait()
    resumed_from = re.search(r"resuming ema from step (\d+)", resumed.stderr)
    assert resumed_from and 0 < int(resumed_from.group(1)) < 24, resumed.stderr[-3000:]
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
    ckpts = list(state_dir(tmp_path / "state", "ema", tmp_path / "out").glob("step-*.pt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)["parts"]["train_step"]
    assert all(torch.isfinite(t).all() for t in state["ema"]["shadow"].values())  # EMA never absorbed NaN

"""Resumable state: kept across compatible changes, refused (never deleted) across others, verified
checkpoints, one locked state folder per output.

One real training run is SIGKILLed once per module after its second checkpoint; each test resumes
a copy of the state it left, in process, for a few steps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from vaeft.cli import main
from vaeft.config import parse_params
from vaeft.train.checkpoint import DAMAGED_SUFFIX, CheckpointStore, StateError, state_dir
from vaeft.train.engine import train_phase

from .conftest import tiny_params_dict

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _raw(**ema_overrides) -> dict:
    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=10_000, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    raw["train"]["ema"].update(ema_overrides)
    return raw


@dataclass(frozen=True)
class KilledRun:
    state: Path  # the state folder the killed run left (read-only for tests: copy it)
    steps: list[int]  # its checkpoints' steps, oldest first
    pid: int
    second_run: str  # the error a second run on the same output got while the first ran


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, curated, base_model) -> KilledRun:
    root = tmp_path_factory.mktemp("killed")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(_raw()))
    out, state_root = root / "out", root / "state"
    cmd = [sys.executable, "-m", "vaeft", "train", "ema", "--params", params, "--init", base_model,
           "--data", curated, "--out", out, "--state-dir", state_root]
    proc = subprocess.Popen([str(c) for c in cmd], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = state_dir(state_root, "ema", out)
    try:
        deadline = time.monotonic() + 240
        while len(list(folder.glob("step-*.pt"))) < 2:
            assert proc.poll() is None, "training ended before its second checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # A second run on the same output while the first holds it.
        with pytest.raises(StateError) as refused:
            train_phase("ema", parse_params(_raw()), curated, out, init=base_model, state_root=state_root)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    steps = sorted(int(p.name[5:14]) for p in folder.glob("step-*.pt"))
    return KilledRun(folder, steps, proc.pid, str(refused.value))


def _state_for(killed: KilledRun, state_root: Path, out: Path) -> Path:
    """The killed run's state, as the state of a run writing ``out`` under ``state_root``."""
    target = state_dir(state_root, "ema", out)
    shutil.copytree(killed.state, target)
    return target


def _resume(tmp_path, curated, base_model, killed: KilledRun, **overrides):
    overrides.setdefault("steps", killed.steps[-1] + 2)
    return train_phase("ema", parse_params(_raw(**overrides)), curated, tmp_path / "out", init=base_model,
                       state_root=tmp_path / "state", log_file=tmp_path / "log.csv")


def test_second_run_on_the_same_output_is_refused_naming_the_holder(killed_run):
    assert "another run is writing" in killed_run.second_run
    assert f"pid {killed_run.pid} on " in killed_run.second_run
    assert len(killed_run.steps) == 2


def test_compatible_changes_resume_and_a_kill_leaves_no_temp_files(tmp_path, curated, base_model, killed_run,
                                                                   capsys):
    state = _state_for(killed_run, tmp_path / "state", tmp_path / "out")
    # What a SIGKILL inside atomic_path leaves: a half-written temporary beside the checkpoints,
    # and the digest of a checkpoint that was never renamed into place.
    (state / ".step-000000099.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (state / "step-000000099.pt.sha256").write_text("0" * 64 + "  step-000000099.pt\n")
    result = _resume(tmp_path, curated, base_model, killed_run, log_every=3, checkpoint_every=5,
                     keep_checkpoints=4, image_every=0)
    err = capsys.readouterr().err
    assert result.resumed_from == killed_run.steps[-1], err
    assert "temporary file(s) a killed run left" in err
    assert (tmp_path / "out" / WEIGHTS).is_file()
    assert not state.exists()  # temporaries cleaned, the finished run's state gone
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[1].startswith("1,") and log[-1].startswith(f"{result.steps},")  # rows kept across the resume


def test_incompatible_change_is_refused_naming_the_key_and_fresh_moves_the_state_aside(
        tmp_path, curated, base_model, killed_run):
    state = _state_for(killed_run, tmp_path / "state", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(StateError, match=r"other settings \(train\.ema_decay: 0\.999 -> 0\.99\)") as refused:
        _resume(tmp_path, curated, base_model, killed_run, ema_decay=0.99)
    assert "--fresh" in str(refused.value)
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before  # refused: nothing touched

    result = train_phase("ema", parse_params(_raw(ema_decay=0.99, steps=2)), curated, tmp_path / "out",
                         init=base_model, state_root=tmp_path / "state", fresh=True)
    assert result.resumed_from == 0
    (aside,) = (tmp_path / "state").glob(f"{state.name}.old-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before  # kept, byte for byte


def test_lowered_lr_resumes_with_the_new_lr(tmp_path, curated, base_model, killed_run, capsys):
    """A learning rate is adjustable across a resume (how a run goes on after a divergence was
    rolled back): the saved optimizer state carries on with this run's lr, and the change is said."""
    _state_for(killed_run, tmp_path / "state", tmp_path / "out")
    result = _resume(tmp_path, curated, base_model, killed_run, lr=1e-4)
    assert result.resumed_from == killed_run.steps[-1]
    assert "with changed train.lr: 0.0005 -> 0.0001" in " ".join(capsys.readouterr().err.split())


def test_bit_flipped_newest_checkpoint_falls_back_with_a_warning(tmp_path, curated, base_model, killed_run,
                                                                 capsys):
    state = _state_for(killed_run, tmp_path / "state", tmp_path / "out")
    newest = state / f"step-{killed_run.steps[-1]:09d}.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor: torch would load it without complaint
    newest.write_bytes(bytes(data))
    result = _resume(tmp_path, curated, base_model, killed_run)
    err = capsys.readouterr().err
    assert result.resumed_from == killed_run.steps[0]
    assert "warning:" in err and f"{newest.name} (digest mismatch)" in err
    assert (state / (newest.name + DAMAGED_SUFFIX)).read_bytes() == bytes(data)  # set aside, not deleted


def test_all_checkpoints_torn_is_refused_in_one_line_exit_2(tmp_path, curated, base_model, killed_run, capsys):
    out, state_root = tmp_path / "out", tmp_path / "state"
    state = _state_for(killed_run, state_root, out)
    for p in state.glob("step-*.pt"):
        p.write_bytes(p.read_bytes()[: 1000])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_raw(steps=killed_run.steps[-1] + 2)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "ema", "--params", str(params), "--init", str(base_model), "--data", str(curated),
              "--out", str(out), "--state-dir", str(state_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err[-1].startswith("error: no valid checkpoint left in ") and "refusing to restart from step 0" in err[-1]
    assert not out.exists()
    assert len(list(state.glob("step-*.pt" + DAMAGED_SUFFIX))) == 2  # kept for inspection


def test_checkpoint_store_verifies_digests_and_keeps_its_last_k(tmp_path):
    store = CheckpointStore(tmp_path / "s", {"train.lr": 1e-4}, keep=2)
    for step in (1, 2, 3):
        store.save(step, {"x": torch.tensor(step)})
    assert sorted(p.name for p in store.dir.iterdir()) == [
        "step-000000002.pt", "step-000000002.pt.sha256", "step-000000003.pt", "step-000000003.pt.sha256"]
    assert store.load(readonly=True)["parts"]["x"].item() == 3
    (store.dir / "step-000000003.pt.sha256").unlink()  # no digest: not trusted
    assert store.load(readonly=True)["step"] == 2
    other = CheckpointStore(tmp_path / "s", {"train.lr": 1e-4, "seed": 1}, keep=2)
    with pytest.raises(StateError, match=r"seed: \(absent\) -> 1"):
        other.load(readonly=True)


def test_one_state_folder_per_output_found_again_from_another_clone(tmp_path, monkeypatch):
    names = []
    for clone in ("pod-1/vaeft", "pod-2/vaeft"):
        (tmp_path / clone).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / clone)
        names.append(state_dir(".vaeft/state", "ema", "models/ft-ema"))
    assert names[0] == names[1] and names[0].name.startswith("ema-ft-ema-")
    assert len({state_dir("s", "ema", "models/ft-ema"), state_dir("s", "ema", "models/other"),
                state_dir("s", "mse", "models/ft-ema"), state_dir("s", "ema", tmp_path / "ft-ema")}) == 4


def test_loader_options_at_their_previous_behaviour_leave_the_resume_fingerprint_as_it_was():
    """States saved before issue 16's loader options existed still resume while those options
    keep the batches those runs drew; any other value is part of the fingerprint."""
    from vaeft.config import AugmentParams

    new = {"jpeg_draft_oversample", "crops_per_image", "shuffle", "shuffle_window", "resampler"}
    p = AugmentParams()
    assert not new & set(p.resume_key()) and set(p.resume_key()) == set(p.model_dump()) - new
    assert p.model_copy(update={"shuffle_window": 9}).resume_key() == p.resume_key()  # unused while global
    assert p.model_copy(update={"crops_per_image": 2}).resume_key()["crops_per_image"] == 2
    assert p.model_copy(update={"jpeg_draft_oversample": 1.0}).resume_key()["jpeg_draft_oversample"] == 1.0
    assert p.model_copy(update={"resampler": "torch"}).resume_key()["resampler"] == "torch"
    shards = p.model_copy(update={"shuffle": "shards"}).resume_key()
    assert (shards["shuffle"], shards["shuffle_window"]) == ("shards", 4)

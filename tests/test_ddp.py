"""Two torchrun processes on CPU (gloo): the result loads and both replicas ended identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from vaeft.model.io import load_autoencoder

from .conftest import REPO_ROOT, tiny_params_dict


def test_two_process_gloo_training(tmp_path, curated, base_model):
    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=3, batch_size=2, checkpoint_every=2,
                               gan={"kind": "patchgan", "ndf": 8, "n_layers": 2})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vaeft",
           "train", "ema", "--params", str(params), "--init", str(base_model), "--data", str(curated),
           "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    digests = info["replica_sha256"] if "replica_sha256" in info else info["extra"]["replica_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    load_autoencoder(tmp_path / "out")

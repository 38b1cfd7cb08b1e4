"""Two torchrun processes on CPU (gloo), launched the way the cloud templates do it
(``VAEFT_NPROC_PER_NODE=2 vaeft train ...``): the result loads, both replicas ended identical, and
the launcher leaves one status for the whole job."""

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
    status = tmp_path / "status.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "VAEFT_NPROC_PER_NODE": "2",
           "VAEFT_STATUS_FILE": str(status)}
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "VAEFT_NNODES", "VAEFT_NODE_RANK", "VAEFT_RDZV_ENDPOINT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "vaeft", "train", "ema", "--params", str(params), "--init", str(base_model),
           "--data", str(curated), "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relaunching under -m torch.distributed.run --nproc_per_node=2 --standalone" in proc.stderr
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["world_size"] == 2
    digests = info["replica_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    load_autoencoder(tmp_path / "out")
    # One status for the job (the ranks wrote theirs elsewhere and the launcher folded them).
    assert json.loads(status.read_text()) == {"exit_code": 0, "kind": "ok", "error": None, "rank_reports": 2}
    assert list(tmp_path.glob("status.json*")) == [status]

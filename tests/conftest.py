"""Shared fixtures: tiny params, a curated copy of the embedded photos, a tiny base model.

Everything runs the real code at toy scale on CPU: a ~0.2 M-parameter kl-f8-shaped
autoencoder (still x8 downsampling), 32x32 crops, a handful of steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vaeft import runtime_env

runtime_env.configure()

import torch  # noqa: E402

from vaeft.config import Params, load_params, params_as_dict, parse_params  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Deterministic, quick CPU math in tests; the pipeline test's subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


def tiny_params_dict() -> dict:
    """The committed params.yaml, shrunk to test size."""
    raw = params_as_dict(load_params(REPO_ROOT / "params.yaml"))
    raw["augment"]["crop_size"] = 32
    raw["evaluate"]["image_size"] = 32
    raw["model"]["architecture"].update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=32)
    for phase, steps in (("pretrain", 12), ("ema", 6), ("mse", 6)):
        raw["train"][phase].update(steps=steps, batch_size=4, checkpoint_every=4, log_every=2)
    return raw


@pytest.fixture
def tiny_raw() -> dict:
    return tiny_params_dict()


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_params_dict(), "tiny")


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> Path:
    """The embedded photos, curated once per session (read-only for tests)."""
    from vaeft.data.curate import curate

    out = tmp_path_factory.mktemp("curated") / "data"
    curate(parse_params(tiny_params_dict()).data, out)
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, curated) -> Path:
    """A tiny autoencoder pretrained for a few steps: the 'original' of the tests."""
    from vaeft.train.engine import prepare_base

    root = tmp_path_factory.mktemp("base")
    prepare_base(parse_params(tiny_params_dict()), curated, root / "model", state_root=root / "state")
    return root / "model"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs 10-30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (real HTTP, real boto3/DVC clients), fake credentials."""
    from moto.server import ThreadedMotoServer

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(AWS_ACCESS_KEY_ID="test-key-id", AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
                      AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


FAKE_SECRET = "fake-secret-must-never-be-recorded"

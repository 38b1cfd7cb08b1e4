"""Engine options that only the real recipes switch on: SD-size model, checkpointing, fp16, logvar."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vaeft.config import parse_params
from vaeft.model.build import build_autoencoder
from vaeft.model.freeze import is_decoder_side
from vaeft.model.io import save_diffusers
from vaeft.train.engine import train_phase

from .conftest import tiny_params_dict

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _changed_decoder_only(before: dict, after: dict) -> None:
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(is_decoder_side(k) for k in moved)


@pytest.mark.slow
def test_one_step_of_the_sd_size_config(tmp_path, curated):
    raw = tiny_params_dict()
    raw["model"]["architecture"].update(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                        norm_num_groups=32, sample_size=256)
    raw["train"]["ema"].update(steps=1, batch_size=2, gradient_checkpointing=True, channels_last=True,
                               checkpoint_every=100)
    params = parse_params(raw)
    torch.manual_seed(0)
    vae = build_autoencoder(params.model.architecture)
    n_dec = sum(p.numel() for n, p in vae.named_parameters() if is_decoder_side(n))
    n_enc = sum(p.numel() for n, p in vae.named_parameters() if not is_decoder_side(n))
    assert (round(n_enc / 1e6, 2), round(n_dec / 1e6, 2)) == (34.16, 49.49)  # REFERENCE §3
    save_diffusers(vae, tmp_path / "base")
    result = train_phase("ema", params, curated, tmp_path / "out", init=tmp_path / "base", state_root=tmp_path / "s")
    assert result.steps == 1 and result.skipped_steps == 0
    _changed_decoder_only(load_file(tmp_path / "base" / WEIGHTS), load_file(tmp_path / "out" / WEIGHTS))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, curated, base_model, precision):
    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=3, precision=precision, accumulate=2)
    result = train_phase("ema", parse_params(raw), curated, tmp_path / "out", init=base_model,
                         state_root=tmp_path / "s", log_file=tmp_path / "log.csv")
    out = load_file(tmp_path / "out" / WEIGHTS)
    assert {t.dtype for t in out.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in out.values())
    assert result.skipped_steps < 3  # at least one real step (fp16 may skip an overflowing first scale)
    _changed_decoder_only(load_file(base_model / "diffusion_pytorch_model.safetensors"), out)


def test_learnable_logvar_moves(tmp_path, curated, base_model):
    raw = tiny_params_dict()
    raw["train"]["ema"].update(steps=4, loss={"l1": 1.0, "learn_logvar": True, "reduction": "sum"}, log_every=1)
    train_phase("ema", parse_params(raw), curated, tmp_path / "out", init=base_model, state_root=tmp_path / "s",
                log_file=tmp_path / "log.csv")
    header, *rows = (tmp_path / "log.csv").read_text().splitlines()
    cols = header.split(",")
    assert "logvar" in cols, cols
    values = [float(r.split(",")[cols.index("logvar")]) for r in rows]
    assert values[0] != values[-1]

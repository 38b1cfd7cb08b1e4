"""fp16 overflow check (library + CLI) and decoder-only freezing seen through the exported files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vaeft.cli import main
from vaeft.config import ArchitectureParams, ExportParams
from vaeft.export.release import export_models
from vaeft.model.build import build_autoencoder
from vaeft.model.fp16 import check_fp16
from vaeft.model.freeze import is_decoder_side
from vaeft.model.io import save_diffusers
from vaeft.train.engine import train_phase

ARCH = ArchitectureParams(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=32)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_autoencoder(ARCH).eval()


def test_fp16_decode_of_a_sane_model_is_finite():
    assert torch.ones(1, 2, 4, 4, dtype=torch.float16).sum().dtype == torch.float16
    report = check_fp16(tiny(), batch_size=2, latent_size=8)
    assert not report.overflow and report.device in ("cpu", "cuda:0", "cuda")
    assert report.emulated == (report.device == "cpu")
    names = [b.name for b in report.blocks]
    assert names[:3] == ["post_quant_conv", "decoder.conv_in", "decoder.mid_block"] and names[-1] == "decoder.conv_out"
    assert len([n for n in names if n.startswith("decoder.up_blocks.")]) == 4
    assert all(0 < b.max_abs < 65504 for b in report.blocks)


def test_emulated_fp16_agrees_with_real_fp16_kernels():
    """The CPU default (fp16 rounding on fp32 kernels) finds the same overflow, at the same block,
    with the same peaks to fp16 precision, as torch's real (slow) fp16 kernels."""
    for scale in (1.0, 1e6):
        reports = []
        for emulate in (True, False):
            vae = tiny()
            with torch.no_grad():
                vae.decoder.up_blocks[1].resnets[0].conv2.weight.mul_(scale)
            reports.append(check_fp16(vae, batch_size=1, latent_size=8, emulate=emulate))
        emulated, native = reports
        assert emulated.emulated and not native.emulated
        assert emulated.overflow == native.overflow == (scale > 1)
        assert emulated.first_overflow == native.first_overflow
        for e, n in zip(emulated.blocks, native.blocks):
            if not (e.nonfinite or n.nonfinite):
                assert e.max_abs == pytest.approx(n.max_abs, rel=2e-2), e.name


def test_fp16_overflow_is_reported_at_the_block_where_it_starts():
    vae = tiny()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # fine in fp32, far past 65504 in fp16
    report = check_fp16(vae, batch_size=1, latent_size=8)
    assert report.overflow and report.first_overflow == "decoder.conv_in"
    assert not report.blocks[0].nonfinite  # post_quant_conv still fine


def test_check_fp16_cli_table_and_exit_code(tmp_path, capsys):
    ok, bad = tiny(), tiny()
    with torch.no_grad():
        bad.decoder.up_blocks[1].resnets[0].conv2.weight.mul_(1e6)
    save_diffusers(ok, tmp_path / "ok")
    save_diffusers(bad, tmp_path / "bad")
    args = ["check-fp16", "--size", "64", "--images", "1"]
    with pytest.raises(SystemExit) as done:
        main([*args, str(tmp_path / "ok")])
        raise SystemExit(0)
    out = capsys.readouterr().err
    assert done.value.code == 0, out
    assert "decoder.mid_block" in out and "no fp16 overflow" in out
    with pytest.raises(SystemExit) as done:
        main([*args, str(tmp_path / "bad")])
    out = capsys.readouterr().err
    assert done.value.code == 1
    assert "OVERFLOW" in out and "first at decoder.up_blocks.1" in out


def test_exported_encoder_is_bit_identical_to_base(tmp_path, tiny_params, curated, base_model):
    train_phase("ema", tiny_params, curated, tmp_path / "ft", base_model, state_root=tmp_path / "state")
    export_models(ExportParams(), {"ft": tmp_path / "ft"}, tmp_path / "export")
    base = load_file(base_model / "diffusion_pytorch_model.safetensors")
    exported = load_file(tmp_path / "export" / "ft" / "diffusers" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == exported.keys()
    frozen = [k for k in base if not is_decoder_side(k)]
    assert frozen and any(k.startswith("quant_conv.") for k in frozen)
    for k in frozen:
        assert base[k].numpy().tobytes() == exported[k].numpy().tobytes(), k
    # ...and the fine-tune did change the decoder side, so the check above is not vacuous.
    assert any(not torch.equal(base[k], exported[k]) for k in base if is_decoder_side(k))

"""Model I/O: the one loader (diffusers folders, LDM/SD files), the LDM <-> diffusers converter
checked against diffusers' own single-file loader, strict loading, safe pickles, `vaeft convert`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vaeft.cli import app
from vaeft.config import ArchitectureParams
from vaeft.model.build import autoencoder_class, build_autoencoder
from vaeft.model.infer import infer_config
from vaeft.model.io import ModelLoadError, UnsafePickleError, load_autoencoder, save_diffusers, save_ldm
from vaeft.model.ldm import ConversionError, diffusers_to_ldm, ldm_to_diffusers

CONFIGS = {
    "4x16-32_l1": dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8),
    "2x8-16_l2": dict(block_out_channels=[8, 16], layers_per_block=2, norm_num_groups=4),
    "3x32-48-64_l1": dict(block_out_channels=[32, 48, 64], layers_per_block=1, norm_num_groups=16),
}


def tiny(name: str = "4x16-32_l1", seed: int = 0, **extra):
    torch.manual_seed(seed)
    vae = build_autoencoder(ArchitectureParams(sample_size=32, **CONFIGS[name], **extra))
    # Random biases/norm affine too, so a swapped or dropped tensor cannot go unnoticed.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def reconstruct(vae, seed: int = 1) -> torch.Tensor:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mode()).sample


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ldm_round_trip_is_byte_identical(name):
    sd = tiny(name).state_dict()
    ldm = diffusers_to_ldm(sd)
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    n = len(CONFIGS[name]["block_out_channels"])
    # The up path is reversed: LDM's up.0 is the last (highest-resolution) diffusers up block.
    assert torch.equal(ldm["decoder.up.0.block.0.conv1.weight"], sd[f"decoder.up_blocks.{n - 1}.resnets.0.conv1.weight"])
    back = ldm_to_diffusers(ldm)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].numpy().tobytes() == v.numpy().tobytes(), k
    again = diffusers_to_ldm(back)
    assert again.keys() == ldm.keys()
    assert all(again[k].numpy().tobytes() == ldm[k].numpy().tobytes() for k in ldm)


def test_unknown_keys_are_an_error_not_dropped():
    ldm = diffusers_to_ldm(tiny().state_dict())
    ldm["decoder.up.0.block.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"decoder\.up\.0\.block\.0\.extra\.weight"):
        ldm_to_diffusers(ldm)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_ldm_file_matches_diffusers_from_single_file(tmp_path, name):
    """Independent check: diffusers' own converter reads our LDM file into the same model."""
    vae = tiny(name)
    save_diffusers(vae, tmp_path / "cfg")
    save_ldm(vae, tmp_path / "vae.safetensors")
    theirs = autoencoder_class().from_single_file(
        str(tmp_path / "vae.safetensors"), config=str(tmp_path / "cfg"), local_files_only=True)
    torch.testing.assert_close(reconstruct(theirs), reconstruct(vae), rtol=1e-5, atol=1e-5)
    same_weights(theirs, vae)
    # ...and our loader reads it back with the config inferred from shapes (+ the group count).
    ours = load_autoencoder(tmp_path / "vae.safetensors", norm_num_groups=CONFIGS[name]["norm_num_groups"])
    same_weights(ours, vae)


def test_config_is_inferred_from_shapes():
    vae = tiny("2x8-16_l2", latent_channels=6, in_channels=1, out_channels=2)
    cfg = infer_config(vae.state_dict(), norm_num_groups=4)
    assert list(cfg["block_out_channels"]) == [8, 16] and cfg["layers_per_block"] == 2
    assert cfg["latent_channels"] == 6 and cfg["in_channels"] == 1 and cfg["out_channels"] == 2
    assert infer_config(vae.state_dict())["norm_num_groups"] == 32  # the SD default unless given


def _full_training_ckpt(vae, ema_vae) -> dict:
    """What an LDM training run saves: model, LPIPS/discriminator under loss.*, LitEma buffers."""
    state = diffusers_to_ldm(vae.state_dict())
    state.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)})
    for k, v in diffusers_to_ldm(ema_vae.state_dict()).items():
        state["model_ema." + k.replace(".", "")] = v
    state["model_ema.num_updates"] = torch.tensor(10)
    state["model_ema.decay"] = torch.tensor(0.9999)
    return {"epoch": 3, "global_step": 1234, "state_dict": state}


def test_full_training_checkpoint_main_and_ema_weights(tmp_path):
    vae, ema_vae = tiny(seed=0), tiny(seed=1)
    torch.save(_full_training_ckpt(vae, ema_vae), tmp_path / "last.ckpt")
    same_weights(load_autoencoder(tmp_path / "last.ckpt", norm_num_groups=8), vae)
    same_weights(load_autoencoder(tmp_path / "last.ckpt", norm_num_groups=8, ema=True), ema_vae)
    # An ema-pruned release file has no model_ema.*: asking for EMA there is a clear error.
    save_ldm(vae, tmp_path / "pruned.ckpt")
    with pytest.raises(ModelLoadError, match="ema-pruned"):
        load_autoencoder(tmp_path / "pruned.ckpt", norm_num_groups=8, ema=True)


def test_full_sd_checkpoint_prefix(tmp_path):
    vae = tiny()
    state = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    state["cond_stage_model.transformer.x"] = torch.randn(3)
    save_file(state, str(tmp_path / "sd.safetensors"))
    same_weights(load_autoencoder(tmp_path / "sd.safetensors", norm_num_groups=8), vae)


def test_diffusers_folder_safetensors_and_bin(tmp_path):
    vae = tiny()
    save_diffusers(vae, tmp_path / "st")
    same_weights(load_autoencoder(tmp_path / "st"), vae)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(vae.state_dict(), tmp_path / "bin" / "diffusion_pytorch_model.bin")
    same_weights(load_autoencoder(tmp_path / "bin"), vae)
    # A folder holding one LDM file (the unzipped original kl-f8 looks like this).
    (tmp_path / "klf8").mkdir()
    save_ldm(vae, tmp_path / "klf8" / "model.ckpt")
    same_weights(load_autoencoder(tmp_path / "klf8", norm_num_groups=8), vae)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    save_ldm(tiny(), tmp_path / "vae.safetensors")
    wrong = ArchitectureParams(block_out_channels=[16, 16, 32, 64], layers_per_block=1, norm_num_groups=8)
    with pytest.raises(ModelLoadError) as err:
        load_autoencoder(tmp_path / "vae.safetensors", config=wrong)
    msg = str(err.value)
    # The first mismatch in the model's order, named as the file names it (LDM key).
    assert "shape mismatch at encoder.down.3.block.0.conv1.weight: file has (32, 32, 3, 3), model expects (64, 32, 3, 3)" in msg
    deeper = ArchitectureParams(block_out_channels=[16, 16, 32, 32], layers_per_block=2, norm_num_groups=8)
    with pytest.raises(ModelLoadError, match=r"missing key\(s\): encoder\.down_blocks\.0\.resnets\.1\.norm1\.weight"):
        load_autoencoder(tmp_path / "vae.safetensors", config=deeper)
    shallow_vae = tiny("4x16-32_l1")
    state = diffusers_to_ldm(shallow_vae.state_dict())
    state.pop("decoder.conv_out.bias")
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\): decoder\.conv_out\.bias"):
        load_autoencoder(tmp_path / "missing.safetensors", norm_num_groups=8)


class Evil:
    def __reduce__(self):
        return (print, ("this ran during unpickling",))


def test_arbitrary_pickle_is_refused(tmp_path, capsys):
    state = {"state_dict": diffusers_to_ldm(tiny().state_dict()), "hyper_parameters": Evil()}
    torch.save(state, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafePickleError, match="weights_only=True"):
        load_autoencoder(tmp_path / "evil.ckpt", norm_num_groups=8)
    assert "this ran" not in capsys.readouterr().out


def test_convert_cli_both_directions(tmp_path):
    vae = tiny()
    save_diffusers(vae, tmp_path / "d")
    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(tmp_path / "d"), str(tmp_path / "v.safetensors"), "--to", "ldm"])
    assert r.exit_code == 0, r.output
    assert "decoder.up.3.upsample.conv.weight" in load_file(tmp_path / "v.safetensors")
    r = runner.invoke(app, ["convert", str(tmp_path / "v.safetensors"), str(tmp_path / "d2"), "--to", "diffusers",
                            "--norm-num-groups", "8"])
    assert r.exit_code == 0, r.output
    same_weights(load_autoencoder(tmp_path / "d2"), vae)
    assert json.loads((tmp_path / "d2" / "config.json").read_text())["norm_num_groups"] == 8
    r = runner.invoke(app, ["convert", str(tmp_path / "d"), str(tmp_path / "v.ckpt"), "--to", "ldm"])
    assert r.exit_code == 0, r.output
    same_weights(load_autoencoder(tmp_path / "v.ckpt", config=tmp_path / "d"), vae)
    bad = runner.invoke(app, ["convert", str(tmp_path / "d"), str(tmp_path / "v.pt"), "--to", "ldm"])
    assert bad.exit_code != 0 and not (tmp_path / "v.pt").exists()


def test_pretrain_stage_imports_an_ldm_base(tmp_path, tiny_raw):
    from vaeft.config import parse_params
    from vaeft.train.engine import prepare_base

    arch = tiny_raw["model"]["architecture"]
    torch.manual_seed(3)
    vae = build_autoencoder(ArchitectureParams(**arch))
    save_ldm(vae, tmp_path / "base.ckpt")
    tiny_raw["model"]["base"] = str(tmp_path / "base.ckpt")
    prepare_base(parse_params(tiny_raw), tmp_path, tmp_path / "models" / "base")
    imported = load_autoencoder(tmp_path / "models" / "base")
    same_weights(imported, vae)
    assert imported.config.norm_num_groups == arch["norm_num_groups"]  # from params, not the default 32
    # A base that does not match the params' architecture fails instead of loading wrongly.
    save_ldm(tiny("2x8-16_l2"), tmp_path / "other.safetensors")
    tiny_raw["model"]["base"] = str(tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="shape mismatch at encoder.conv_in.weight"):
        prepare_base(parse_params(tiny_raw), tmp_path, tmp_path / "models" / "other")


def test_safetensors_with_several_metadata_keys_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders metadata by a per-process hash seed: LDM exports (format +
    norm_num_groups) came out different from one run to the next, and so did dvc.lock."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, torch\nfrom vaeft.model.io import save_safetensors\n"
            "save_safetensors({'w': torch.arange(6.0).reshape(2, 3)}, sys.argv[1],"
            " {'format': 'pt', 'norm_num_groups': '8', 'zeta': '1'})\n")
    digests = set()
    for i in range(3):  # 3 keys: 6 orders, so 3 processes almost surely see two of them
        out = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["w"], torch.arange(6.0).reshape(2, 3))

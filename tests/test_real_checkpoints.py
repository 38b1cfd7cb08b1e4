"""Real LDM/SD checkpoints: Lightning 1.x pickles load through the weights-only unpickler with inert
stand-ins, code-running pickles stay refused, the discriminator comes from the base and travels
from ft-EMA to ft-MSE, and an LDM export records its GroupNorm group count.

No real weights can be downloaded here: the files are built in the real shape, their pickles
naming the same globals the released ``model.ckpt`` / ``sd-v1-*.ckpt`` name, without importing
pytorch_lightning (a pickler that writes chosen global names for stand-in objects).
"""

from __future__ import annotations

import pickle
import types

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_params_dict
from vaeft.cli import app, main
from vaeft.config import ArchitectureParams
from vaeft.losses.discriminator import NLayerDiscriminator
from vaeft.model.build import build_autoencoder
from vaeft.model.io import ModelLoadError, UnsafePickleError, load_autoencoder
from vaeft.model.ldm import diffusers_to_ldm


class ModelCheckpoint:
    """Pickled under Lightning 1.x's name for the class that keys ``checkpoint["callbacks"]``."""


_NAMES = {
    ModelCheckpoint: ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    # numpy 1.x, which wrote the released files, named the scalar rebuild so.
    np._core.multiarray.scalar: ("numpy.core.multiarray", "scalar"),
}


class _RealNamesPickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        if obj in _NAMES:
            module, qualname = _NAMES[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


_PICKLE_MODULE = types.ModuleType("real_names_pickle")
_PICKLE_MODULE.Pickler = _RealNamesPickler


def save_real(obj, path) -> None:
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)


def tiny_arch() -> ArchitectureParams:
    return ArchitectureParams(**tiny_params_dict()["model"]["architecture"])


def tiny_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = build_autoencoder(tiny_arch())
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def tiny_disc(seed: int = 5, ndf: int = 8, n_layers: int = 2) -> NLayerDiscriminator:
    torch.manual_seed(seed)
    return NLayerDiscriminator(3, ndf, n_layers, "batch")


def lightning_ldm_ckpt(vae, disc=None) -> dict:
    """kl-f8's ``model.ckpt`` in miniature: a PL 1.x training checkpoint of the autoencoder."""
    state = diffusers_to_ldm(vae.state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    if disc is not None:
        state.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    adam = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3)}},
            "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
                              "params": [0]}]}
    return {
        "epoch": 5,
        "global_step": 246803,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: {
            "monitor": "val/rec_loss", "best_model_score": np.float64(0.1234), "current_score": np.float32(0.2),
            "best_k_models": {"/ckpt/epoch=000005.ckpt": np.float64(0.1234)}, "kth_value": np.int64(3),
            "best_model_path": "/ckpt/epoch=000005.ckpt", "dirpath": "/ckpt",
        }},
        "optimizer_states": [adam, adam],
        "lr_schedulers": [],
    }


def sd_ckpt(vae) -> dict:
    """An SD v1 checkpoint: the VAE under ``first_stage_model.``, the UNet, CLIP and their EMA beside it."""
    state = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(8, 4, 3, 3)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["betas"] = torch.linspace(1e-4, 2e-2, 10)
    return {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5), "best_model_path": "x"}},
            "optimizer_states": [], "lr_schedulers": []}


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_plain_weights_only_load_refuses_these_files(tmp_path):
    """The files built here are the case of the issue: torch's own weights-only load refuses them."""
    save_real(lightning_ldm_ckpt(tiny_vae()), tmp_path / "model.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"):
        torch.load(tmp_path / "model.ckpt", weights_only=True)


def test_lightning_ldm_and_sd_checkpoints_load(tmp_path):
    from vaeft.model.state_files import LightningCallbackKey, read_tensors

    vae = tiny_vae()
    save_real(lightning_ldm_ckpt(vae, tiny_disc()), tmp_path / "model.ckpt")
    raw = read_tensors(tmp_path / "model.ckpt")
    (key, cb), = raw["callbacks"].items()
    assert key is LightningCallbackKey
    assert cb["best_model_score"] == 0.1234 and cb["kth_value"] == 3 and abs(cb["current_score"] - 0.2) < 1e-7
    same_weights(load_autoencoder(tmp_path / "model.ckpt", config=tiny_arch()), vae)
    save_real(sd_ckpt(vae), tmp_path / "sd-v1-4.ckpt")
    same_weights(load_autoencoder(tmp_path / "sd-v1-4.ckpt", config=tiny_arch()), vae)


class _Rmtree:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        import shutil

        return (shutil.rmtree, (self.target,))


class _System:
    def __reduce__(self):
        import os

        return (os.system, ("echo ran > /dev/null",))


@pytest.mark.parametrize("payload,name", [("rmtree", "shutil.rmtree"), ("system", "posix.system")])
def test_code_running_pickle_refused_and_runs_nothing(tmp_path, capsys, payload, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "photo.jpg").write_bytes(b"x")
    ckpt = lightning_ldm_ckpt(tiny_vae())
    # Beside the allowed Lightning names, exactly as a tampered release file would carry it.
    ckpt["hyper_parameters"] = _Rmtree(victim) if payload == "rmtree" else _System()
    save_real(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafePickleError, match=rf"names the global {name},.*nothing was executed"):
        load_autoencoder(tmp_path / "evil.ckpt", config=tiny_arch())
    assert (victim / "photo.jpg").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(tmp_path / "evil.ckpt"), str(tmp_path / "out"), "--to", "diffusers"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and name in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and (victim / "photo.jpg").is_file()


def test_numpy_scalar_standin_accepts_numbers_only(tmp_path):
    ckpt = lightning_ldm_ckpt(tiny_vae())
    ckpt["callbacks"][ModelCheckpoint]["note"] = np.str_("text")
    save_real(ckpt, tmp_path / "str.ckpt")
    with pytest.raises(UnsafePickleError, match="only numeric"):
        load_autoencoder(tmp_path / "str.ckpt", config=tiny_arch())


def _params_file(tmp_path, **model) -> str:
    raw = tiny_params_dict()
    raw["model"].update(model)
    raw["train"]["ema"].update(steps=1, batch_size=2, checkpoint_every=1, log_every=1)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_real_ckpt_through_convert_init_and_model_base(tmp_path, curated):
    vae = tiny_vae()
    save_real(lightning_ldm_ckpt(vae, tiny_disc()), tmp_path / "model.ckpt")
    save_real(sd_ckpt(vae), tmp_path / "sd.ckpt")
    runner = CliRunner()
    for src in ("model.ckpt", "sd.ckpt"):
        r = runner.invoke(app, ["convert", str(tmp_path / src), str(tmp_path / f"{src}.d"), "--to", "diffusers",
                                "--norm-num-groups", str(tiny_arch().norm_num_groups)])
        assert r.exit_code == 0, r.output
        same_weights(load_autoencoder(tmp_path / f"{src}.d"), vae)
    params = _params_file(tmp_path, base=str(tmp_path / "model.ckpt"))
    r = runner.invoke(app, ["pretrain", "--params", params, "--data", str(curated), "--out", str(tmp_path / "base"),
                            "--state-dir", str(tmp_path / "state")])
    assert r.exit_code == 0, r.output
    same_weights(load_autoencoder(tmp_path / "base"), vae)
    r = runner.invoke(app, ["train", "ema", "--init", str(tmp_path / "sd.ckpt"), "--params", params, "--data",
                            str(curated), "--out", str(tmp_path / "ema"), "--state-dir", str(tmp_path / "state")])
    assert r.exit_code == 0, r.output
    trained = load_autoencoder(tmp_path / "ema")
    # The encoder is frozen in ft-EMA: it is exactly the SD file's.
    enc = {k: v for k, v in trained.state_dict().items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, vae.state_dict()[k]) for k, v in enc.items())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_export_records_group_count(tmp_path, suffix):
    from vaeft.model.io import save_diffusers, save_ldm

    vae = tiny_vae()  # 8 groups, not the default 32
    save_diffusers(vae, tmp_path / "d")
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "d"), str(tmp_path / f"v{suffix}"), "--to", "ldm"])
    assert r.exit_code == 0, r.output
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as f:
            assert f.metadata()["norm_num_groups"] == "8"
    # Back without the flag: the file's own count, so the model reconstructs exactly as before.
    r = CliRunner().invoke(app, ["convert", str(tmp_path / f"v{suffix}"), str(tmp_path / "back"), "--to", "diffusers"])
    assert r.exit_code == 0, r.output
    back = load_autoencoder(tmp_path / "back")
    assert back.config.norm_num_groups == 8
    same_weights(back, vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back(x).sample, vae(x).sample)
    # The flag still overrides what the file records.
    assert load_autoencoder(tmp_path / f"v{suffix}", norm_num_groups=4).config.norm_num_groups == 4
    # A bare state dict has no config: its count is given, or nothing is recorded.
    save_ldm(vae.state_dict(), tmp_path / f"bare{suffix}")
    with pytest.raises(ModelLoadError, match=r"num_groups \(32\)"):  # the default, 32, does not fit 16 channels
        load_autoencoder(tmp_path / f"bare{suffix}")
    save_ldm(vae.state_dict(), tmp_path / f"given{suffix}", norm_num_groups=8)
    assert load_autoencoder(tmp_path / f"given{suffix}").config.norm_num_groups == 8


def _gan_raw(init: str, **phase) -> dict:
    raw = tiny_params_dict()
    for name in ("ema", "mse"):
        raw["train"][name].update(steps=1, batch_size=2, checkpoint_every=1, log_every=1, num_workers=0,
                                  gan={"kind": "patchgan", "ndf": 8, "n_layers": 2, "init": init}, **phase)
    return raw


def _adam_steps(path) -> set[float]:
    adam = torch.load(path, weights_only=True)
    return {float(s["step"]) for s in adam["state"].values()}


def test_discriminator_from_base_and_carried_from_ema_to_mse(tmp_path, curated):
    from safetensors.torch import load_file

    from vaeft.config import parse_params
    from vaeft.train.engine import prepare_base, train_phase
    from vaeft.train.gan import DISC_ADAM_FILE, DISC_FILE

    disc = tiny_disc()
    save_real(lightning_ldm_ckpt(tiny_vae(), disc), tmp_path / "model.ckpt")
    raw = _gan_raw("from-base")
    raw["model"]["base"] = str(tmp_path / "model.ckpt")
    raw["train"]["mse"]["lr"] = 2e-4
    params = parse_params(raw)
    # Importing the base keeps its discriminator beside it.
    prepare_base(params, curated, tmp_path / "base")
    base_d = load_file(tmp_path / "base" / DISC_FILE)
    assert base_d.keys() == disc.state_dict().keys()
    assert all(torch.equal(base_d[k], v) for k, v in disc.state_dict().items())
    train_phase("ema", params, curated, tmp_path / "ema", init=tmp_path / "base", state_root=tmp_path / "state")
    ema_d = load_file(tmp_path / "ema" / DISC_FILE)
    lr = params.train.ema.lr
    # One Adam step from the base's D: every weight within ~lr of it (a fresh D is N(0, 0.02) away).
    drift = max(float((ema_d[k].float() - v.float()).abs().max()) for k, v in base_d.items() if k.endswith("weight"))
    assert 0 < drift <= 2 * lr
    assert _adam_steps(tmp_path / "ema" / DISC_ADAM_FILE) == {1.0}
    # ft-MSE from ft-EMA continues D's Adam where ft-EMA left it, as a resumed run would
    # (gan.init: fresh would leave it at 1: a new Adam), with ft-MSE's own learning rate.
    train_phase("mse", params, curated, tmp_path / "mse", init=tmp_path / "ema", state_root=tmp_path / "state")
    assert _adam_steps(tmp_path / "mse" / DISC_ADAM_FILE) == {2.0}
    adam = torch.load(tmp_path / "mse" / DISC_ADAM_FILE, weights_only=True)
    assert adam["param_groups"][0]["lr"] == params.train.mse.lr


def test_discriminator_from_base_errors(tmp_path):
    from vaeft.config import GanParams
    from vaeft.errors import VaeftError
    from vaeft.model.io import save_diffusers
    from vaeft.train.gan import GanTrainer

    def trainer(**gan):
        return GanTrainer(GanParams(ndf=8, n_layers=2, init="from-base", **gan), 1e-4, (0.5, 0.9),
                          torch.device("cpu"), 0)

    save_real(lightning_ldm_ckpt(tiny_vae(), tiny_disc()), tmp_path / "model.ckpt")
    save_real(lightning_ldm_ckpt(tiny_vae()), tmp_path / "no-disc.ckpt")
    t = trainer()
    assert t.load_base(tmp_path / "model.ckpt") == str(tmp_path / "model.ckpt")
    assert all(torch.equal(t.disc.state_dict()[k], v) for k, v in tiny_disc().state_dict().items())
    save_diffusers(tiny_vae(), tmp_path / "model")  # a model folder no GAN phase wrote
    for path in (tmp_path / "model", tmp_path / "no-disc.ckpt"):
        with pytest.raises(VaeftError, match=r"holds no discriminator .*gan.init: fresh"):
            trainer().load_base(path)
    with pytest.raises(VaeftError, match="no base model"):
        trainer().load_base(None)
    # Strict: a D of another shape (or another kind) is an error naming what differs.
    with pytest.raises(VaeftError, match=r"does not fit gan \(kind patchgan, ndf 16.*size mismatch for main.0.weight"):
        GanTrainer(GanParams(ndf=16, n_layers=2, init="from-base"), 1e-4, (0.5, 0.9), torch.device("cpu"),
                   0).load_base(tmp_path / "model.ckpt")
    with pytest.raises(VaeftError, match=r"kind wgan-gp.*running_mean"):
        trainer(kind="wgan-gp").load_base(tmp_path / "model.ckpt")

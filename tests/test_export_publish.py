"""Export to the diffusers layout (checked with diffusers itself) and idempotent local publishing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vaeft.config import ExportParams
from vaeft.data.evalset import eval_images
from vaeft.evaluate.report import reconstruct
from vaeft.export.release import SUMS_FILE, export_models
from vaeft.model.build import autoencoder_class
from vaeft.publish.local import PublishConflictError, publish_local


@pytest.fixture(scope="module")
def exported(tmp_path_factory, base_model, curated):
    out = tmp_path_factory.mktemp("export") / "export"
    table = out.parent / "table.md"
    table.write_text("| Model | train steps | rFID | PSNR | SSIM | PSIM/LPIPS |\n|---|---|---|---|---|---|\n"
                     "| ft-test | 7 | n/a [1] | 14.72 ± 3.55 | 0.365 ± 0.143 | n/a [2] |\n")
    export_models(ExportParams(), {"ft-test": base_model}, out, eval_table=table, data_dir=curated)
    return out


def test_model_card_of_a_demo_model_says_what_it_is(exported, curated, base_model):
    import json

    card = (exported / "ft-test" / "README.md").read_text()
    assert "drop-in" not in card and "replaces none" in card and "A demo model" in card
    report = json.loads((curated / "curation_report.json").read_text())
    steps = json.loads((base_model / "run_info.json").read_text())["steps"]
    assert f"{report['kept']} curated images ({report['train']} for training, {report['eval']} held out" in card
    assert "Sources: embedded (" in card
    assert f"| train-pretrain | {steps} | 4 | 0.001 | 1·L1 + 1e-06·KL | all | raw |" in card  # tiny params
    assert "| ft-test | 7 | n/a [1] | 14.72 ± 3.55 |" in card and "not the released kl-f8" in card


def test_model_card_of_a_fine_tuned_release_names_its_base():
    from vaeft.export.release import model_card

    loss = {"l1": 1.0, "lpips": 1.0, "lpips_net": "vgg", "reduction": "sum"}
    ema = {"stage": "train-ema", "steps": 313198, "global_batch": 192, "weights": "ema",
           "params": {"train.ema": {"lr": 8.6e-4, "trainable": "decoder", "ema_decay": 0.9999, "loss": loss,
                                    "gan": {"kind": "patchgan", "disc_weight": 0.5, "disc_start": 0}}}}
    card = model_card("ft-ema", None, [{"stage": "pretrain", "imported_from": "weights/kl-f8"}, ema])
    assert "fine-tuned with vaeft from `weights/kl-f8`" in card and "can replace the base's decoder" in card
    assert "demo" not in card.lower()
    assert ("| train-ema | 313198 | 192 | 0.00086 | 1·L1 + 1·LPIPS-VGG + patchgan GAN (weight 0.5, from step 0), "
            "sum-reduced | decoder | EMA 0.9999 |") in card
    assert "Not recorded (exported without `--data`)." in card


def test_export_loads_with_diffusers_and_reconstructs(exported, curated, base_model):
    folder = exported / "ft-test" / "diffusers"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = autoencoder_class().from_pretrained(folder)  # diffusers' own loader
    _, images = eval_images(curated, 32)
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert y.shape == x.shape and torch.isfinite(y).all()
    ours = reconstruct(base_model, images[:2], batch_size=2)
    theirs = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, theirs)


def test_sha256sums_cover_every_file(exported):
    lines = (exported / SUMS_FILE).read_text().splitlines()
    listed = {ln.split("  ", 1)[1]: ln.split("  ", 1)[0] for ln in lines}
    assert set(listed) == {"ft-test/README.md", "ft-test/diffusers/config.json",
                           "ft-test/diffusers/diffusion_pytorch_model.safetensors",
                           "ft-test/ldm/ft-test.safetensors"}
    for rel, digest in listed.items():
        assert hashlib.sha256((exported / rel).read_bytes()).hexdigest() == digest
    assert "PSNR" in (exported / "ft-test" / "README.md").read_text()


def test_export_half_precision(tmp_path, base_model):
    export_models(ExportParams(dtype="float16"), {"h": base_model}, tmp_path / "e")
    folder = tmp_path / "e" / "h" / "diffusers"
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    vae = autoencoder_class().from_pretrained(folder, torch_dtype=torch.float16)
    assert next(vae.parameters()).dtype == torch.float16
    ldm = load_file(tmp_path / "e" / "h" / "ldm" / "h.safetensors")
    assert {t.dtype for t in ldm.values()} == {torch.float16} and "decoder.up.0.block.0.conv1.weight" in ldm


def test_publish_is_idempotent_and_never_overwrites(tmp_path, exported):
    first = publish_local(exported, tmp_path / "pub")
    assert first.uploaded and (first.path / SUMS_FILE).read_bytes() == (exported / SUMS_FILE).read_bytes()
    assert (tmp_path / "pub" / "LATEST").read_text().strip() == first.version
    again = publish_local(exported, tmp_path / "pub")
    assert not again.uploaded and again.version == first.version
    (first.path / SUMS_FILE).write_text("tampered\n")
    with pytest.raises(PublishConflictError, match="refusing to overwrite"):
        publish_local(exported, tmp_path / "pub")


def test_export_ldm_file_loads_with_diffusers_single_file(exported):
    folder = exported / "ft-test" / "diffusers"
    cls = autoencoder_class()
    ours = cls.from_pretrained(folder)
    # config= a local folder + local_files_only: diffusers' offline path (no hub config lookup).
    theirs = cls.from_single_file(str(exported / "ft-test" / "ldm" / "ft-test.safetensors"),
                                  config=str(folder), local_files_only=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k

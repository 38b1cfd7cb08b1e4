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
def exported(tmp_path_factory, base_model):
    out = tmp_path_factory.mktemp("export") / "export"
    table = out.parent / "table.md"
    table.write_text("| Model | train steps | rFID | PSNR | SSIM | PSIM/LPIPS |\n")
    export_models(ExportParams(), {"ft-test": base_model}, out, eval_table=table)
    return out


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

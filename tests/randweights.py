"""RANDOM weight files in the layout of the real weight store: for plumbing tests only.

Every number computed with these is meaningless; tests use them to run the real LPIPS / FID code
paths (loading, slicing, batching) where the real ImageNet / Inception weights cannot be fetched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vaeft import atomic
from vaeft.compat.torchvision_cpu import ensure_torchvision
from vaeft.weights import registry


def write_random_backbone(store: Path, name: str, seed: int = 0) -> Path:
    """torchvision VGG16 / AlexNet ``features.*`` tensors, randomly initialised."""
    ensure_torchvision()
    import torchvision

    torch.manual_seed(seed)
    if name == "lpips-vgg":  # only the conv stack: the 120 M-parameter classifier is not needed
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    else:
        features = torchvision.models.alexnet(weights=None).features
    path = store / registry()[name].filename
    # Atomic: a concurrent reader of a shared store sees the whole file or none.
    with atomic.atomic_path(path) as tmp:
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp)
    return path


def write_random_inception(store: Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with Kaiming-normal convs (default init gives FID ~ 0)."""
    ensure_torchvision()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # construct without any weight file
            return None

    torch.manual_seed(seed)
    # torch-fidelity wants a file to (not) load. A private one: a fixed name in a store two
    # writers share was deleted under the other one.
    with tempfile.TemporaryDirectory(prefix="vaeft-empty-weights-") as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = _Blank("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    path = store / registry()["fid-inception"].filename
    with atomic.atomic_path(path) as tmp_file:
        torch.save(torch.nn.Module.state_dict(model), tmp_file)
    return path

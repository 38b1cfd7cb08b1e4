"""LPIPS (VGG, AlexNet) and the PSIM *candidate*, on backbones loaded from the weight store.

The ``lpips`` package would download its torchvision backbone at construction; here it is built
with a random backbone (``pnet_rand=True``, no download) and the ImageNet weights are then loaded
from the weight store into the slices lpips cut out of torchvision's ``features``. If that file is
missing the metric is unavailable: a number from a random backbone is never reported.

PSIM is undefined in public sources (REFERENCE §4). ``psim_candidate`` is our reading: the sum
over the five VGG16 layers of the spatially averaged, channel-summed squared difference of
unit-normalised features, without LPIPS's learned linear weights (lpips' "baseline" mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vaeft.compat.torchvision_cpu import ensure_torchvision
from vaeft.errors import VaeftError

LPIPS_NETS = {"vgg": "lpips-vgg", "alex": "lpips-alex"}
PSIM_LABEL = "psim_candidate"
PSIM_DEFINITION = (
    "PSIM candidate (not the model cards' undefined PSIM): sum over VGG16 relu1_2..relu5_3 of the "
    "spatial mean of sum_c (f/|f| - g/|g|)^2, unit-normalised features, no learned weights"
)
# Inside the sqrt: keeps the normalisation finite (and differentiable) for all-zero feature
# vectors, which ReLU features of flat regions do produce.
NORM_EPS = 1e-10


class BackboneWeightsError(VaeftError):
    pass


def normalize_features(f: torch.Tensor) -> torch.Tensor:
    return f * torch.rsqrt(f.square().sum(dim=1, keepdim=True) + NORM_EPS)


def _load_backbone(net: torch.nn.Module, weights_file: Path, tv_name: str) -> None:
    """Copy torchvision ``features.{i}.*`` tensors into lpips' ``slice{k}.{i}.*`` modules, strictly.

    lpips builds its slices from torchvision's own ``features`` modules, so a strict load of the
    re-keyed tensors checks every name and shape: a wrong or truncated file fails loudly. The
    file's classifier tensors are not needed.
    """
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    mapped = {}
    for slice_name, slice_mod in net.named_children():
        for idx, _ in slice_mod.named_children():
            for key in ("weight", "bias"):
                src = f"features.{idx}.{key}"
                if src in state:
                    mapped[f"{slice_name}.{idx}.{key}"] = state[src]
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise BackboneWeightsError(
            f"{weights_file}: not a torchvision {tv_name} state dict ({str(err).splitlines()[0]})") from None


def build_lpips(net: str, weights_file: str | Path) -> torch.nn.Module:
    """A frozen ``lpips.LPIPS`` (eval mode) whose backbone holds the weights of ``weights_file``.

    Shared by the metric (here) and the training loss (:mod:`vaeft.losses.lpips`), so both see
    the same network. Frozen means no parameter gradient; gradients still flow to the inputs.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r} (expected one of {', '.join(LPIPS_NETS)})")
    ensure_torchvision()
    import lpips

    model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False).eval()
    _load_backbone(model.net, Path(weights_file), {"vgg": "vgg16", "alex": "alexnet"}[net])
    model.requires_grad_(False)
    return model


def lpips_distance(model: torch.nn.Module, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (LPIPS, PSIM candidate) of float images in [-1, 1], fp32, with the eps-safe norm.

    The backbone runs in whatever autocast the caller set (the training loss: bf16, see
    :class:`vaeft.losses.lpips.LpipsLoss`; the metric: none, fp32); the input scaling, the
    feature normalisation, the distance and the linear heads always run in fp32, where the small
    differences of unit vectors keep their digits. Differentiable in both inputs; callers that
    only measure wrap it in ``no_grad``.
    """
    device_type = x0.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        s0, s1 = model.scaling_layer(x0.float()), model.scaling_layer(x1.float())
    f0, f1 = model.net(s0), model.net(s1)
    with torch.autocast(device_type=device_type, enabled=False):
        lp = x0.new_zeros(x0.shape[0], dtype=torch.float32)
        ps = x0.new_zeros(x0.shape[0], dtype=torch.float32)
        for k in range(model.L):
            d = (normalize_features(f0[k].float()) - normalize_features(f1[k].float())).square()
            lp = lp + model.lins[k](d).mean(dim=(1, 2, 3))
            ps = ps + d.sum(dim=1).mean(dim=(1, 2))
    return lp, ps


@dataclass
class PerceptualResult:
    lpips: torch.Tensor  # N
    psim_candidate: torch.Tensor | None  # N, VGG only


class Perceptual(torch.nn.Module):
    """One lpips network with ImageNet backbone weights from ``weights_file``."""

    def __init__(self, net: str, weights_file: str | Path) -> None:
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS net {net!r} (expected one of {', '.join(LPIPS_NETS)})")
        self.net_name = net
        self.model = build_lpips(net, weights_file)

    @torch.no_grad()
    def forward(self, ref: torch.Tensor, test: torch.Tensor) -> PerceptualResult:
        """Per-image LPIPS (and for VGG the PSIM candidate) of uint8 N x 3 x H x W images, fp32."""
        lp, ps = lpips_distance(self.model, ref.float() / 127.5 - 1.0, test.float() / 127.5 - 1.0)
        return PerceptualResult(lpips=lp, psim_candidate=ps if self.net_name == "vgg" else None)

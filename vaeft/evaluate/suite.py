"""Every image-pair metric behind one object: per-image values per batch, then a summary.

Metrics whose weights are missing are recorded as :class:`Unavailable` (reason + fetch
command) and the rest still run. Nothing here is reported from a random network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from vaeft.errors import VaeftError
from vaeft.evaluate.availability import Unavailable
from vaeft.metrics import color
from vaeft.metrics.fid import InceptionFeatures, RunningStats, fid_from_stats
from vaeft.metrics.perceptual import LPIPS_NETS, PSIM_DEFINITION, PSIM_LABEL, Perceptual
from vaeft.metrics.psnr import psnr_torch
from vaeft.metrics.ssim import ssim
from vaeft.metrics.summary import mean_std
from vaeft.weights import MissingWeightsError, require

NOTES = {
    PSIM_LABEL: PSIM_DEFINITION,
    "rfid": "FID between originals and reconstructions, torch-fidelity inception-v3-compat pool features (2048)",
    "ssim": "Gaussian window sigma 1.5 (11x11), K1 0.01, K2 0.03, per image on RGB",
    "psnr": "per image on [0, 1]",
    "shift": "mean per-channel shift reconstruction - original, 0-255 units",
    "saturation_ratio": "mean HSV saturation reconstruction / original (grey originals excluded)",
}


class WeightsRequiredError(VaeftError):
    pass


@dataclass(frozen=True)
class MetricOptions:
    lpips_nets: tuple[str, ...] = ("vgg", "alex")
    psim: bool = True
    fid: bool = True
    # Fail instead of reporting a metric as unavailable (release evaluations).
    require_weights: bool = False


@dataclass
class Summary:
    values: dict[str, float]  # {metric}_mean / {metric}_std / rfid / n_images
    unavailable: dict[str, Unavailable] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out: dict = dict(self.values)
        out["unavailable"] = {k: v.as_dict() for k, v in sorted(self.unavailable.items())}
        return out


class PairMetrics:
    """The per-image metrics and the Inception feature extractor, built once per evaluation."""

    def __init__(self, options: MetricOptions, device: torch.device | str = "cpu") -> None:
        self.options, self.device = options, torch.device(device)
        self.unavailable: dict[str, Unavailable] = {}
        self.perceptual: dict[str, Perceptual] = {}
        wanted = list(dict.fromkeys(options.lpips_nets))
        if options.psim and "vgg" not in wanted:
            wanted.append("vgg")
        for net in wanted:
            try:
                self.perceptual[net] = Perceptual(net, require(LPIPS_NETS[net])).to(self.device)
            except MissingWeightsError as err:
                self._missing(err, [f"lpips_{net}"] * (net in options.lpips_nets)
                              + [PSIM_LABEL] * (net == "vgg" and options.psim))
        self.inception: InceptionFeatures | None = None
        if options.fid:
            try:
                self.inception = InceptionFeatures(require("fid-inception"), self.device)
            except MissingWeightsError as err:
                self._missing(err, ["rfid"])

    def _missing(self, err: MissingWeightsError, metrics: list[str]) -> None:
        if self.options.require_weights:
            raise WeightsRequiredError(f"{err} (evaluate.require_weights is true)") from None
        for m in metrics:
            self.unavailable[m] = Unavailable.from_missing(err)

    @property
    def per_image_names(self) -> list[str]:
        names = ["psnr", "ssim"]
        names += [f"lpips_{n}" for n in self.options.lpips_nets if n in self.perceptual]
        if self.options.psim and "vgg" in self.perceptual:
            names.append(PSIM_LABEL)
        names += [f"shift_{c}" for c in color.CHANNELS] + ["saturation_ratio"]
        return names

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2)

    @torch.no_grad()
    def per_image(self, ref: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
        """Per-image values for uint8 B x H x W x 3 batches of same-shaped images."""
        if ref.shape != test.shape:
            raise ValueError(f"shape mismatch: {ref.shape} vs {test.shape}")
        out = self.per_image_tensors(self._tensor(ref), self._tensor(test))
        return {k: v.cpu().numpy() for k, v in out.items()}

    @torch.no_grad()
    def per_image_tensors(self, r: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`per_image` of uint8 B x 3 x H x W tensors on the device, as float64 tensors there
        (the evaluate stage keeps them there until the end: no host round trip per batch)."""
        if r.shape != t.shape:
            raise ValueError(f"shape mismatch: {tuple(r.shape)} vs {tuple(t.shape)}")
        out = {"psnr": psnr_torch(r, t), "ssim": ssim(r, t)}
        for net, model in self.perceptual.items():
            res = model(r, t)
            if net in self.options.lpips_nets:
                out[f"lpips_{net}"] = res.lpips
            if net == "vgg" and self.options.psim:
                out[PSIM_LABEL] = res.psim_candidate
        shift = color.channel_shift(r, t)
        for i, c in enumerate(color.CHANNELS):
            out[f"shift_{c}"] = shift[:, i]
        out["saturation_ratio"] = color.saturation_ratio(r, t)
        return {k: v.to(torch.float64) for k, v in out.items()}

    def features(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor | None:
        """Inception features (on the device) of uint8 NHWC arrays or N x 3 x H x W device tensors."""
        if self.inception is None:
            return None
        return self.inception(self._tensor(batch) if isinstance(batch, np.ndarray) else batch)


class Accumulator:
    """Collects per-image values (a few floats per image) and FID statistics for one model."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.values: dict[str, list[np.ndarray | torch.Tensor]] = {n: [] for n in names}
        self.test_stats = RunningStats()

    def add(self, per_image: dict[str, np.ndarray | torch.Tensor],
            test_features: np.ndarray | torch.Tensor | None) -> None:
        """Values stay where they are (device tensors on the device) until :meth:`arrays`."""
        for n in self.names:
            self.values[n].append(per_image[n])
        if test_features is not None:
            self.test_stats.update(test_features)

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: np.concatenate([np.asarray(torch.as_tensor(x).cpu(), np.float64) for x in v]) if v else np.zeros(0)
                for n, v in self.values.items()}

    def summary(self, metrics: PairMetrics, ref_stats: RunningStats | None) -> Summary:
        values: dict[str, float] = {}
        unavailable = dict(metrics.unavailable)
        n = 0
        for name, arr in self.arrays().items():
            n = len(arr)
            finite = arr[~np.isnan(arr)]
            mean, std = mean_std(finite) if len(finite) else (math.nan, math.nan)
            values[f"{name}_mean"], values[f"{name}_std"] = mean, std
        values["n_images"] = n
        if metrics.inception is not None and ref_stats is not None:
            if n < 2:
                unavailable["rfid"] = Unavailable(f"FID needs at least 2 images, got {n}")
            else:
                values["rfid"] = fid_from_stats(ref_stats, self.test_stats)
        return Summary(values, unavailable)

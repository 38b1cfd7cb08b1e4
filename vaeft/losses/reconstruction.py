"""The weighted reconstruction loss of a training phase, built from :class:`LossParams`.

Terms are computed in float32 and reduced to their mean; each term's value is returned for
logging. LPIPS and the LDM reduction (sum / batch with logvar) come with the losses issue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaeft.config import LossParams
from vaeft.errors import VaeftError
from vaeft.losses import pixel

_PIXEL_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": pixel.l1,
    "mse": pixel.mse,
}


class UnsupportedLossError(VaeftError, ValueError):
    pass


class ReconstructionLoss:
    def __init__(self, weights: LossParams) -> None:
        if weights.lpips > 0:
            raise UnsupportedLossError(
                "loss.lpips > 0 is not available in this version of vaeft (LPIPS arrives with the "
                "training-engine issue); set it to 0"
            )
        self.weights = weights
        self.terms = {name: fn for name, fn in _PIXEL_TERMS.items() if getattr(weights, name) > 0}

    def describe(self) -> str:
        parts = [f"{getattr(self.weights, n):g}*{n}" for n in self.terms]
        if self.weights.kl > 0:
            parts.append(f"{self.weights.kl:g}*kl")
        return " + ".join(parts)

    def __call__(
        self, x: torch.Tensor, x_hat: torch.Tensor, kl: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, x_hat = x.float(), x_hat.float()
        total = x_hat.new_zeros(())
        logs: dict[str, float] = {}
        for name, fn in self.terms.items():
            value = fn(x, x_hat).mean()
            total = total + getattr(self.weights, name) * value
            logs[name] = float(value.detach())
        if self.weights.kl > 0 and kl is not None:
            value = kl.float().mean()
            total = total + self.weights.kl * value
            logs["kl"] = float(value.detach())
        logs["loss"] = float(total.detach())
        return total, logs

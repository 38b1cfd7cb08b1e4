"""The reconstruction loss of a training phase, composed from :class:`LossParams`.

rec = Σ_t w_t · term_t(x, x̂) per element (LPIPS, one value per image, broadcast over C x H x W
as LDM does), then nll = rec / exp(logvar) + logvar reduced by ``sum`` (LDM: over elements,
divided by the batch) or ``mean``. With ``mean`` and logvar 0 this is the plain weighted sum of
term means. Terms are computed in fp32; each term's mean is returned for logging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaeft.config import LossParams
from vaeft.losses import oklab, pixel
from vaeft.losses.reduction import nll

_PIXEL_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": pixel.l1,
    "mse": pixel.mse,
    "oklab_l1": oklab.oklab_l1,
    "oklab_mse": oklab.oklab_mse,
}


class ReconstructionLoss(torch.nn.Module):
    """``lpips``: the LPIPS loss module (required when ``weights.lpips > 0``, see
    :func:`vaeft.losses.lpips.load_lpips_loss`)."""

    def __init__(self, weights: LossParams, lpips: torch.nn.Module | None = None) -> None:
        super().__init__()
        if weights.lpips > 0 and lpips is None:
            raise ValueError("loss.lpips > 0 needs the LPIPS module (load_lpips_loss)")
        self.weights = weights
        self.terms = {name: fn for name, fn in _PIXEL_TERMS.items() if getattr(weights, name) > 0}
        self.lpips = lpips if weights.lpips > 0 else None
        # A parameter either way so checkpoints have one layout; it only trains if learn_logvar.
        self.logvar = torch.nn.Parameter(torch.tensor(float(weights.logvar_init)),
                                         requires_grad=weights.learn_logvar)

    def describe(self) -> str:
        parts = [f"{getattr(self.weights, n):g}*{n}" for n in self.terms]
        if self.lpips is not None:
            parts.append(f"{self.weights.lpips:g}*lpips-{self.weights.lpips_net}")
        text = " + ".join(parts) + f" ({self.weights.reduction}"
        text += ", learned logvar)" if self.weights.learn_logvar else ")"
        if self.weights.kl > 0:
            text += f" + {self.weights.kl:g}*kl"
        return text

    def forward(
        self, x: torch.Tensor, x_hat: torch.Tensor, kl: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, detached per-term means + 'nll' + 'loss'); the nll alone is ``logs['nll']``
        with its graph kept under key ``'_nll'`` for the adaptive GAN weight."""
        x, x_hat = x.float(), x_hat.float()
        rec = x_hat.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        for name, fn in self.terms.items():
            value = fn(x, x_hat)
            rec = rec + getattr(self.weights, name) * value
            logs[name] = value.detach().mean()
        if self.lpips is not None:
            value = self.lpips(x, x_hat)
            rec = rec + self.weights.lpips * value
            logs["lpips"] = value.detach().mean()
        rec = rec.expand_as(x_hat)
        total = nll(rec, self.logvar, self.weights.reduction)
        logs["_nll"] = total
        if self.weights.kl > 0 and kl is not None:
            value = kl.float().mean()
            total = total + self.weights.kl * value
            logs["kl"] = value.detach()
        if self.weights.learn_logvar:
            logs["logvar"] = self.logvar.detach().clone()
        logs["loss"] = total.detach()
        return total, logs

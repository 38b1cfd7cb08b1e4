"""Telling a diverging run from a noisy one.

Non-finite values come too late: the step that explodes usually has a finite loss (a huge
gradient, or a huge update from a sane one), its update reaches the weights and the EMA, and
only later steps overflow. So every step is also compared with the recent past: a loss or
gradient norm ``FACTOR`` times the running median of the last ``WINDOW`` good steps, or trained
weights whose norm jumped ``WEIGHT_FACTOR`` times the running median (the weights before the
first step included), is an explosion. The factors are far outside what a working run does (a
fine-tune's weight norm moves by a few percent over a whole run; the first steps of a pretrain
move its loss by less than 10x), so a noisy batch does not stop a run.

The engine feeds the guard in batches (each step's values stay on the device until the next log,
grid or checkpoint step, then are judged in step order), so nothing waits for the GPU per step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

WINDOW = 50
# Loss and gradient norm start being compared after this many good steps (the first steps of a
# run from scratch are not a baseline); weights from the first step on.
MIN_HISTORY = 5
FACTOR = 100.0
WEIGHT_FACTOR = 10.0


def weight_norm_tensor(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``params`` together, in fp32 (inf/NaN when any weight is), on their device."""
    with torch.no_grad():
        return torch.nn.utils.get_total_norm([p.detach().float() for p in params])


def weight_norm(params: list[torch.Tensor]) -> float:
    return float(weight_norm_tensor(params))


class DivergenceGuard:
    def __init__(self, initial_weight_norm: float) -> None:
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.grad_norms: deque[float] = deque(maxlen=WINDOW)
        self.weight_norms: deque[float] = deque([initial_weight_norm], maxlen=WINDOW)

    def _weights(self, norm: float) -> str | None:
        if not math.isfinite(norm):
            return "non-finite weights"
        ref = statistics.median(self.weight_norms)
        if norm > WEIGHT_FACTOR * ref:
            return f"weight norm {norm:.3g}, {norm / ref:.3g}x its running median {ref:.3g}"
        return None

    def check_step(self, loss: float, grad_norm: float, weights: float) -> str | None:
        """A step that was taken: None if it looks sane (then it joins the history), else why not.
        ``loss``: a loss that is never negative (the reconstruction terms)."""
        if (reason := self._weights(weights)) is not None:
            return reason
        for name, value, past in (("reconstruction loss", loss, self.losses), ("gradient norm", grad_norm, self.grad_norms)):
            if len(past) >= MIN_HISTORY:
                ref = statistics.median(past)
                if ref > 0 and abs(value) > FACTOR * ref:
                    return f"{name} {value:.3g}, {abs(value) / ref:.3g}x its running median {ref:.3g}"
        self.losses.append(abs(loss))
        self.grad_norms.append(grad_norm)
        self.weight_norms.append(weights)
        return None

    def check_skipped(self, weights: float) -> str | None:
        """A skipped (non-finite) step: the weights it left are those of the previous step."""
        return self._weights(weights)

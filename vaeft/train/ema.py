"""Exponential moving average of parameters, as LDM's ``LitEma``.

decay_t = min(decay, (1 + n) / (10 + n)) with n the number of updates *including this one*
(LitEma increments its counter before computing the decay): 2/11, 3/12, 4/13, ... = 0.18, 0.25,
0.31, ..., so the average warms up quickly instead of being dominated by the initial weights for
~1/(1-decay) steps. ``num_updates`` counts the updates done, as LitEma's buffer does.
Shadows are float32 whatever the training dtype.
"""

from __future__ import annotations

import torch


class Ema:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}
        self._count: torch.Tensor | None = None  # num_updates on the device, while keep= updates run

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        self._sync_count()
        if not self.warmup:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.nn.Parameter], keep: torch.Tensor | None = None) -> None:
        """s <- s - (1 - decay)(s - p) for every parameter, as one multi-tensor lerp
        (s + (1 - decay)(p - s)): 52 ms instead of 157 ms for a per-parameter loop over the SD
        decoder on one CPU core (BENCHMARKS.md), and a few kernels instead of ~3 per tensor on GPU.

        ``keep``: a bool tensor on the parameters' device; False leaves the shadows and the counter
        as they were, decided on the device (the caller need not wait for the flag)."""
        names = list(named_params)
        params = [named_params[n].detach().float() for n in names]
        if keep is None:
            decay = self.current_decay()
            self.num_updates += 1
            torch._foreach_lerp_([self.shadow[n] for n in names], params, 1.0 - decay)
            return
        n = self._device_count(keep.device) + 1
        # In float64, then rounded once: the weight the float branch above passes (bit for bit).
        decay = torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        weight = ((1.0 - decay) * keep).float()
        torch._foreach_lerp_([self.shadow[n_] for n_ in names], params, [weight] * len(names))
        self._count += keep

    def _device_count(self, device: torch.device) -> torch.Tensor:
        if getattr(self, "_count", None) is None or self._count.device != device:
            self._count = torch.tensor(self.num_updates, dtype=torch.float64, device=device)
        return self._count

    def _sync_count(self) -> None:
        if getattr(self, "_count", None) is not None:
            self.num_updates = int(self._count)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, s in self.shadow.items():
            params[name].copy_(s.to(params[name].dtype))

    def state_dict(self) -> dict:
        self._sync_count()
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the trained parameters")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        self._count = None
        self.shadow = {n: t.float().clone() for n, t in state["shadow"].items()}

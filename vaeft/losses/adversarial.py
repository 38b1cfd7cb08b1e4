"""Adversarial terms: hinge (LDM) and WGAN-GP (Furception) losses, and LDM's adaptive weight.

The adaptive weight d_w = ‖∇nll‖ / (‖∇g‖ + 1e-4), both gradients taken at the decoder's last
layer, balances the GAN gradient against the reconstruction gradient whatever their scales. It
is computed in fp32 (half precision overflows the norms: inf/NaN, a peer bug), clamped to
[0, 1e4], detached (it is a weight, not something to optimise) and multiplied by disc_weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def wgan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return logits_fake.float().mean() - logits_real.float().mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """g = -mean D(x̂), for both the hinge GAN (as LDM) and the WGAN critic."""
    return -logits_fake.float().mean()


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Gulrajani et al.: mean over samples of (‖∇_x̃ D(x̃)‖₂ - 1)², x̃ on random real-fake lines.

    The line positions are drawn on ``generator``'s device for the global batch of ``world_size``
    ranks, of which this rank takes its slice (N ranks then draw what one rank at N x the batch does).
    """
    n = real.shape[0]
    where = generator.device if generator is not None else real.device
    alpha = torch.rand(n * world_size, 1, 1, 1, generator=generator, device=where)[rank * n : (rank + 1) * n].to(real)
    mixed = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    out = critic(mixed)
    (grad,) = torch.autograd.grad(out.float().sum(), mixed, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1.0).square().mean()


def _weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float) -> torch.Tensor:
    d_weight = nll_grad.float().norm() / (g_grad.float().norm() + ADAPTIVE_EPS)
    return (d_weight.clamp(0.0, ADAPTIVE_MAX) * disc_weight).detach()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """disc_weight · clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4) at ``last_layer``, fp32 and detached."""
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return _weight(nll_grad, g_grad, disc_weight)


def adaptive_weight_at_output(nll_out_grad: torch.Tensor, g_out_grad: torch.Tensor, output: torch.Tensor,
                              last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """:func:`adaptive_weight` from the two losses' gradients at ``output``, the tensor
    ``last_layer`` produces: only that layer's weight gradient is computed from each (cheap), so
    LPIPS and D need not be back-propagated a second time. The graph below ``output`` is kept."""
    (nll_grad,) = torch.autograd.grad(output, last_layer, grad_outputs=nll_out_grad, retain_graph=True)
    (g_grad,) = torch.autograd.grad(output, last_layer, grad_outputs=g_out_grad, retain_graph=True)
    return _weight(nll_grad, g_grad, disc_weight)


def disc_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """LDM's ``adopt_weight``: 0 before ``disc_start`` (the GAN is off), ``factor`` from then on."""
    return factor if step >= disc_start else 0.0

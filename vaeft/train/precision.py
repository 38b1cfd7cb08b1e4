"""Mixed precision: autocast for the forward pass, fp32 master weights, a GradScaler for fp16.

Weights are never cast (casting them to fp16 before training is a peer bug, REFERENCE §2):
autocast runs the matmuls/convs in bf16 or fp16 while parameters, gradients, Adam state and the
EMA stay fp32. fp16's narrow range needs loss scaling; bf16 has fp32's range and does not.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled for fp16 only; a disabled scaler passes everything through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")

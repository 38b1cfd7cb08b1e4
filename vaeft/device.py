"""Which device a stage runs on: the first CUDA device when there is one, else the CPU."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

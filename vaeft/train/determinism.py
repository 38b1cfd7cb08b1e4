"""Deterministic GPU kernels for a training phase (``train.<phase>.deterministic`` or
``VAEFT_DETERMINISTIC=1``).

On CPU this changes nothing that matters: the kernels vaeft uses there give the same bits run
after run at a fixed thread count. On CUDA, cuDNN may pick a different convolution algorithm
each run (``benchmark``) and several backward kernels accumulate with atomics, so two runs of the
same phase on the same GPU type differ in the last bits unless these switches are on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

DETERMINISTIC_ENV = "VAEFT_DETERMINISTIC"
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
# One of the two settings NVIDIA documents as making cuBLAS reproducible; the larger of them,
# because the smaller (":16:8") can cost throughput on big matmuls.
CUBLAS_WORKSPACE = ":4096:8"


def requested(param: bool = False) -> bool:
    """The phase's param, or the environment's request (``vaeft reproduce --deterministic``)."""
    return param or os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Within the block: deterministic algorithms only (an op without one raises instead of
    silently varying), cuDNN autotuning off, cuBLAS on a fixed workspace. Restored afterwards, so
    a library caller's process is left as it was.

    Off: cuDNN autotuning on (the training shapes are static, so its one-off search per conv
    pays back within a few steps), restored afterwards likewise."""
    if not enabled:
        prev = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = prev
        return
    prev_alg = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench, prev_det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    prev_ws = os.environ.get(CUBLAS_WORKSPACE_ENV)
    # cuBLAS reads this when it creates its handle (the first matmul on the device), which in a
    # stage process comes after this point; a value the user set wins.
    os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_bench, prev_det
        if prev_ws is None:
            os.environ.pop(CUBLAS_WORKSPACE_ENV, None)

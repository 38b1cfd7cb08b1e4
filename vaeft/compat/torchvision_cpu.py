"""Make ``import torchvision`` work beside a CPU-only torch build.

torchvision 0.28.0 exists only as a CUDA build. With the CPU torch its compiled ``_C`` cannot
load, and its Python code then fails at import time while registering fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` (the schemas were never defined). That breaks
``import lpips``, ``import torch_fidelity`` and ``from diffusers import AutoencoderKL``.

Defining the two operator schemas ourselves lets the import finish. Models and transforms then
work; ``torchvision.ops.nms`` and ``torchvision.io`` do not (vaeft uses Pillow for image I/O).
Where torchvision imports normally (any CUDA machine) this module does nothing.
"""

from __future__ import annotations

import sys

_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_state: dict[str, object] = {"done": False, "patched": False, "library": None}


def ensure_torchvision() -> bool:
    """Import torchvision, defining missing op schemas if needed.

    Returns True when the work-around was needed. Idempotent and cheap after the first call.
    """
    if _state["done"]:
        return bool(_state["patched"])
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _drop_half_imported()
        _define_missing_schemas()
        import torchvision  # noqa: F401

        _state["patched"] = True
    _state["done"] = True
    return bool(_state["patched"])


def _drop_half_imported() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _define_missing_schemas() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for name, schema in _OP_SCHEMAS.items():
        if not _op_exists(name):
            lib.define(schema)
    # The Library object must outlive this call or the definitions are removed again.
    _state["library"] = lib


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True

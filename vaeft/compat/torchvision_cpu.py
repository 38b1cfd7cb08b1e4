"""Make ``import torchvision`` work beside a CPU-only torch build.

torchvision 0.28.0 exists only as a CUDA build. With the CPU torch its compiled ``_C`` cannot
load, and its Python code then fails at import time while registering fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` (the schemas were never defined). That breaks
``import lpips``, ``import torch_fidelity`` and ``from diffusers import AutoencoderKL``.

Defining the two operator schemas ourselves lets the import finish. Models and transforms then
work; ``torchvision.ops.nms`` and ``torchvision.io`` do not (vaeft uses Pillow for image I/O).
Where torchvision imports normally (any CUDA machine) this module does nothing.

``import vaeft`` installs :func:`install_import_hook`, so a later ``import torchvision`` (by
diffusers, lpips, torch-fidelity or the user) gets the work-around without importing torch or
torchvision up front: ``import vaeft`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib.machinery
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
        import torchvision  # through the import hook when it is installed: it sets _state
        if _state["done"]:
            return bool(_state["patched"])
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


# The finder and loader follow importlib's protocols without subclassing importlib.abc, whose
# import (typing, importlib.resources) would cost `import vaeft` tens of milliseconds.


class _TorchvisionLoader:
    """Runs torchvision's own loader; if that fails for want of the op schemas, defines them and
    runs it again on the same module object (the import system holds on to that one)."""

    def __init__(self, real) -> None:
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        _remove_hook()  # one import only (find_spec alone, as availability checks call it, is not one)
        try:
            self.real.exec_module(module)
        except RuntimeError as exc:
            if "torchvision::" not in str(exc):
                raise
            for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                del sys.modules[name]
            _define_missing_schemas()
            self.real.exec_module(module)
            _state["patched"] = True
        finally:
            module.__spec__.loader = module.__loader__ = self.real
        _state["done"] = True


class _TorchvisionFinder:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _TorchvisionLoader(spec.loader)
        return spec


_HOOK = _TorchvisionFinder()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install_import_hook() -> None:
    """Apply :func:`ensure_torchvision`'s work-around at the first ``import torchvision``."""
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)

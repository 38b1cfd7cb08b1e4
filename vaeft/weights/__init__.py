"""The offline-first weight store: named weight files in one directory, listed in a registry.

Stages never download at run time. They ask :func:`require` for a weight by name and get its
local path, or a :class:`MissingWeightsError` that names the file and the command that fetches
it. The store directory is ``$VAEFT_WEIGHTS_DIR`` or ``weights/`` in the project (DVC-tracked,
so cloud workers get it with ``dvc pull``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from vaeft.errors import VaeftError
from vaeft.runtime_env import PROJECT_ROOT

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")


class MissingWeightsError(VaeftError):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(
            f"weights {name!r} are not in the weight store (expected {path}); "
            f"fetch them on a networked machine with `vaeft weights pull {name}`"
        )
        self.name, self.path = name, path


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str  # path inside the store directory
    url: str
    sha256: str | None  # full digest when pinned
    description: str


def weights_dir() -> Path:
    return Path(os.environ.get("VAEFT_WEIGHTS_DIR") or PROJECT_ROOT / "weights")


def registry() -> dict[str, WeightSpec]:
    raw = yaml.safe_load(REGISTRY_FILE.read_text(encoding="utf-8"))
    return {name: WeightSpec(name=name, **entry) for name, entry in raw["weights"].items()}


def spec(name: str) -> WeightSpec:
    specs = registry()
    if name not in specs:
        raise VaeftError(f"unknown weights {name!r} (known: {', '.join(specs)})")
    return specs[name]


def weight_path(name: str) -> Path:
    """Where weights ``name`` live in the store (whether or not they are there)."""
    return weights_dir() / spec(name).filename


def require(name: str) -> Path:
    """The local path of weights ``name``; :class:`MissingWeightsError` if absent."""
    path = weight_path(name)
    if not path.is_file():
        raise MissingWeightsError(name, path)
    return path

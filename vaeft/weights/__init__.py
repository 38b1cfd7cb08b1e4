"""The offline-first weight store: named weights in one directory, listed in a registry.

Stages never download at run time. They ask :func:`require` for weights by name and get their
local path, or a :class:`MissingWeightsError` that names the file and the command that fetches
it. The store directory is ``$VAEFT_WEIGHTS_DIR`` or ``weights/`` in the project. It is meant to
be DVC-tracked: on a networked machine ``vaeft weights pull`` then ``dvc add weights`` and
``dvc push``; workers get it with ``dvc pull``.

An entry is one file (``path`` is that file) or a set of files (``path`` is a folder, e.g. a
diffusers repo with ``config.json`` + weights). Each file has a URL and, where known, its pinned
sha256 (or only a prefix of it, e.g. from a torchvision file name; labelled ``sha256_prefix``).
The registry is ``registry.yaml`` beside this module, or ``$VAEFT_WEIGHTS_REGISTRY``; weights a
user brings with ``vaeft weights add`` are registered in ``<store>/registry.local.yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from vaeft.errors import VaeftError
from vaeft.runtime_env import PROJECT_ROOT

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")
LOCAL_REGISTRY = "registry.local.yaml"


class MissingWeightsError(VaeftError):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(
            f"weights {name!r} are not in the weight store (expected {path}); "
            f"fetch them on a networked machine with `vaeft weights pull {name}`"
        )
        self.name, self.path = name, path


class RegistryError(VaeftError):
    pass


@dataclass(frozen=True)
class WeightFile:
    path: str  # inside the store directory
    url: str | None
    sha256: str | None  # full digest when pinned
    sha256_prefix: str | None = None  # only a prefix is known (labelled as such)
    size: int | None = None

    @property
    def pinned(self) -> str | None:
        return self.sha256 or self.sha256_prefix


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub repo at a pinned revision (a commit hash, so the bytes cannot move)."""

    repo: str
    revision: str


@dataclass(frozen=True)
class WeightSpec:
    name: str
    path: str  # the file, or the folder of a multi-file entry, inside the store
    files: tuple[WeightFile, ...]
    description: str = ""
    layout: str | None = None  # "diffusers" / "ldm" for models, None for other weights
    extract: bool = False  # a zip whose members are unpacked beside it after verification
    hub: HubSource | None = None  # fetched through huggingface_hub instead of the URLs

    @property
    def filename(self) -> str:  # the name earlier code used
        return self.path


def weights_dir() -> Path:
    return Path(os.environ.get("VAEFT_WEIGHTS_DIR") or PROJECT_ROOT / "weights")


def registry_file() -> Path:
    return Path(os.environ.get("VAEFT_WEIGHTS_REGISTRY") or REGISTRY_FILE)


def _parse_entry(name: str, entry: dict, source: Path) -> WeightSpec:
    try:
        root = entry["path"]
        if "files" in entry:
            files = tuple(
                WeightFile(f"{root}/{f['name']}", f.get("url"), f.get("sha256"), f.get("sha256_prefix"), f.get("size"))
                for f in entry["files"]
            )
        else:
            files = (WeightFile(root, entry.get("url"), entry.get("sha256"), entry.get("sha256_prefix"), entry.get("size")),)
        hub = None
        if entry.get("hub"):
            hub = HubSource(entry["hub"]["repo"], entry["hub"]["revision"])
            if not re.fullmatch(r"[0-9a-f]{40}", hub.revision):
                raise RegistryError(f"{source}: entry {name!r}: hub revision must be a 40-hex commit hash, "
                                    f"not {hub.revision!r} (a branch can move)")
        return WeightSpec(name, root, files, entry.get("description", ""), entry.get("layout"),
                          bool(entry.get("extract", False)), hub)
    except (KeyError, TypeError) as err:
        raise RegistryError(f"{source}: malformed entry {name!r} ({err!r})") from err


def _read(path: Path) -> dict[str, WeightSpec]:
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {name: _parse_entry(name, entry, path) for name, entry in (raw.get("weights") or {}).items()}


def registry() -> dict[str, WeightSpec]:
    """The registry's entries plus those the user added to this store."""
    return {**_read(registry_file()), **_read(weights_dir() / LOCAL_REGISTRY)}


def spec(name: str) -> WeightSpec:
    specs = registry()
    if name not in specs:
        raise VaeftError(f"unknown weights {name!r} (known: {', '.join(specs)})")
    return specs[name]


def weight_path(name: str) -> Path:
    """Where weights ``name`` live in the store (whether or not they are there)."""
    return weights_dir() / spec(name).path


def require(name: str) -> Path:
    """The local path of weights ``name``; :class:`MissingWeightsError` if any of its files is absent."""
    s = spec(name)
    for f in s.files:
        if not (weights_dir() / f.path).is_file():
            raise MissingWeightsError(name, weights_dir() / f.path)
    return weights_dir() / s.path


def missing_model_hint(path: str | Path) -> str:
    """What to say about a model path that does not exist: the `vaeft weights pull` that fetches
    it when its name matches a registry entry (recipes point at ``weights/<name>``)."""
    p = Path(path)
    names = [n for n, sp in registry().items()
             if p.name and p.name in (n, Path(sp.path).name, Path(sp.path).parts[0], Path(sp.path).stem)]
    where = f"{path} does not exist"
    if names:
        return f"{where}; fetch it on a networked machine with `vaeft weights pull {names[0]}` (store: {weights_dir()})"
    return f"{where}; `vaeft weights list` shows the weights the store knows, `vaeft weights add` brings your own"

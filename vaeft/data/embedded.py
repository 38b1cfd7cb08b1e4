"""The embedded default source: real photographs that installed packages ship.

Nothing is downloaded: scikit-image and scikit-learn carry these files inside their wheels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}

# (package, sub-directory) pairs whose image files make up the embedded source.
_PACKAGE_DIRS = (("skimage", "data"), ("sklearn", "datasets/images"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_image_files() -> list[tuple[str, Path]]:
    """(location, path) of every image file the packages above ship, in a stable order.

    The location is install-independent (``embedded:skimage/data/astronaut.png``) so that the
    manifest, and everything built from it, is byte-identical on any machine.
    """
    files: list[tuple[str, Path]] = []
    for package, sub in _PACKAGE_DIRS:
        root = _package_dir(package)
        if root is None or not (root / sub).is_dir():
            continue
        for p in sorted((root / sub).iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f"embedded:{package}/{sub}/{p.name}", p))
    return files

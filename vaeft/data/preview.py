"""A PNG grid of augmented training samples: what the model sees."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vaeft import atomic
from vaeft.config import AugmentParams
from vaeft.data.loader import CropStream


@dataclass(frozen=True)
class PreviewResult:
    path: Path
    n: int
    specs: list[dict]


def preview_grid(data_dir: str | Path, augment: AugmentParams, seed: int, out: str | Path,
                 n: int = 16, start: int = 0, pad: int = 2, *, force: bool = False) -> PreviewResult:
    """Render samples ``start .. start + n - 1`` of a run into one PNG grid.

    An existing ``out`` is overwritten only when it is a ``.png`` (or with ``force``).
    """
    atomic.check_file_target(out, (".png",), force=force)
    stream = CropStream(data_dir, augment, seed, length=start + n)
    size = augment.crop_size
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad) + pad), (255, 255, 255))
    specs = []
    for k in range(n):
        crop, spec = stream.sample(start + k)
        specs.append(spec)
        r, c = divmod(k, cols)
        grid.paste(Image.fromarray(crop.transpose(1, 2, 0)), (pad + c * (size + pad), pad + r * (size + pad)))
    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return PreviewResult(out, n, specs)

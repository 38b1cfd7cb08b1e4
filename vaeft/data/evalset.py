"""Eval images: shorter-side Lanczos resize to the eval size, then a centre crop.

The published tables used COCO 2017 val at 256x256 without stating the resize/crop protocol;
this one is written into every evaluation's metadata and into every prepared eval set.

An eval set is either a curated directory (its manifest's eval split) or a plain folder of
images, e.g. one written by :func:`prepare_eval_set`. Images are read batch by batch.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vaeft import atomic
from vaeft.console import console, progress
from vaeft.data.embedded import IMAGE_SUFFIXES
from vaeft.data.manifest import MANIFEST_FILE, ManifestRow, is_url
from vaeft.data.pin import is_pin
from vaeft.data.shards import CuratedSet, ShardStore
from vaeft.errors import VaeftError

PROTOCOL = "shorter-side resize (Lanczos, antialiased) to {size}, centre crop {size}x{size}, uint8 RGB"
PREPARED_META = "evalset.json"


class EvalSetError(VaeftError, ValueError):
    pass


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class EvalItem:
    key: str  # stable id for the per-image CSV
    location: str
    path: Path | None  # a plain image file, or None for a member of a curated dataset's shards
    store: ShardStore | None = None
    row: ManifestRow | None = None

    def open(self) -> Path | io.BytesIO:
        if self.path is not None:
            return self.path
        assert self.store is not None and self.row is not None
        return self.store.open_row(self.row)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalSetError(f"{folder}: not a directory")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def eval_items(data_dir: str | Path, *, cache_dir: str | Path | None = None,
               storage_options: dict | None = None) -> list[EvalItem]:
    """A curated dataset's eval split (a directory, URL or pin file), or every image of a plain
    (e.g. prepared) folder."""
    if is_url(data_dir) or is_pin(data_dir) or (Path(data_dir) / MANIFEST_FILE).exists():
        data = CuratedSet(data_dir, cache_dir=cache_dir, storage_options=storage_options)
        items = [EvalItem(r.sha256[:16], r.location, None, data.store, r) for r in data.split("eval")]
        if not items:
            raise EvalSetError(f"{data_dir}: the manifest has no eval images")
        return items
    data_dir = Path(data_dir)
    files = image_files(data_dir)
    if not files:
        raise EvalSetError(f"{data_dir}: no manifest and no images")
    return [EvalItem(p.stem, p.name, p) for p in files]


def load_eval_image(src: EvalItem | Path, size: int) -> np.ndarray:
    with Image.open(src.open() if isinstance(src, EvalItem) else src) as img:
        return np.asarray(resize_center_crop(img.convert("RGB"), size))


def iter_batches(items: list[EvalItem], size: int, batch_size: int, workers: int | None = None,
                 prefetch: int = 2) -> Iterator[tuple[list[EvalItem], np.ndarray]]:
    """(items, uint8 B x size x size x 3) batches, in order, read ahead by a thread pool.

    Decoding and resizing release the GIL, so while the caller scores one batch the next
    ``prefetch`` load in parallel: one core loads ~130 COCO-sized JPEGs/s, which alone would be
    ~38 s of a 5000-image evaluation if it ran between the GPU's batches (BENCHMARKS.md).
    Memory stays bounded by ``prefetch`` batches. ``workers`` 0 or 1: load in the caller's thread.
    """
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if workers <= 1:
        for chunk in chunks:
            yield chunk, np.stack([load_eval_image(it, size) for it in chunk])
        return
    with ThreadPoolExecutor(workers) as pool:
        def submit(chunk: list[EvalItem]):
            return chunk, [pool.submit(load_eval_image, it, size) for it in chunk]

        ahead = iter(chunks)
        pending = deque(submit(c) for c in itertools.islice(ahead, max(1, prefetch)))
        while pending:
            chunk, futures = pending.popleft()
            nxt = next(ahead, None)
            if nxt is not None:
                pending.append(submit(nxt))
            yield chunk, np.stack([f.result() for f in futures])


def eval_images(data_dir: str | Path, size: int) -> tuple[list[ManifestRow], np.ndarray]:
    """The eval split as (rows, uint8 array N x size x size x 3), all in memory (small sets only)."""
    data = CuratedSet(data_dir)
    rows = data.split("eval")
    if not rows:
        raise ValueError(f"{data_dir}: the manifest has no eval images")
    return rows, np.stack([load_eval_image(EvalItem("", r.location, None, data.store, r), size) for r in rows])


@dataclass(frozen=True)
class PreparedSet:
    out_dir: Path
    n_images: int
    metadata_file: Path
    n_upscaled: int = 0  # images whose shorter side was below ``size``


def prepare_eval_set(src_dir: str | Path, out_dir: str | Path, size: int = 256, *, force: bool = False) -> PreparedSet:
    """Resize + centre-crop every image of ``src_dir`` into ``out_dir`` as PNG, with the protocol
    and per-image source hashes in ``evalset.json``. Lossless output: the eval set must not add
    its own compression artefacts to what the autoencoders are scored on."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    atomic.check_dir_target(out_dir, "eval-set", force=force, inputs=[src_dir])
    files = image_files(src_dir)
    if not files:
        # `vaeft data coco-val --out D` extracts to D/val2017/: name the folder that has them.
        inner = sorted(d for d in src_dir.iterdir() if d.is_dir() and image_files(d)) if src_dir.is_dir() else []
        hint = f"; they are in {', '.join(map(str, inner[:3]))}" if inner else ""
        raise EvalSetError(f"{src_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}){hint}")
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise EvalSetError(f"{src_dir}: several files share a name stem: {', '.join(dupes[:5])}")
    entries, upscaled = [], []
    with atomic.atomic_dir(out_dir, "eval-set", force=force, inputs=[src_dir]) as tmp, progress() as bar:
        task = bar.add_task("prepare", total=len(files), info=str(src_dir))
        for p in files:
            data = p.read_bytes()
            with Image.open(p) as img:
                w, h = img.size
                if min(w, h) < size:
                    upscaled.append(f"{p.name} ({w}x{h})")
                resize_center_crop(img.convert("RGB"), size).save(tmp / f"{p.stem}.png")
            entries.append({"file": f"{p.stem}.png", "source": p.name, "sha256": hashlib.sha256(data).hexdigest(),
                            "source_size": [w, h]})
            bar.update(task, advance=1)
        atomic.write_json(tmp / PREPARED_META, {
            "protocol": PROTOCOL.format(size=size), "size": size, "source_dir": str(src_dir),
            "n_images": len(entries), "images": entries,
        })
    if upscaled:
        console.print(f"[yellow]warning: {len(upscaled)} image(s) smaller than {size} were upscaled, which scores "
                      f"the upscaling filter as well: {', '.join(upscaled[:5])}{', ...' if len(upscaled) > 5 else ''}[/]")
    return PreparedSet(out_dir, len(entries), out_dir / PREPARED_META, len(upscaled))

"""Training batches as a pure function of the step: exact resume, any worker count, any rank.

The i-th sample of a run is ``epoch = i // N``, ``position = i % N``; the image is
``permutation(seed, epoch)[position]`` and its crop is drawn from ``rng(seed, epoch, position)``.
Step t of rank r (of W ranks, B samples each) takes samples ``(t * W + r) * B ...``, so the
sampler's position is just the step number, which the training checkpoint already holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vaeft.augment.crops import ImageTooSmall, render_array, sample_rng, sample_spec
from vaeft.config import AugmentParams
from vaeft.data.manifest import read_manifest

log = logging.getLogger(__name__)

# What a file changed or broken since curation raises while decoding.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, ImageTooSmall, Image.DecompressionBombError)


class CropStream(Dataset):
    """Map-style dataset over the virtual, endless sample sequence of a run."""

    def __init__(self, data_dir: str | Path, augment: AugmentParams, seed: int, length: int, split: str = "train",
                 pixel_dir: str | Path | None = None) -> None:
        data_dir = Path(data_dir)
        rows = read_manifest(data_dir, split=split)
        if not rows:
            raise ValueError(f"{data_dir}: the manifest has no {split} images")
        self.paths = [data_dir / r.stored_path for r in rows]
        # With a pixel store (the augment stage's decoded copies), a crop pages in its region only.
        self.pixel_paths = [pixel_file(pixel_dir, r.sha256) for r in rows] if pixel_dir is not None else None
        if self.pixel_paths is not None:
            missing = [p for p in self.pixel_paths if not p.is_file()]
            if missing:
                raise ValueError(f"pixel store {pixel_dir} lacks {len(missing)} of {len(rows)} training images of "
                                 f"{data_dir} (first: {missing[0].name}); re-run the augment stage on this data")
        self.augment, self.seed, self.length = augment, seed, length
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self._cache: dict[int, np.ndarray] = {}
        self.replaced = 0

    def __len__(self) -> int:
        return self.length

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
            self._perm_epoch = epoch
        return self._perm

    def _pixels(self, idx: int) -> np.ndarray:
        """HWC uint8 pixels of training image ``idx``: memory map, worker cache or a fresh decode."""
        if idx in self._cache:
            return self._cache[idx]
        if self.pixel_paths is not None:
            # Opened per sample, not kept: one open map per image would exhaust file descriptors.
            return np.load(self.pixel_paths[idx], mmap_mode="r")
        pixels = decode_rgb(self.paths[idx])
        if self.augment.cache_images:
            self._cache[idx] = pixels
        return pixels

    def _crop(self, idx: int, rng: np.random.Generator):
        pixels = self._pixels(idx)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels of shape {pixels.shape}, expected H x W x 3")
        spec = sample_spec(pixels.shape[1], pixels.shape[0], self.augment, rng)
        return render_array(pixels, spec, self.augment), spec

    def sample(self, i: int) -> tuple[np.ndarray, dict]:
        """Sample ``i`` as CHW uint8 plus what produced it (image index and crop spec)."""
        n = len(self.paths)
        epoch, pos = divmod(i, n)
        perm = self._permutation(epoch)
        rng = sample_rng(self.seed, epoch, pos)
        # A file that no longer decodes is replaced by the next image of the same epoch's order:
        # deterministic, so every worker and every resume makes the same choice.
        for attempt in range(n):
            idx = int(perm[(pos + attempt) % n])
            try:
                crop, spec = self._crop(idx, rng)
            except _DECODE_ERRORS as exc:
                self.replaced += 1
                log.warning("sample %d: %s failed to load (%s); using the next image instead", i, self.paths[idx], exc)
                rng = sample_rng(self.seed, epoch, pos)
                continue
            return crop, {"image": idx, "epoch": epoch, "position": pos, **spec.as_dict()}
        raise RuntimeError(f"no training image could be decoded ({n} tried)")

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.sample(i)[0])


def decode_rgb(path: str | Path | BinaryIO) -> np.ndarray:
    """A curated image as HWC uint8 RGB (the array every crop is rendered from)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def pixel_file(pixel_dir: str | Path, sha256: str) -> Path:
    return Path(pixel_dir) / f"{sha256}.npy"


class StepSampler(Sampler[int]):
    """Sample indices of steps ``start_step`` .. ``stop_step - 1`` for one rank."""

    def __init__(self, start_step: int, stop_step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.start, self.stop, self.batch, self.rank, self.world = start_step, stop_step, batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            base = (step * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch


def train_batches(
    data_dir: str | Path,
    augment: AugmentParams,
    seed: int,
    batch_size: int,
    start_step: int,
    total_steps: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    crops_dir: str | Path | None = None,
) -> DataLoader:
    """Batches (uint8, N x C x H x W) of this rank for steps ``start_step`` .. ``total_steps - 1``.

    Reads materialised crops from ``crops_dir`` when it holds any, else augments online (from its
    pixel store when it has one).
    """
    from vaeft.data.materialize import ShardStream, has_crops, pixel_store_dir

    length = total_steps * batch_size * world_size
    stream: Dataset = (
        ShardStream(crops_dir, seed, length) if has_crops(crops_dir)
        else CropStream(data_dir, augment, seed, length, pixel_dir=pixel_store_dir(crops_dir))
    )
    return DataLoader(
        stream,
        batch_size=batch_size,
        sampler=StepSampler(start_step, total_steps, batch_size, rank, world_size),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=False,
    )


def to_model_range(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], on the device (never in the loader workers)."""
    return batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

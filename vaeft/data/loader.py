"""Training batches as a pure function of the step: exact resume, any worker count.

The i-th training sample of a run is ``epoch = i // N``, ``position = i % N``; the image is
``permutation(seed, epoch)[position]`` and its crop is drawn from ``rng(seed, epoch, position)``.
A resumed run starting at step s simply asks for samples from s * batch_size on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vaeft.augment.crops import random_crop, sample_rng
from vaeft.config import AugmentParams
from vaeft.data.manifest import read_manifest


class CropStream(Dataset):
    """Map-style dataset over the virtual, endless sample sequence of a run."""

    def __init__(self, data_dir: str | Path, augment: AugmentParams, seed: int, length: int) -> None:
        data_dir = Path(data_dir)
        rows = read_manifest(data_dir, split="train")
        if not rows:
            raise ValueError(f"{data_dir}: the manifest has no training images")
        # The curated store is small in the embedded default; decoded once, kept in memory.
        self.images = [np.asarray(Image.open(data_dir / r.stored_path).convert("RGB")) for r in rows]
        self.augment, self.seed, self.length = augment, seed, length
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.images))}
        return self._perms[epoch]

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.images)
        epoch, pos = divmod(i, n)
        img = self.images[int(self._perm(epoch)[pos])]
        return torch.from_numpy(random_crop(img, self.augment, sample_rng(self.seed, epoch, pos)))


class _Range(torch.utils.data.Sampler[int]):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def train_batches(
    data_dir: str | Path,
    augment: AugmentParams,
    seed: int,
    batch_size: int,
    start_step: int,
    total_steps: int,
    num_workers: int = 0,
) -> DataLoader:
    """Batches (uint8, N×C×H×W) for steps ``start_step`` .. ``total_steps - 1``."""
    stream = CropStream(data_dir, augment, seed, length=total_steps * batch_size)
    return DataLoader(
        stream,
        batch_size=batch_size,
        sampler=_Range(start_step * batch_size, total_steps * batch_size),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


def to_model_range(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], on the device (never in the loader workers)."""
    return batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

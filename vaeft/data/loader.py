"""Training batches as a pure function of the step: exact resume, any worker count, any rank.

The i-th sample of a run is ``epoch = i // N``, ``position = i % N``; the image is
``permutation(seed, epoch)[position]`` and its crop is drawn from ``rng(seed, epoch, position)``.
Step t of rank r (of W ranks, B samples each) takes samples ``(t * W + r) * B ...``, so the
sampler's position is just the step number, which the training checkpoint already holds.

``augment.crops_per_image`` k > 1 draws k consecutive samples from one image (one decode, k
crops from generators seeded by (run seed, epoch, position, j)). ``augment.shuffle: shards``
replaces the global permutation: epoch e deals the shuffled shards to the ranks (disjoint sets,
balanced by image count) and rank r walks its shards window by window, its images permuted
within each window; its local sample ``l`` (the index among its own samples) is position
``l % ceil(N / W)`` of epoch ``l // ceil(N / W)``. Both are still functions of the sample index
alone, so a batch depends on (step, rank) only and resume stays exact.

Images are read from the curated dataset's tar shards by offset (data/shards.py), so a rank
opens (or, for a remote dataset, downloads) only the shards that hold the samples it draws.
Stored JPEGs are cropped straight from their bytes with a reduced-scale decode where the crop
is a strong downscale (``augment.jpeg_draft``); PNGs are decoded in full, or read from the
augment stage's pixel store. The path depends on the image and the params only (never on the
cache or the store), so a batch is the same whichever of them is present.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vaeft.augment.crops import (
    CropSpec,
    ImageTooSmall,
    decode_jpeg,
    render_array,
    render_decoded,
    sample_spec,
)
from vaeft.config import AugmentParams
from vaeft.data.manifest import ManifestRow
from vaeft.data.shards import CuratedSet

log = logging.getLogger(__name__)

# Extra seed words that keep the shard order and window permutations apart from crop generators.
_SHARD_ORDER, _WINDOW_ORDER = 2**32 + 1, 2**32 + 2

# What a file changed or broken since curation raises while decoding.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, ImageTooSmall, Image.DecompressionBombError)


class CropStream(Dataset):
    """Map-style dataset over the virtual, endless sample sequence of a run."""

    def __init__(self, data_dir: str | Path, augment: AugmentParams, seed: int, length: int, split: str = "train",
                 pixel_dir: str | Path | None = None, *, cache_dir: str | Path | None = None,
                 storage_options: dict | None = None, shard_cache: bool = True, batch_size: int = 1,
                 world_size: int = 1) -> None:
        """``data_dir``: a curated dataset's directory or URL; for a URL, ``shard_cache`` False reads
        each image with a ranged GET instead of staging whole shards in ``cache_dir``.
        ``batch_size`` and ``world_size`` (those of the :class:`StepSampler`) tell, with
        ``augment.shuffle: shards``, which rank a sample index belongs to."""
        from vaeft.data.materialize import PixelStore

        self.data = CuratedSet(data_dir, cache_dir=cache_dir, storage_options=storage_options, cache=shard_cache)
        self.rows = self.data.split(split)
        if not self.rows:
            raise ValueError(f"{data_dir}: the manifest has no {split} images")
        self.augment, self.seed, self.length = augment, seed, length
        # With a pixel store (the augment stage's decoded copies), a crop pages in its region only.
        self.pixels = PixelStore(pixel_dir) if pixel_dir is not None else None
        if self.pixels is not None:
            missing = [r for r in self.rows if not self.from_bytes(r) and r.sha256 not in self.pixels]
            if missing:
                raise ValueError(f"pixel store {pixel_dir} lacks {len(missing)} of {len(self.rows)} training images of "
                                 f"{data_dir} (first: {missing[0].location}); re-run the augment stage on this data")
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self._cache: dict[int, np.ndarray | bytes] = {}
        self.batch_size, self.world_size = batch_size, world_size
        if augment.shuffle == "shards":
            by_shard: dict[str, list[int]] = {}
            for i, r in enumerate(self.rows):
                by_shard.setdefault(r.shard, []).append(i)
            self.shards = sorted(by_shard)
            self._shard_rows = [np.asarray(by_shard[s], dtype=np.int64) for s in self.shards]
            if len(self.shards) < world_size:
                raise ValueError(f"{data_dir}: augment.shuffle 'shards' needs at least one {split} shard per rank "
                                 f"({len(self.shards)} shards, {world_size} ranks); use shuffle 'global'")
        self._order_key: tuple[int, int] = (-1, -1)
        self._order = np.empty(0, dtype=np.int64)
        # The last decoded image (JPEG) or pixels, kept for the other crops of its group.
        self._decoded: tuple | None = None
        self.replaced = 0

    def __len__(self) -> int:
        return self.length

    def from_bytes(self, row: ManifestRow) -> bool:
        """Whether image ``row`` is cropped from its stored bytes (the JPEG draft path), not from pixels."""
        return self.augment.jpeg_draft and row.format == "jpeg"

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def rank_shards(self, epoch: int, rank: int) -> list[str]:
        """The shards rank ``rank`` reads in ``epoch`` with ``augment.shuffle: shards``, in order."""
        return [self.shards[s] for s in self._deal(epoch)[rank]]

    def _deal(self, epoch: int) -> list[list[int]]:
        # Greedy by image count, in shuffled order: ranks end within one shard of each other.
        order = np.random.default_rng([self.seed, epoch, _SHARD_ORDER]).permutation(len(self.shards))
        dealt: list[list[int]] = [[] for _ in range(self.world_size)]
        load = [0] * self.world_size
        for s in order:
            r = min(range(self.world_size), key=load.__getitem__)
            dealt[r].append(int(s))
            load[r] += len(self._shard_rows[s])
        return dealt

    def _rank_order(self, epoch: int, rank: int) -> np.ndarray:
        if (epoch, rank) != self._order_key:
            shards = self._deal(epoch)[rank]
            window = self.augment.shuffle_window
            parts = []
            for w in range(0, len(shards), window):
                rows = np.concatenate([self._shard_rows[s] for s in shards[w:w + window]])
                parts.append(np.random.default_rng([self.seed, epoch, rank, w, _WINDOW_ORDER]).permutation(rows))
            self._order, self._order_key = np.concatenate(parts), (epoch, rank)
        return self._order

    def _draw(self, i: int) -> tuple[int, np.ndarray, int, tuple[int, ...], int]:
        """Sample ``i`` as (epoch, image order, position in it, key of its crop group, crop in group)."""
        k = self.augment.crops_per_image
        if self.augment.shuffle == "global":
            group, j = divmod(i, k)
            epoch, pos = divmod(group, len(self.rows))
            return epoch, self._permutation(epoch), pos, (self.seed, epoch, pos), j
        b, w = self.batch_size, self.world_size
        rank = (i // b) % w
        group, j = divmod((i // (b * w)) * b + i % b, k)
        epoch, p = divmod(group, -(-len(self.rows) // w))
        order = self._rank_order(epoch, rank)
        return epoch, order, p % len(order), (self.seed, epoch, rank, p), j

    def _specs(self, width: int, height: int, key: tuple[int, ...]) -> list[CropSpec]:
        k = self.augment.crops_per_image
        if k == 1 and self.augment.shuffle == "global":  # the sequence of runs before crops_per_image
            return [sample_spec(width, height, self.augment, np.random.default_rng(list(key)))]
        return [sample_spec(width, height, self.augment, np.random.default_rng([*key, j])) for j in range(k)]

    def _bytes(self, idx: int) -> bytes:
        cached = self._cache.get(idx)
        if isinstance(cached, bytes):
            return cached
        data = self.data.read(self.rows[idx])
        if self.augment.cache_images:
            self._cache[idx] = data
        return data

    def _pixels(self, idx: int) -> np.ndarray:
        """HWC uint8 pixels of training image ``idx``: memory map, worker cache or a fresh decode."""
        cached = self._cache.get(idx)
        if isinstance(cached, np.ndarray):
            return cached
        if self._decoded is not None and self._decoded[0] == ("pixels", idx):
            return self._decoded[1]
        row = self.rows[idx]
        if self.pixels is not None and row.sha256 in self.pixels:
            return self.pixels.array(row.sha256)
        pixels = decode_rgb(io.BytesIO(self.data.read(row)))
        if self.augment.cache_images:
            self._cache[idx] = pixels
        elif self.augment.crops_per_image > 1:
            self._decoded = (("pixels", idx), pixels)
        return pixels

    def _crop(self, idx: int, key: tuple[int, ...], j: int) -> tuple[np.ndarray, CropSpec]:
        row = self.rows[idx]
        if self.from_bytes(row):
            # Decoded per crop group: a reduced-scale, top-rows-only decode costs less than keeping
            # full-size pixels around. The decode depends on the group's specs only, so a crop is
            # the same whether or not this worker decoded the image for an earlier crop.
            if self._decoded is None or self._decoded[0] != ("jpeg", idx, key):
                img = Image.open(io.BytesIO(self._bytes(idx)))
                specs = self._specs(img.width, img.height, key)
                decoded, factor = decode_jpeg(img, specs, self.augment)
                self._decoded = (("jpeg", idx, key), decoded, factor, specs)
            _, decoded, factor, specs = self._decoded
            return render_decoded(decoded, factor, specs[j], self.augment), specs[j]
        pixels = self._pixels(idx)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels of shape {pixels.shape}, expected H x W x 3")
        spec = self._specs(pixels.shape[1], pixels.shape[0], key)[j]
        return render_array(pixels, spec, self.augment), spec

    def sample(self, i: int) -> tuple[np.ndarray, dict]:
        """Sample ``i`` as CHW uint8 plus what produced it (image index and crop spec)."""
        epoch, order, pos, key, j = self._draw(i)
        n = len(order)
        # A file that no longer decodes is replaced by the next image of the same epoch's order:
        # deterministic, so every worker and every resume makes the same choice.
        for attempt in range(n):
            idx = int(order[(pos + attempt) % n])
            try:
                crop, spec = self._crop(idx, key, j)
            except _DECODE_ERRORS as exc:
                self.replaced += 1
                self._decoded = None
                r = self.rows[idx]
                log.warning("sample %d: %s (%s in %s) failed to load (%s); using the next image instead", i,
                            r.location, r.member, r.shard, exc)
                continue
            return crop, {"image": idx, "epoch": epoch, "position": pos, **spec.as_dict()}
        raise RuntimeError(f"no training image could be decoded ({n} tried)")

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.sample(i)[0])


def decode_rgb(path: str | Path | BinaryIO) -> np.ndarray:
    """A curated image as HWC uint8 RGB (the array every crop is rendered from)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


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
        else CropStream(data_dir, augment, seed, length, pixel_dir=pixel_store_dir(crops_dir), batch_size=batch_size,
                        world_size=world_size)
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

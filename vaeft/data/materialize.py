"""The optional ``augment`` stage: K crops per training image, rendered ahead of training.

Output directory::

    OUT/index.parquet        one row per crop: shard, row, image sha256, k, and the crop spec
    OUT/shard-00000.npy      uint8 [n, 3, S, S] (plain .npy: byte-identical across runs)
    OUT/pixels/<shard>.npy   with augment.pixel_store: per curated train shard, the decoded images
                             that training reads as pixels, flat uint8, one after the other
    OUT/pixels/index.parquet where each image is in them: sha256, file, offset, height, width
    OUT/run_info.json

Crop k of training image i is drawn from ``rng(seed, k, i)`` (k plays the epoch's role), so the
store does not depend on the worker count. Training reads it through :class:`ShardStream`.
With ``augment.materialize = 0`` the stage writes an empty index and training augments online,
reading the pixel store when there is one. JPEGs that training crops straight from their
bytes (``augment.jpeg_draft``) are not in the pixel store: it would only cost disk, and reading
them as pixels would change their crops.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from vaeft import atomic, provenance
from vaeft.augment.crops import render_array, sample_rng, sample_spec
from vaeft.config import AugmentParams
from vaeft.console import banner, console, progress
from vaeft.data.loader import decode_rgb
from vaeft.data.manifest import ManifestRow, read_manifest
from vaeft.data.shards import ShardStore

INDEX_FILE = "index.parquet"
PIXEL_DIR = "pixels"
PIXEL_INDEX = "index.parquet"


@dataclass(frozen=True)
class MaterializeResult:
    out_dir: Path
    n_crops: int
    n_shards: int


def _decode_member(root: str, row: ManifestRow) -> np.ndarray:
    return decode_rgb(ShardStore(root).open_row(row))


def _crops_of_image(args: tuple[str, ManifestRow, int, AugmentParams, int]) -> tuple[np.ndarray, list[dict]]:
    root, row, image_index, augment, seed = args
    pixels = _decode_member(root, row)
    crops, specs = [], []
    for k in range(augment.materialize):
        spec = sample_spec(pixels.shape[1], pixels.shape[0], augment, sample_rng(seed, k, image_index))
        crops.append(render_array(pixels, spec, augment))
        specs.append({"k": k, **spec.as_dict()})
    return np.stack(crops), specs


def _store_pixels(args: tuple[str, list[ManifestRow], str]) -> int:
    """One shard's images into one flat .npy, filled image by image (never the whole shard in memory)."""
    root, rows, dst = args
    total = sum(r.width * r.height * 3 for r in rows)
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=np.uint8, shape=(total,))
    store, pos = ShardStore(root), 0
    for r in rows:
        pixels = decode_rgb(store.open_row(r))
        if pixels.shape != (r.height, r.width, 3):
            raise ValueError(f"{r.location}: decoded {pixels.shape}, the manifest says {r.height}x{r.width}")
        out[pos:pos + pixels.size] = pixels.reshape(-1)
        pos += pixels.size
    out.flush()
    del out
    store.close()
    return total


def pixel_rows(rows: list[ManifestRow], augment: AugmentParams) -> list[ManifestRow]:
    """The training images that training reads as decoded pixels (see CropStream.from_bytes)."""
    return [r for r in rows if not (augment.jpeg_draft and r.format == "jpeg")]


class PixelStore:
    """The pixel store's images by sha256, each a memory-mapped H x W x 3 view of its shard file."""

    def __init__(self, pixel_dir: str | Path) -> None:
        self.dir = Path(pixel_dir)
        t = pq.read_table(self.dir / PIXEL_INDEX).to_pylist() if (self.dir / PIXEL_INDEX).is_file() else []
        self._where = {r["sha256"]: (r["file"], r["offset"], r["height"], r["width"]) for r in t}
        self._maps: dict[str, np.ndarray] = {}

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._where

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def array(self, sha256: str) -> np.ndarray:
        name, offset, h, w = self._where[sha256]
        if name not in self._maps:  # one map per shard file: a few per run, not one per image
            self._maps[name] = np.load(self.dir / name, mmap_mode="r")
        return self._maps[name][offset:offset + h * w * 3].reshape(h, w, 3)


def materialize_crops(
    data_dir: str | Path, augment: AugmentParams, seed: int, out_dir: str | Path, workers: int | None = None,
    *, force: bool = False,
) -> MaterializeResult:
    """``force``: replace ``out_dir`` even when it is not a crop store vaeft wrote."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    atomic.check_dir_target(out_dir, "crops", force=force, inputs=[data_dir])
    k = augment.materialize
    rows = read_manifest(data_dir, split="train")
    banner("augment", f"{k} crops x {len(rows)} images -> {out_dir}" if k else "materialize = 0: online augmentation")
    workers = workers or max(1, min(len(rows), os.cpu_count() or 1))
    index: list[dict] = []
    pending: list[np.ndarray] = []
    n_shards = 0

    def flush(tmp: Path) -> None:
        nonlocal pending, n_shards
        if pending:
            np.save(tmp / f"shard-{n_shards:05d}.npy", np.concatenate(pending), allow_pickle=False)
            n_shards += 1
            pending = []

    with atomic.atomic_dir(out_dir, "crops", force=force, inputs=[data_dir]) as tmp:
        if k:
            jobs = [(str(data_dir), r, i, augment, seed) for i, r in enumerate(rows)]
            with progress() as bar, ProcessPoolExecutor(workers) as pool:
                task = bar.add_task("augment", total=len(jobs), info="")
                # map() keeps manifest order whatever the worker count: the store is deterministic.
                for (crops, specs), row in zip(pool.map(_crops_of_image, jobs, chunksize=4), rows, strict=True):
                    for crop, spec in zip(crops, specs, strict=True):
                        in_shard = sum(len(p) for p in pending)
                        index.append({"shard": n_shards, "row": in_shard, "image_sha256": row.sha256, "seed": seed, **spec})
                        pending.append(crop[None])
                        if in_shard + 1 == augment.shard_size:
                            flush(tmp)
                    bar.update(task, advance=1)
            flush(tmp)
        stored_bytes = 0
        if augment.pixel_store:
            (tmp / PIXEL_DIR).mkdir()
            by_shard: dict[str, list[ManifestRow]] = {}
            for r in pixel_rows(rows, augment):
                by_shard.setdefault(r.shard, []).append(r)
            px_index = []
            jobs_px = []
            for shard, shard_rows in sorted(by_shard.items()):
                name = Path(shard).with_suffix(".npy").name
                jobs_px.append((str(data_dir), shard_rows, str(tmp / PIXEL_DIR / name)))
                offset = 0
                for r in shard_rows:
                    px_index.append({"sha256": r.sha256, "file": name, "offset": offset, "height": r.height,
                                     "width": r.width})
                    offset += r.width * r.height * 3
            with progress() as bar, ProcessPoolExecutor(max(1, min(workers, len(jobs_px)))) as pool:
                task = bar.add_task("pixel store", total=len(jobs_px), info="")
                for nbytes in pool.map(_store_pixels, jobs_px):
                    stored_bytes += nbytes
                    bar.update(task, advance=1)
            px_schema = pa.schema([("sha256", pa.string()), ("file", pa.string()), ("offset", pa.int64()),
                                   ("height", pa.int32()), ("width", pa.int32())])
            pq.write_table(pa.Table.from_pylist(px_index, schema=px_schema), tmp / PIXEL_DIR / PIXEL_INDEX,
                           compression="zstd", write_statistics=False)
        table = pa.Table.from_pylist(index) if index else pa.table({"shard": pa.array([], pa.int64())})
        pq.write_table(table, tmp / INDEX_FILE, compression="zstd", write_statistics=False)
        provenance.write_run_info(tmp, "augment", {"augment": augment}, seed=seed, crops=len(index), shards=n_shards,
                                  pixel_store_bytes=stored_bytes)
    provenance.record_run(out_dir, "augment")
    console.print(f"augment: {len(index)} crops in {n_shards} shards" if k else "augment: nothing materialised")
    if augment.pixel_store:
        console.print(f"augment: pixel store of {len(pixel_rows(rows, augment))} of {len(rows)} images "
                      f"({'JPEGs are cropped from their bytes' if augment.jpeg_draft else 'every format'}), {stored_bytes / 2**20:.1f} MiB")
    return MaterializeResult(out_dir, len(index), n_shards)


def has_crops(crops_dir: str | Path | None) -> bool:
    """True when ``crops_dir`` holds materialised crops (an empty index means: augment online)."""
    if crops_dir is None or not (Path(crops_dir) / INDEX_FILE).is_file():
        return False
    return pq.read_metadata(Path(crops_dir) / INDEX_FILE).num_rows > 0


def pixel_store_dir(crops_dir: str | Path | None) -> Path | None:
    """The augment stage's pixel store under ``crops_dir``, or None when it wrote none."""
    if crops_dir is None or not (Path(crops_dir) / PIXEL_DIR).is_dir():
        return None
    return Path(crops_dir) / PIXEL_DIR


class ShardStream(Dataset):
    """The virtual sample sequence of a run over materialised crops (same contract as CropStream)."""

    def __init__(self, crops_dir: str | Path, seed: int, length: int) -> None:
        crops_dir = Path(crops_dir)
        index = pq.read_table(crops_dir / INDEX_FILE, columns=["shard", "row"])
        self.shard = index.column("shard").to_numpy()
        self.row = index.column("row").to_numpy()
        if not len(self.shard):
            raise ValueError(f"{crops_dir}: no materialised crops")
        self.dir, self.seed, self.length = crops_dir, seed, length
        self._shards: dict[int, np.ndarray] = {}
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.length

    def _array(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            # Memory-mapped: workers share the page cache instead of each holding a copy.
            self._shards[shard] = np.load(self.dir / f"shard-{shard:05d}.npy", mmap_mode="r")
        return self._shards[shard]

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.shard)
        epoch, pos = divmod(i, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        j = int(self._perm[pos])
        return torch.from_numpy(np.array(self._array(int(self.shard[j]))[int(self.row[j])]))

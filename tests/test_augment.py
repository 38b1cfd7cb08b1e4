"""Augmentation and the training loader: determinism, exactness, the JPEG fast path, resume."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vaeft.augment.crops import CropSpec, naive_crop, render, render_array, sample_rng, sample_spec
from vaeft.config import AugmentParams
from vaeft.data.loader import CropStream, StepSampler, decode_rgb, train_batches
from vaeft.data.manifest import read_manifest
from vaeft.data.shards import ShardStore
from vaeft.metrics.psnr import psnr


def _params(**kw) -> AugmentParams:
    return AugmentParams(**{"crop_size": 32, **kw})


def test_same_seed_same_bytes_different_index_different_crop(curated):
    p = _params(scale_mode="log_uniform", max_angle=10.0, vflip=True)
    a, b = CropStream(curated, p, seed=3, length=100), CropStream(curated, p, seed=3, length=100)
    for i in (0, 1, 57):
        assert a.sample(i)[0].tobytes() == b.sample(i)[0].tobytes()
    crops = {a.sample(i)[0].tobytes() for i in range(20)}
    assert len(crops) == 20
    assert CropStream(curated, p, seed=4, length=100).sample(0)[0].tobytes() != a.sample(0)[0].tobytes()


def test_worker_count_does_not_change_batches(curated):
    p = _params(cache_images=True)
    kw = dict(augment=p, seed=1, batch_size=4, start_step=0, total_steps=5)
    serial = [b.clone() for b in train_batches(curated, num_workers=0, **kw)]
    parallel = [b.clone() for b in train_batches(curated, num_workers=2, **kw)]
    assert len(serial) == 5 and all(torch.equal(x, y) for x, y in zip(serial, parallel, strict=True))


@pytest.mark.parametrize("mode", ["none", "uniform", "log_uniform", "levels"])
@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_every_crop_is_exactly_the_target_size_with_no_padding(mode, angle):
    p = _params(scale_mode=mode, max_angle=angle, vflip=True)
    for w, h in [(47, 300), (300, 47), (64, 64), (333, 211)]:
        img = Image.new("RGB", (w, h), (200, 120, 40))  # any padding would show as black
        for i in range(25):
            rng = sample_rng(0, 0, i)
            spec = sample_spec(w, h, p, rng)
            out = render(img, spec, p)
            assert out.shape == (3, 32, 32) and out.dtype == np.uint8
            assert (np.abs(out.astype(int) - np.array([200, 120, 40])[:, None, None]) <= 2).all(), (w, h, spec)


def test_rotations_and_flips_are_exact_pixel_permutations():
    img = Image.fromarray(skdata.astronaut())
    src = np.asarray(img)
    p = _params(scale_mode="none", rot90=True, hflip=True, vflip=True)
    seen = set()
    for i in range(40):
        spec = sample_spec(img.width, img.height, p, sample_rng(5, 0, i))
        out = render(img, spec, p).transpose(1, 2, 0)
        block = src[spec.top : spec.top + 32, spec.left : spec.left + 32]
        undo = out
        if spec.vflip:
            undo = undo[::-1, :]
        if spec.hflip:
            undo = undo[:, ::-1]
        undo = np.rot90(undo, -spec.rot90)
        assert np.array_equal(undo, block)
        seen.add((spec.rot90, spec.hflip, spec.vflip))
    assert len(seen) >= 8  # the choices really vary


def test_scale_never_upscales_and_spans_the_range():
    p = _params(scale_mode="log_uniform")
    scales = [sample_spec(640, 320, p, sample_rng(0, 0, i)).scale for i in range(300)]
    assert min(scales) >= 32 / 320 and max(scales) <= 1.0
    assert min(scales) < 0.15 and max(scales) > 0.8
    levels = {sample_spec(640, 320, _params(scale_mode="levels", scale_levels=[1.0, 0.5, 0.25]), sample_rng(0, 0, i)).scale
              for i in range(50)}
    assert levels == {1.0, 0.5, 0.25}


def _big_jpeg() -> Image.Image:
    photo = Image.fromarray(skdata.coffee()).resize((1800, 1200), Image.LANCZOS)  # ~2 MP
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_jpeg_fast_path_stays_within_45_db_of_the_exact_path():
    data = _big_jpeg()
    p_fast = AugmentParams(crop_size=128, scale_mode="log_uniform", rot90=False, hflip=False)
    p_exact = p_fast.model_copy(update={"jpeg_draft": False})
    worst, drafted = np.inf, 0
    for i in range(16):
        with Image.open(io.BytesIO(data)) as img:
            spec = sample_spec(img.width, img.height, p_fast, sample_rng(0, 0, i))
            fast = render(img, spec, p_fast)
            drafted += img.size != (1800, 1200)
        with Image.open(io.BytesIO(data)) as img:
            exact = render(img, spec, p_exact)
        worst = min(worst, psnr(exact.transpose(1, 2, 0), fast.transpose(1, 2, 0))[0])
    assert drafted >= 3  # the draft path was really taken
    assert worst >= 45.0


def test_region_resize_matches_resizing_the_whole_image():
    img = Image.fromarray(skdata.astronaut())
    p = _params(crop_size=64, jpeg_draft=False)
    spec = CropSpec(scale=0.5, left=100, top=60, region=64, angle=0.0, rot90=0, hflip=False, vflip=False)
    ours, naive = render(img, spec, p), naive_crop(img, spec, p)
    assert psnr(naive.transpose(1, 2, 0), ours.transpose(1, 2, 0))[0] > 40


def test_sampler_resumes_mid_epoch_with_the_same_remaining_order():
    full = list(StepSampler(0, 10, batch_size=3))
    assert list(StepSampler(4, 10, batch_size=3)) == full[12:]
    ranks = [list(StepSampler(0, 10, batch_size=3, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(60))
    with pytest.raises(ValueError):
        StepSampler(0, 1, 1, rank=2, world_size=2)


def test_resumed_loader_yields_the_tail_of_the_uninterrupted_run(curated):
    p = _params()
    full = list(train_batches(curated, p, 2, 4, 0, 6))
    tail = list(train_batches(curated, p, 2, 4, 3, 6))
    assert all(torch.equal(x, y) for x, y in zip(full[3:], tail, strict=True))


def test_broken_file_is_replaced_deterministically(tmp_path, curated):
    data = tmp_path / "data"
    shutil.copytree(curated, data)
    victim = read_manifest(data, split="train")[0]
    with open(data / victim.shard, "r+b") as fh:  # the member's bytes changed inside its shard
        fh.seek(victim.offset)
        fh.write(b"\0" * victim.size)
    p = _params()
    a, b = CropStream(data, p, seed=0, length=200), CropStream(data, p, seed=0, length=200)
    crops_a = [a.sample(i)[0] for i in range(60)]
    assert a.replaced > 0
    assert all(np.array_equal(x, b.sample(i)[0]) for i, x in enumerate(crops_a))


def test_preview_grid_shows_the_training_samples(tmp_path, curated):
    from vaeft.data.preview import preview_grid

    p = _params()
    result = preview_grid(curated, p, seed=0, out=tmp_path / "grid.png", n=5)
    grid = np.asarray(Image.open(result.path))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 3 columns x 2 rows of 32 px + 2 px gaps
    first = CropStream(curated, p, seed=0, length=5).sample(0)[0].transpose(1, 2, 0)
    assert np.array_equal(grid[2:34, 2:34], first)
    assert len(result.specs) == 5 and {"scale", "rot90", "hflip"} <= set(result.specs[0])


def test_materialized_crops_are_deterministic_and_replayable(tmp_path, curated):
    import pyarrow.parquet as pq

    from vaeft.augment.crops import CropSpec
    from vaeft.data.materialize import INDEX_FILE, ShardStream, has_crops, materialize_crops

    p = _params(materialize=3, shard_size=16, max_angle=5.0)
    one = materialize_crops(curated, p, seed=7, out_dir=tmp_path / "w1", workers=1)
    materialize_crops(curated, p, seed=7, out_dir=tmp_path / "w2", workers=2)
    n_train = len(read_manifest(curated, split="train"))
    assert one.n_crops == 3 * n_train and one.n_shards == -(-one.n_crops // 16)
    for name in [INDEX_FILE] + [f"shard-{i:05d}.npy" for i in range(one.n_shards)]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    # Every stored crop is re-rendered exactly from its recorded spec.
    index = pq.read_table(tmp_path / "w1" / INDEX_FILE).to_pylist()
    rows = {r.sha256: r for r in read_manifest(curated, split="train")}
    spec_fields = set(CropSpec.__dataclass_fields__)
    for entry in index[::7]:
        stored = np.load(tmp_path / "w1" / f"shard-{entry['shard']:05d}.npy")[entry["row"]]
        spec = CropSpec(**{k: v for k, v in entry.items() if k in spec_fields})
        pixels = decode_rgb(ShardStore(curated).open_row(rows[entry["image_sha256"]]))
        assert np.array_equal(render_array(pixels, spec, p), stored)
    stream = ShardStream(tmp_path / "w1", seed=0, length=200)
    assert stream[0].shape == (3, 32, 32) and stream[0].dtype == torch.uint8
    assert has_crops(tmp_path / "w1")


def test_materialize_zero_means_online(tmp_path, curated):
    from vaeft.data.materialize import has_crops, materialize_crops

    result = materialize_crops(curated, _params(), seed=0, out_dir=tmp_path / "none")
    assert result.n_crops == 0 and not has_crops(tmp_path / "none")
    online = list(train_batches(curated, _params(), 0, 4, 0, 2, crops_dir=tmp_path / "none"))
    assert all(torch.equal(a, b) for a, b in zip(online, train_batches(curated, _params(), 0, 4, 0, 2), strict=True))


def test_training_reads_materialized_crops(tmp_path, curated, base_model, tiny_params):
    from vaeft.data.materialize import materialize_crops
    from vaeft.train.engine import train_phase

    aug = tiny_params.augment.model_copy(update={"materialize": 2})
    materialize_crops(curated, aug, tiny_params.seed, tmp_path / "crops")
    result = train_phase("ema", tiny_params, curated, tmp_path / "ft", init=base_model,
                         state_root=tmp_path / "state", crops_dir=tmp_path / "crops")
    assert (result.out_dir / "diffusion_pytorch_model.safetensors").is_file()
    first = next(iter(train_batches(curated, aug, tiny_params.seed, 4, 0, 1, crops_dir=tmp_path / "crops")))
    stored = np.concatenate([np.load(p) for p in sorted((tmp_path / "crops").glob("shard-*.npy"))])
    assert all(any(np.array_equal(x.numpy(), s) for s in stored) for x in first)  # batches come from the store

"""Sharded datasets: the JPEG fast path, deterministic tar shards read by offset, per-rank and remote reads."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from vaeft.config import AugmentParams, DataParams
from vaeft.data.images import ImageLimits, ImageRejected, keeps_original, prepare_for_store
from vaeft.data.loader import CropStream, StepSampler
from vaeft.data.manifest import read_manifest
from vaeft.data.phash import hamming, phash
from vaeft.data.shards import Member, ShardStore, ShardWriter, sidecar_json

from .curate_corpus import photo

LIMITS = ImageLimits(min_side=64, max_aspect=4.0, max_pixels=10_000_000)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_jpeg_fast_path_keeps_bytes_and_catches_truncation():
    arr = photo(1, (640, 480))
    for data in (_jpeg(arr), _jpeg(arr, progressive=True), _jpeg(arr[..., 0])):  # baseline, progressive, gray
        prep = prepare_for_store(data, LIMITS)
        assert prep.data is None and prep.ext == "jpg" and (prep.width, prep.height) == (640, 480)
        assert max(prep.image.size) < 640  # validated by a reduced-scale decode
        # The 1/8-scale decode still reads every entropy-coded block: any cut is caught.
        for cut in (len(data) // 3, len(data) - 600, len(data) - 3):
            with pytest.raises(ImageRejected) as exc:
                prepare_for_store(data[:cut], LIMITS)
            assert exc.value.reason == "truncated_or_corrupt"


def test_jpegs_that_need_normalising_are_re_encoded_deterministically():
    arr = photo(2, (160, 120))
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=95)
    cmyk = buf.getvalue()
    with Image.open(io.BytesIO(cmyk)) as img:
        assert not keeps_original(img)
    a, b = prepare_for_store(cmyk, LIMITS), prepare_for_store(cmyk, LIMITS)
    assert a.ext == "png" and a.data is not None and a.data == b.data
    with Image.open(io.BytesIO(a.data)) as png:
        assert png.mode == "RGB" and np.abs(np.asarray(png).astype(int) - arr).mean() < 6
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(rotated, format="JPEG", exif=exif)
    assert prepare_for_store(rotated.getvalue(), LIMITS).ext == "png"  # upright pixels are stored


def test_phash_of_a_kept_jpeg_matches_its_png_re_encode():
    # The JPEG path hashes a 1/8-scale decode, the PNG path the full pixels. Their 32x32 grays
    # differ by ~1 level, which flips the odd coefficient that sits at the median: within the
    # default near-duplicate radius, so a JPEG and its PNG copy are still found as duplicates.
    radius = DataParams().phash_distance
    dists = []
    for arr in [photo(10 + s, (1024, 768)) for s in range(4)] + [skdata.astronaut(), skdata.coffee()]:
        jpeg = prepare_for_store(_jpeg(arr), LIMITS)
        assert jpeg.ext == "jpg"
        with Image.open(io.BytesIO(_jpeg(arr))) as img:  # the pixels its PNG re-encode would hold
            dists.append(hamming(phash(jpeg.image), phash(img.convert("RGB"))))
        assert phash(jpeg.image) == phash(prepare_for_store(_jpeg(arr), LIMITS).image)  # deterministic
    assert max(dists) <= radius and sum(dists) <= 2 * len(dists), dists


def test_shards_are_deterministic_webdataset_tars_read_by_offset(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    members = []
    for i in range(7):
        f = src / f"{i}.bin"
        f.write_bytes(bytes([i]) * (300 + 700 * i))  # sizes that are not multiples of 512
        members.append(Member(f"k{i:02d}", "jpg", f, sidecar_json("a cat" if i % 2 else "", {"aesthetic": 5.0 + i})))

    def write(root):
        w = ShardWriter(root, "train", max_bytes=6000, max_images=3)
        placed = [w.add(m) for m in members]
        return placed, w.close()

    placed, shards = write(tmp_path / "a")
    placed_b, shards_b = write(tmp_path / "b")
    assert placed == placed_b and len(shards) > 2  # the byte limit closes shards before 3 images
    for s in shards:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes()
    store = ShardStore(tmp_path / "a")
    for m, p in zip(members, placed, strict=True):
        assert store.read(p.shard, p.offset, p.size) == m.source.read_bytes()
    # What webdataset reads: <key>.<ext> then <key>.json, fixed headers, in order.
    with tarfile.open(tmp_path / "a" / shards[0]) as tf:
        infos = tf.getmembers()
        assert [i.name for i in infos] == ["k00.jpg", "k00.json", "k01.jpg", "k01.json"]
        assert {(i.mtime, i.uid, i.gid, i.mode, i.uname) for i in infos} == {(0, 0, 0, 0o644, "")}
        assert json.loads(tf.extractfile("k01.json").read()) == {"aesthetic": 6.0, "caption": "a cat"}
        assert infos[2].offset_data == placed[1].offset


def _samples(stream: CropStream, steps: range, batch: int, rank: int, world: int) -> list[np.ndarray]:
    sampler = StepSampler(steps.start, steps.stop, batch, rank, world)
    return [stream.sample(i)[0] for i in sampler]


def test_remote_dataset_rank_downloads_only_its_shards(tmp_path, curated, s3_endpoint):
    """The curated fixture on moto S3: a rank's crops equal the local ones and only its shards are fetched."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="data")
    for f in sorted(curated.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), "data", f"curated/{f.relative_to(curated).as_posix()}")
    p = AugmentParams(crop_size=32, pixel_store=False, cache_images=False)
    opts = {"endpoint_url": s3_endpoint}
    remote = CropStream("s3://data/curated", p, seed=5, length=10_000, cache_dir=tmp_path / "cache",
                        storage_options=opts)
    local = CropStream(curated, p, seed=5, length=10_000)
    steps, batch, rank, world = range(3, 4), 2, 1, 4
    got = _samples(remote, steps, batch, rank, world)
    assert all(np.array_equal(a, b) for a, b in zip(got, _samples(local, steps, batch, rank, world), strict=True))
    need = {remote.rows[remote.sample(i)[1]["image"]].shard for i in StepSampler(3, 4, batch, rank, world)}
    train_shards = {r.shard for r in remote.rows}
    assert need < train_shards  # the draw is fixed by the seed: this rank needs a strict subset
    cached = {p.relative_to(remote.data.store.cache).as_posix() for p in remote.data.store.cache.rglob("*.tar")}
    assert remote.data.store.touched == need and cached == need
    # Ranged reads: the same crops, one GET per image, nothing staged.
    ranged = CropStream("s3://data/curated", p, seed=5, length=10_000, cache_dir=tmp_path / "nocache",
                        storage_options=opts, shard_cache=False)
    assert all(np.array_equal(a, b) for a, b in zip(got, _samples(ranged, steps, batch, rank, world), strict=True))
    assert ranged.data.store.touched == need and not (tmp_path / "nocache").exists()
    # Evaluation reads the eval split from the same remote root.
    from vaeft.data.evalset import eval_items, load_eval_image

    items = eval_items("s3://data/curated", cache_dir=tmp_path / "cache", storage_options=opts)
    assert [it.row.sha256 for it in items] == [r.sha256 for r in read_manifest(curated, split="eval")]
    assert load_eval_image(items[0], 32).shape == (32, 32, 3)


def test_jpeg_decode_stops_at_the_crops_lowest_row_with_the_full_decodes_pixels():
    from vaeft.augment.crops import _decode_top, _draft, render, render_decoded, sample_rng, sample_spec

    arr = photo(2, (640, 480))
    for data in (_jpeg(arr), _jpeg(arr, progressive=True), _jpeg(arr[..., 0])):  # baseline, progressive, gray
        for draft in (None, (160, 120)):
            with Image.open(io.BytesIO(data)) as full:
                if draft:
                    full.draft("RGB", draft)
                ref = np.asarray(full)
            img = Image.open(io.BytesIO(data))
            if draft:
                img.draft("RGB", draft)
            rows = ref.shape[0] // 2 + 3
            top = np.asarray(_decode_top(img, rows))
            assert top.shape[0] == rows and np.array_equal(top, ref[:rows])
        # A stream cut above the rows the crop reads is an error, as in a full load.
        with pytest.raises(OSError):
            _decode_top(Image.open(io.BytesIO(data[:len(data) // 4])), 400)
    # Crops rendered from the top rows equal crops from the whole (draft-)decoded image: the rows
    # kept reach as far as the Lanczos kernel does.
    p = AugmentParams(crop_size=96, jpeg_draft_oversample=1.0)
    data = _jpeg(arr)
    for i in range(24):
        spec = sample_spec(640, 480, p, sample_rng(7, 0, i))
        got = render(Image.open(io.BytesIO(data)), spec, p)
        with Image.open(io.BytesIO(data)) as whole:
            factor = _draft(whole, spec.scale, 1.0)
            assert np.array_equal(got, render_decoded(whole.convert("RGB"), factor, spec, p)), spec


def test_crops_per_image_and_shard_shuffle_keep_batches_a_function_of_the_step(curated):
    """k crops per decode and per-rank shard sets: the same crops in any order, ranks on disjoint shards."""
    batch, world = 2, 2
    p = AugmentParams(crop_size=32, cache_images=False, crops_per_image=2, shuffle="shards", shuffle_window=1)
    streams = [CropStream(curated, p, seed=3, length=10_000, batch_size=batch, world_size=world) for _ in range(world)]
    n = len(streams[0].rows)
    steps = range(0, -(-n // world) * 2 // batch)  # one epoch: ceil(N / W) images x 2 crops per rank
    metas: dict[int, list[dict]] = {}
    for rank, stream in enumerate(streams):
        metas[rank] = [stream.sample(i)[1] for i in StepSampler(steps.start, steps.stop, batch, rank, world)]
        assert all(m["epoch"] == 0 for m in metas[rank])
        own = set(stream.rank_shards(0, rank))
        # The rank's reads this epoch touch only its shards (and with a window of 1, in shard order).
        assert stream.data.store.touched <= own and {stream.rows[m["image"]].shard for m in metas[rank]} <= own
        pairs = list(zip(metas[rank][::2], metas[rank][1::2], strict=True))
        assert all(a["image"] == b["image"] and a != b for a, b in pairs)  # one image, two different crops
    shards = [set(streams[0].rank_shards(0, r)) for r in range(world)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == {r.shard for r in streams[0].rows}
    assert streams[0].rank_shards(1, 0) != streams[0].rank_shards(0, 0) or len(streams[0].shards) < 3
    # A fresh stream drawing one rank's samples backwards (no decode reused) gives the same crops.
    fresh = CropStream(curated, p, seed=3, length=10_000, batch_size=batch, world_size=world)
    order = list(StepSampler(steps.start, steps.stop, batch, 1, world))
    back = {i: fresh.sample(i)[0] for i in reversed(order)}
    assert all(np.array_equal(back[i], streams[1].sample(i)[0]) for i in order)
    # Global order with k = 2: consecutive samples share their image.
    g = CropStream(curated, p.model_copy(update={"shuffle": "global"}), seed=3, length=10_000)
    assert all(g.sample(2 * j)[1]["image"] == g.sample(2 * j + 1)[1]["image"] for j in range(3))


def test_training_from_a_pinned_remote_dataset_and_a_changed_remote_is_refused(tmp_path, curated, s3_endpoint, monkeypatch):
    """`--data s3://...` or its pin trains from the bucket (resume fingerprint: the manifest's bytes, as for a
    local copy); a new manifest behind the pin is refused before step 1."""
    import boto3

    from vaeft.cli.common import UsageError, require_data
    from vaeft.config import parse_params
    from vaeft.data.manifest import manifest_sha256
    from vaeft.hashing import tree_sha256
    from vaeft.train.engine import train_phase

    from .conftest import tiny_params_dict

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="train-data")
    for f in sorted(curated.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), "train-data", f"curated/{f.relative_to(curated).as_posix()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # what a user's S3-compatible store sets
    monkeypatch.setenv("VAEFT_SHARD_CACHE", str(tmp_path / "cache"))
    url = "s3://train-data/curated"
    assert require_data(url) == url
    with pytest.raises(UsageError, match="no manifest at s3://train-data/elsewhere"):
        require_data("s3://train-data/elsewhere")
    # What infra/k8s/train-node.sh runs on every node when VAEFT_DATA_URL is set.
    from vaeft.cli.pipeline import _with_data

    cmd = _with_data("python -m vaeft train ema --init models/base --data data/curated --out m", url, "train-ema")
    assert cmd == f"python -m vaeft train ema --init models/base --data {url} --out m"
    # What a DVC stage reads instead of the URL: a pin, hashed here from the uploaded copy; one
    # hashed from the bucket itself is the same file.
    from vaeft.data.pin import pin_dataset

    pin = tmp_path / "remote.json"
    pin_dataset(url, pin, local=curated)
    pin_dataset(url, tmp_path / "streamed.json")
    assert pin.read_bytes() == (tmp_path / "streamed.json").read_bytes()
    assert require_data(str(pin)) == pin
    # The state a run saves is keyed by this digest: equal for the URL, the pin, the local copy,
    # and the file hash runs saved before remote data existed.
    assert manifest_sha256(url) == manifest_sha256(pin) == manifest_sha256(curated) \
        == tree_sha256(curated / "manifest.parquet")
    raw = tiny_params_dict()
    raw["train"]["pretrain"].update(steps=2, checkpoint_every=2, image_every=2)
    log = tmp_path / "log.csv"
    result = train_phase("pretrain", parse_params(raw), pin, tmp_path / "out", log_file=log, state_root=tmp_path / "s")
    assert result.steps == 2 and np.isfinite(result.final_loss)
    assert any((tmp_path / "cache").rglob("train-*.tar")) and any((tmp_path / "log-images").glob("step-*.png"))
    # A new manifest at the URL (one image fewer) no longer matches the pin: refused in one line
    # before any training, by the CLI's check and by the trainer itself.
    from vaeft.data.manifest import write_manifest
    from vaeft.data.pin import PinError

    write_manifest(tmp_path / "changed.parquet", read_manifest(curated)[1:])
    s3.upload_file(str(tmp_path / "changed.parquet"), "train-data", "curated/manifest.parquet")
    with pytest.raises(PinError, match=r"no longer matches the pin .*remote.json .*vaeft data pin s3://train-data/curated"):
        require_data(str(pin))
    with pytest.raises(PinError, match="no longer matches"):
        train_phase("pretrain", parse_params(raw), pin, tmp_path / "out2", state_root=tmp_path / "s2")
    assert not (tmp_path / "out2").exists()


def test_torch_resampler_is_the_same_from_jpeg_bytes_and_pixels_and_near_lanczos():
    """``resampler: torch``: the JPEG path (full-resolution top rows) and the pixel path give the
    same crops, repeatably, within 42 dB of Pillow's Lanczos; the default run's resume key is unchanged."""
    from vaeft.augment.crops import _rgbx_view, render, render_array, sample_rng, sample_spec
    from vaeft.metrics.psnr import psnr

    arr = photo(3, (640, 480))
    data = _jpeg(arr)
    with Image.open(io.BytesIO(data)) as whole:
        pixels = np.asarray(whole.convert("RGB"))
        # The JPEG path reads the decoded image's memory in place (no row packing).
        assert np.array_equal(_rgbx_view(whole.convert("RGB"))[..., :3], pixels)
    fast, exact = AugmentParams(crop_size=96, resampler="torch", max_angle=10.0), AugmentParams(crop_size=96, max_angle=10.0)
    dbs = []
    for i in range(16):
        spec = sample_spec(640, 480, fast, sample_rng(5, 0, i))
        got = render(Image.open(io.BytesIO(data)), spec, fast)
        assert got.shape == (3, 96, 96) and got.dtype == np.uint8
        assert np.array_equal(got, render_array(pixels, spec, fast)), spec
        assert np.array_equal(got, render(Image.open(io.BytesIO(data)), spec, fast))
        dbs.append(psnr(got.transpose(1, 2, 0), render_array(pixels, spec, exact).transpose(1, 2, 0))[0])
    assert 42.0 <= min(dbs) < float("inf")  # a different filter, close to the Lanczos one (45 dB here)
    assert "resampler" not in AugmentParams().resume_key() and "resampler" in fast.resume_key()

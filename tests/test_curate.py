"""The curate stage on real package-shipped photos and on a folder of broken and odd files."""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from vaeft.config import DataParams, SourceParams
from vaeft.data.curate import REPORT_FILE, CurationError, assign_splits, curate
from vaeft.data.images import ImageLimits, ImageRejected, load_rgb
from vaeft.data.manifest import MANIFEST_FILE, read_manifest
from vaeft.data.shards import ShardStore

from .curate_corpus import photo, rgb16_png, swapped_primaries_icc


def test_embedded_source_is_curated_and_split(curated):
    rows = read_manifest(curated)
    report = json.loads((curated / REPORT_FILE).read_text())
    assert report["kept"] == len(rows) >= 20
    assert report["train"] > 0 and report["eval"] > 0
    assert all(r.location.startswith("embedded:") for r in rows)  # install-independent
    assert {r.split for r in rows} == {"train", "eval"}
    assert report["per_reason"].get("not_an_image", 0) >= 1  # skimage ships a tif Pillow cannot read
    assert {r.format for r in rows} == {"jpeg", "png"}  # sklearn's JPEG photos keep their bytes
    assert len({r.shard for r in rows if r.split == "train"}) > 1  # params.yaml: a few images a shard
    store = ShardStore(curated)
    for r in rows:
        data = store.read_row(r)
        img = Image.open(io.BytesIO(data))
        assert img.size == (r.width, r.height) and r.shard.startswith(f"shards/{r.split}-")
        assert (img.format, img.mode) in ({("JPEG", "RGB"), ("JPEG", "L")} if r.format == "jpeg" else {("PNG", "RGB")})
        if r.format == "jpeg":
            assert hashlib.sha256(data).hexdigest() == r.sha256  # the original file, byte for byte
    assert [r.split for r in rows] == assign_splits([r.sha256 for r in rows], 0.25)
    assert sum(r.split == "eval" for r in rows) == int(0.25 * len(rows) + 0.5)  # half up


def test_curate_is_byte_identical_on_rerun(tmp_path, curated, tiny_params):
    curate(tiny_params.data, tmp_path / "again")
    assert (tmp_path / "again" / MANIFEST_FILE).read_bytes() == (curated / MANIFEST_FILE).read_bytes()


def test_split_is_exact_in_count_and_stable_per_image():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    # A small folder gets its share, not a coin toss per image (17 at 0.25 gave 8 eval before).
    for n, fraction, n_eval in ((17, 0.25, 4), (2, 0.05, 1), (3, 0.9, 2), (2000, 0.25, 500)):
        assert assign_splits(hashes[:n], fraction).count("eval") == n_eval, (n, fraction)
    splits = assign_splits(hashes, 0.25)
    assert assign_splits(hashes[::-1], 0.25) == splits[::-1]  # a function of the images, not their order
    # Adding m images moves at most m of the others across the split; eval stays a prefix by key.
    for m in (1, 7, 100):
        grown = assign_splits(hashes + [hashlib.sha256(f"new{i}".encode()).hexdigest() for i in range(m)], 0.25)
        assert sum(a != b for a, b in zip(splits, grown[:2000], strict=True)) <= m


_photo = photo


@pytest.fixture
def odd_folder(tmp_path):
    d = tmp_path / "odd"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_photo(1)).save(d / "good.png")
    Image.fromarray(_photo(1)).save(d / "sub" / "good_copy.png")  # exact duplicate bytes
    # smaller, re-encoded copy: different bytes, same picture (de-duplication keeps the larger)
    Image.fromarray(_photo(1)).resize((80, 67), Image.LANCZOS).save(d / "sub" / "good_near.jpg", quality=85)
    Image.fromarray(_photo(2)).save(d / "good.jpg", quality=90)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    buf = io.BytesIO()
    Image.fromarray(_photo(3, (200, 160))).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(_photo(4, (40, 40))).save(d / "tiny.png")
    Image.fromarray(_photo(5, (400, 70))).save(d / "panorama.png")
    Image.new("RGB", (640, 640)).save(d / "bomb.png")  # over the test's max_pixels
    rgba = np.dstack([_photo(6), np.zeros((80, 96), np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(d / "transparent.png")
    Image.fromarray(_photo(7)).convert("P").save(d / "palette.gif")
    Image.fromarray(_photo(8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(96 * 80).reshape(80, 96) * 8).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray(_photo(9)).convert("L").save(d / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_photo(10)).save(d / "exif_rotated.jpg", exif=exif.tobytes())
    reddish = _photo(11).copy()
    reddish[..., 1:] //= 5
    Image.fromarray(reddish).save(d / "icc_swapped.png", icc_profile=swapped_primaries_icc())
    Image.fromarray(_photo(12)).save(d / "icc_garbage.jpg", icc_profile=b"not a profile at all")
    la = np.dstack([np.asarray(Image.fromarray(_photo(13)).convert("L")), np.full((80, 96), 255, np.uint8)])
    Image.fromarray(la, "LA").save(d / "gray_alpha.png")
    (d / "rgb16.png").write_bytes(rgb16_png(_photo(14).astype(np.uint16) * 257))
    frames = [Image.fromarray(_photo(15)).convert("P"), Image.fromarray(_photo(16)).convert("P")]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.fromarray(_photo(17)).save(d / "photo.webp", quality=80)
    Image.fromarray(_photo(18)).save(d / "photo.bmp")
    Image.fromarray(_photo(19)).save(d / "progressive.jpg", progressive=True, quality=90)
    return d


def _odd_params(odd_folder, work, **kw) -> DataParams:
    return DataParams(sources=[SourceParams(name="odd", kind="folder", path=str(odd_folder))], min_side=64,
                      max_pixels=200_000, eval_fraction=0.5, work_dir=str(work), **kw)


def test_odd_files_are_rejected_or_normalised(tmp_path, odd_folder):
    result = curate(_odd_params(odd_folder, tmp_path / "work", workers=1), tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    reasons = {r["location"].split("/")[-1]: r["reason"] for r in report["rejected_files"]}
    assert reasons == {
        "empty.png": "empty_file",
        "text.jpg": "not_an_image",
        "truncated.jpg": "truncated_or_corrupt",
        "tiny.png": "too_small",
        "panorama.png": "extreme_aspect",
        "bomb.png": "too_many_pixels",
    }
    dupes = {r["location"].split("/")[-1]: (r["reason"], r["duplicate_of"].split("/")[-1]) for r in report["duplicate_files"]}
    assert dupes == {"good_copy.png": ("exact_duplicate", "good.png"), "good_near.jpg": ("near_duplicate", "good.png")}
    rows = {r.location.split("/")[-1]: r for r in read_manifest(tmp_path / "out")}
    assert set(rows) == {"good.png", "good.jpg", "transparent.png", "palette.gif", "cmyk.jpg", "gray16.png", "gray.png",
                         "exif_rotated.jpg", "icc_swapped.png", "icc_garbage.jpg", "gray_alpha.png", "rgb16.png",
                         "animated.gif", "photo.webp", "photo.bmp", "progressive.jpg"}
    assert result.n_rejected == 6 and result.n_duplicates == 2
    assert report["per_reason"]["near_duplicate"] == 1 and report["per_source"]["odd"]["seen"] == 24
    assert all(len(r.phash) == 16 for r in rows.values())
    # Plain sRGB-or-untagged JPEGs (a profile LittleCMS cannot parse changes nothing either) keep
    # their bytes; CMYK and EXIF-rotated ones are normalised like every other format.
    assert {n for n, r in rows.items() if r.format == "jpeg"} == {"good.jpg", "progressive.jpg", "icc_garbage.jpg"}
    store = ShardStore(tmp_path / "out")

    def pixels(name: str) -> np.ndarray:
        img = Image.open(store.open_row(rows[name]))
        assert img.mode == "RGB" and img.size == (rows[name].width, rows[name].height)
        return np.asarray(img)

    assert (pixels("transparent.png") == 255).all()  # alpha composited on white
    g16 = pixels("gray16.png")
    assert g16.dtype == np.uint8 and g16.max() > 200  # 16-bit scaled, not clipped to black/white
    assert (rows["exif_rotated.jpg"].width, rows["exif_rotated.jpg"].height) == (80, 96)  # EXIF applied
    swapped = pixels("icc_swapped.png").reshape(-1, 3).mean(0)
    assert swapped[1] > 2 * swapped[0]  # reddish pixels in that profile are green in sRGB
    assert abs(pixels("rgb16.png").astype(int) - _photo(14)).max() <= 1
    assert abs(pixels("photo.bmp").astype(int) - _photo(18)).max() == 0
    assert abs(pixels("animated.gif").astype(int) - np.asarray(Image.fromarray(_photo(15)).convert("P").convert("RGB"))).max() == 0
    la = pixels("gray_alpha.png")
    assert (la[..., 0] == la[..., 1]).all() and (la[..., 1] == la[..., 2]).all()


def test_odd_folder_manifest_is_byte_identical_when_recomputed(tmp_path, odd_folder):
    curate(_odd_params(odd_folder, tmp_path / "w1", workers=1), tmp_path / "a")
    curate(_odd_params(odd_folder, tmp_path / "w2", workers=2), tmp_path / "b")  # fresh work dir, process pool
    assert (tmp_path / "a" / MANIFEST_FILE).read_bytes() == (tmp_path / "b" / MANIFEST_FILE).read_bytes()
    assert (tmp_path / "a" / REPORT_FILE).read_bytes() == (tmp_path / "b" / REPORT_FILE).read_bytes()


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000)).save(path)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageRejected) as exc:
        load_rgb(path, ImageLimits(min_side=64, max_aspect=4.0, max_pixels=1_000_000))
    assert exc.value.reason == "too_many_pixels" and "2000x2000" in exc.value.detail
    assert decoded == []  # refused from the header alone


def test_missing_source_folder_is_a_clear_error(tmp_path):
    params = DataParams(sources=[SourceParams(name="x", kind="folder", path=str(tmp_path / "nope"))],
                        work_dir=str(tmp_path / "work"))
    with pytest.raises(CurationError, match="data source 'x': folder .* does not exist"):
        curate(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_empty_or_all_rejected_source_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    params = DataParams(sources=[SourceParams(name="x", kind="folder", path=str(empty))],
                        work_dir=str(tmp_path / "work"), workers=1)
    with pytest.raises(CurationError, match=f"no images found in {empty}$"):
        curate(params, tmp_path / "out")
    Image.new("RGB", (80, 60)).save(empty / "small.png")
    with pytest.raises(CurationError, match=r"no usable images in .*: all 1 rejected \(too_small 1\)"):
        curate(params.model_copy(update={"work_dir": str(tmp_path / "work2")}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tree_digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_colour_managed_sources_curate_to_identical_bytes_at_any_time_and_worker_count(tmp_path):
    from PIL import ImageCms

    src = tmp_path / "managed"
    src.mkdir()
    reddish = _photo(21).copy()
    reddish[..., 1:] //= 5
    Image.fromarray(reddish).save(src / "swapped.png", icc_profile=swapped_primaries_icc())
    # A LittleCMS-made profile carries its creation time, like the one curation converts into.
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_photo(22)).save(src / "tagged.jpg", quality=90, icc_profile=srgb)
    Image.fromarray(_photo(23)).save(src / "tagged.png", icc_profile=srgb)
    Image.fromarray(_photo(24)).save(src / "plain.png")

    def params(work, workers):
        return DataParams(sources=[SourceParams(name="m", kind="folder", path=str(src))], min_side=64,
                          eval_fraction=0.5, work_dir=str(work), workers=workers)

    import shutil

    curate(params(tmp_path / "work", 1), tmp_path / "a")
    shutil.rmtree(tmp_path / "work")  # nothing reused: every PNG is written again
    time.sleep(1.1)  # profiles made now would carry another second
    curate(params(tmp_path / "work", 2), tmp_path / "b")  # in spawned workers
    a, b = _tree_digests(tmp_path / "a"), _tree_digests(tmp_path / "b")
    rows = read_manifest(tmp_path / "a")
    assert len(rows) == 4 and {r.member.rsplit(".", 1)[1] for r in rows} == {"jpg", "png"}
    assert all(k.startswith("shards/") for k in a if k.endswith(".tar"))
    infos = [json.loads((tmp_path / d / "run_info.json").read_text()) for d in "ab"]
    assert [i["params"]["data"].pop("workers") for i in infos] == [1, 2]  # the params as given
    assert infos[0] == infos[1]
    assert {k: v for k, v in a.items() if k != "run_info.json"} == {k: v for k, v in b.items() if k != "run_info.json"}
    store = ShardStore(tmp_path / "a")
    for r in rows:
        with Image.open(store.open_row(r)) as img:
            if r.format == "png":  # untagged: sRGB by convention
                assert "icc_profile" not in img.info and not img.text
            else:  # kept as it came: its sRGB profile needs no conversion
                assert r.location.endswith("tagged.jpg") and img.info["icc_profile"] == srgb


def test_outputs_do_not_depend_on_commit_or_time_but_the_run_record_keeps_them(tmp_path, monkeypatch):
    """Two runs from different commits and seconds: same bytes; when/where/commit live in the record."""
    import subprocess

    from vaeft.provenance import RUN_INFO_FILE, read_run_record, run_record_path

    repo = tmp_path / "repo"
    src = repo / "photos"
    src.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(_photo(30 + i)).save(src / f"p{i}.png")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    params = DataParams(sources=[SourceParams(name="p", kind="folder", path="photos")], min_side=64,
                        eval_fraction=0.5, work_dir=str(tmp_path / "work"), workers=1)
    records, trees = [], []
    for n in range(2):
        (repo / "note.txt").write_text(f"commit {n}")
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"c{n}"], cwd=repo, check=True)
        out = repo / "data" / f"curated{n}"
        curate(params, out)
        trees.append(_tree_digests(out))
        records.append(read_run_record(out))
        assert run_record_path(out) == repo / ".vaeft" / "runs" / "data" / f"curated{n}.json"
        info = json.loads((out / RUN_INFO_FILE).read_text())
        assert "git" not in info and "created_utc" not in info and info["params"]["data"]["min_side"] == 64
        if n == 0:
            time.sleep(1.1)
    assert trees[0] == trees[1]
    assert records[0]["git"]["commit"] != records[1]["git"]["commit"]
    assert records[0]["created_utc"] != records[1]["created_utc"] and records[1]["host"]
    assert records[0]["run_info_sha256"] == hashlib.sha256((repo / "data/curated0" / RUN_INFO_FILE).read_bytes()).hexdigest()

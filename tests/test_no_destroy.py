"""vaeft never destroys what a user had: outputs replace only their own earlier outputs (or empty
folders) unless --force, refusals come before any work as one line (exit 2), and what vaeft writes
gets the permissions the umask says."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vaeft import atomic
from vaeft.cli import main
from vaeft.model.build import build_autoencoder
from vaeft.model.io import save_diffusers

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """An untrained tiny autoencoder: these tests are about files, not weights."""
    from tests.conftest import tiny_params_dict
    from vaeft.config import parse_params

    out = tmp_path_factory.mktemp("model") / "tiny"
    save_diffusers(build_autoencoder(parse_params(tiny_params_dict()).model.architecture), out)
    return out


def _photos(folder: Path, n: int = 3) -> dict[str, bytes]:
    """A user's folder of photos; returns their bytes to check they survive."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"IMG_{i:04d}.jpg")
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def vaeft(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process the way `python -m vaeft` does; (exit code, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _refused(code: int, err: str, target: Path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing to replace {target}"), err


# ------------------------------------------------------------------------------ convert


def test_convert_refuses_a_folder_of_photos_then_force_replaces_it(tmp_path, model, capsys):
    photos = tmp_path / "my_photos"
    before = _photos(photos, n=22)
    code, err = vaeft(["convert", model, photos, "--to", "diffusers"], capsys)
    _refused(code, err, photos)
    assert "not written by `vaeft pretrain/train/convert` (pass --force to replace it)" in err
    assert _snapshot(photos) == before
    assert [p.name for p in tmp_path.iterdir()] == ["my_photos"]  # no temporary left behind

    code, err = vaeft(["convert", model, photos, "--to", "diffusers", "--force"], capsys)
    assert code == 0, err
    assert (photos / "config.json").is_file() and not list(photos.glob("*.jpg"))


def test_convert_replaces_its_own_output_and_empty_folders(tmp_path, model, capsys):
    out = tmp_path / "converted"
    out.mkdir()  # empty: nothing to lose
    assert vaeft(["convert", model, out, "--to", "diffusers"], capsys)[0] == 0
    assert atomic.output_kind(out) == "model"
    first = _snapshot(out)
    code, err = vaeft(["convert", model, out, "--to", "diffusers"], capsys)  # the rerun
    assert code == 0, err
    assert _snapshot(out) == first  # the marker holds no timestamp: same bytes


def test_convert_never_writes_over_its_input(tmp_path, model, capsys):
    before = _snapshot(model)
    for extra in ([], ["--force"]):
        code, err = vaeft(["convert", model, model, "--to", "diffusers", *extra], capsys)
        assert code == 2 and f"it is or contains the input {model}" in err, err
    ckpt = tmp_path / "vae.safetensors"
    assert vaeft(["convert", model, ckpt, "--to", "ldm"], capsys)[0] == 0
    code, err = vaeft(["convert", ckpt, ckpt, "--to", "ldm"], capsys)
    assert code == 2 and "input" in err, err
    assert _snapshot(model) == before


def test_a_file_never_replaces_a_folder_nor_a_folder_a_file(tmp_path, model, capsys):
    folder = tmp_path / "weights.safetensors"
    before = _photos(folder)
    code, err = vaeft(["convert", model, folder, "--to", "ldm", "--force"], capsys)
    _refused(code, err, folder)
    assert "it is a folder" in err and _snapshot(folder) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, err = vaeft(["convert", model, a_file, "--to", "diffusers", "--force"], capsys)
    _refused(code, err, a_file)
    assert "it is a file" in err and a_file.read_text() == "mine"
    code, err = vaeft(["convert", model, a_file / "vae", "--to", "diffusers"], capsys)
    assert code == 2 and err.strip() == f"error: cannot write {a_file / 'vae'}: {a_file} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "weights.safetensors"]


# ------------------------------------------------------------------------------ curate


def test_curate_refuses_its_source_and_folders_around_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: default thresholds
    src = tmp_path / "photos"
    _photos(src / "holiday")
    before = _snapshot(src)
    for out in (src, src / "curated", tmp_path):  # the source, inside it, around it
        for extra in ([], ["--force"]):
            code, err = vaeft(["curate", "--source", src, "--out", out, *extra], capsys)
            assert code == 2 and f"lies inside the input {src}" in err, (out, err)
    assert _snapshot(src) == before
    assert not (tmp_path / ".vaeft").exists()  # refused before any image was read


def test_curate_refuses_a_user_folder_reruns_on_its_own_output(tmp_path, model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "photos"
    _photos(src, n=12)
    other = tmp_path / "album"
    before = _photos(other)
    code, err = vaeft(["curate", "--source", src, "--out", other], capsys)
    _refused(code, err, other)
    assert "not written by `vaeft curate`" in err and _snapshot(other) == before

    out = tmp_path / "curated"
    assert vaeft(["curate", "--source", src, "--out", out], capsys)[0] == 0
    assert vaeft(["curate", "--source", src, "--out", out], capsys)[0] == 0  # its own output
    assert atomic.output_kind(out) == "curated"
    # A different kind of vaeft output is someone else's output too.
    code, err = vaeft(["export", "--params", REPO_ROOT / "params.yaml", "-m", f"x={model}", "--out", out], capsys)
    _refused(code, err, out)


# ------------------------------------------------------------------------------ export, train, evaluate


def test_export_refuses_user_folder_allows_rerun_and_force(tmp_path, model, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the committed params.yaml
    photos = tmp_path / "share"
    before = _photos(photos)
    code, err = vaeft(["export", "-m", f"tiny={model}", "--out", photos], capsys)
    _refused(code, err, photos)
    assert "not written by `vaeft export`" in err and _snapshot(photos) == before
    out = tmp_path / "export"
    assert vaeft(["export", "-m", f"tiny={model}", "--out", out], capsys)[0] == 0
    sums = (out / "SHA256SUMS").read_text()
    assert atomic.MARKER_FILE not in sums and "tiny/diffusers/config.json" in sums
    assert vaeft(["export", "-m", f"tiny={model}", "--out", out], capsys)[0] == 0
    assert vaeft(["export", "-m", f"tiny={model}", "--out", photos, "--force"], capsys)[0] == 0
    assert (photos / "SHA256SUMS").is_file() and not list(photos.glob("*.jpg"))


@pytest.fixture
def tiny_params_file(tmp_path, tiny_raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def test_a_file_as_out_is_one_line_before_any_training(tmp_path, model, tiny_params_file, capsys, monkeypatch):
    """Was: a traceback after training, with the file moved aside."""
    monkeypatch.setenv("VAEFT_NPROC_PER_NODE", "2")  # a torchrun relaunch would come after the check
    data = tmp_path / "data"
    data.mkdir()  # never read: the refusal comes first
    target = tmp_path / "ft-ema"
    target.write_text("a file of mine")
    state = tmp_path / "state"
    code, err = vaeft(["train", "ema", "--params", tiny_params_file, "--init", model, "--data", data,
                       "--out", target, "--state-dir", state, "--log", tmp_path / "log.csv"], capsys)
    assert code == 2, err
    assert err.strip() == f"error: refusing to replace {target}: it is a file, and the output is a folder"
    assert target.read_text() == "a file of mine"
    assert not state.exists() and not (tmp_path / "log.csv").exists()  # no training (nor torchrun) started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ft-ema", "params.yaml"]


def test_the_loss_curve_png_never_replaces_a_users_png(tmp_path, model, tiny_params_file, capsys):
    """--log x.csv also writes x.png: a PNG there that vaeft did not draw is refused before training."""
    from PIL import Image

    from vaeft.train.logs import write_curve

    data = tmp_path / "data"
    data.mkdir()  # never read: the refusal comes first
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "holiday.png")
    before = (tmp_path / "holiday.png").read_bytes()
    code, err = vaeft(["train", "ema", "--params", tiny_params_file, "--init", model, "--data", data,
                       "--out", tmp_path / "ft", "--state-dir", tmp_path / "state", "--log", tmp_path / "holiday.csv"],
                      capsys)
    assert code == 2 and f"refusing to overwrite {tmp_path / 'holiday.png'}" in err, err
    assert (tmp_path / "holiday.png").read_bytes() == before and not (tmp_path / "state").exists()
    # A curve vaeft drew is its own to redraw.
    from vaeft.train.engine import check_outputs

    write_curve(tmp_path / "mine.csv", [{"step": 1, "loss": 0.5}], "ema")
    check_outputs(tmp_path / "ft", tmp_path / "mine.csv", [data])


def test_pretrain_and_evaluate_refuse_before_any_work(tmp_path, model, tiny_params_file, capsys):
    data = tmp_path / "data"
    data.mkdir()  # empty: any work would fail on it, so exit 2 with our message proves none ran
    photos = tmp_path / "photos"
    before = _photos(photos)
    code, err = vaeft(["pretrain", "--params", tiny_params_file, "--data", data, "--out", photos,
                       "--state-dir", tmp_path / "state"], capsys)
    _refused(code, err, photos)
    assert not (tmp_path / "state").exists()
    code, err = vaeft(["evaluate", "--params", tiny_params_file, "--data", data, "-m", f"m={model}",
                       "--metrics", tmp_path / "eval.json", "--report", photos], capsys)
    _refused(code, err, photos)
    assert "not written by `vaeft evaluate`" in err
    code, err = vaeft(["evaluate", "--params", tiny_params_file, "--data", data, "-m", f"m={model}",
                       "--metrics", photos / "IMG_0000.jpg", "--report", tmp_path / "report"], capsys)
    assert code == 2 and "refusing to overwrite" in err, err
    assert _snapshot(photos) == before and not (tmp_path / "eval.json").exists()


def test_metrics_json_is_not_written_over_a_photo(tmp_path, capsys):
    photos = tmp_path / "ref"
    before = _photos(photos)
    code, err = vaeft(["metrics", "--ref", photos, "--test", photos, "--out", photos / "IMG_0001.jpg"], capsys)
    assert code == 2 and err.strip() == (f"error: refusing to overwrite {photos / 'IMG_0001.jpg'}: vaeft writes "
                                         ".json here, not .jpg files (pass --force to replace it)"), err
    assert _snapshot(photos) == before


# ------------------------------------------------------------------------------ the library's guarantees


def test_a_folder_that_appears_during_the_work_is_still_refused(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(atomic.OutputRefusedError, match="not written by `vaeft export`"):
        with atomic.atomic_dir(target, "export") as tmp:
            (tmp / "a").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "theirs.txt").read_text() == "theirs"


def test_folders_from_before_markers_are_recognised_by_their_run_info(tmp_path):
    old = tmp_path / "curated"
    old.mkdir()
    (old / "run_info.json").write_text(json.dumps({"stage": "curate"}))
    assert atomic.check_dir_target(old, "curated") == old
    with pytest.raises(atomic.OutputRefusedError):
        atomic.check_dir_target(old, "export")


def test_publish_into_a_file_is_refused(tmp_path, model, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    export = tmp_path / "export"
    assert vaeft(["export", "-m", f"tiny={model}", "--out", export], capsys)[0] == 0
    target = tmp_path / "published"
    target.write_text("mine")
    code, err = vaeft(["publish", "--export", export, "--to", target], capsys)
    assert code == 2 and err.strip() == f"error: refusing to publish to {target}: it is a file, not a folder"
    code, err = vaeft(["publish", "--export", export, "--to", export], capsys)
    assert code == 2 and "lies inside the input" in err, err


_UMASK_SCRIPT = textwrap.dedent("""
    import json, os, stat, sys
    from pathlib import Path
    from vaeft import atomic
    from vaeft.config import ExportParams
    from vaeft.export.release import export_models
    from vaeft.publish.local import publish_local

    model, root = Path(sys.argv[1]), Path(sys.argv[2])
    report = {}
    for mask in (0o022, 0o002):
        os.umask(mask)
        assert atomic.current_umask() == mask
        base = root / oct(mask)
        export_models(ExportParams(), {"tiny": model}, base / "export")
        release = publish_local(base / "export", base / "published").path
        modes = {}
        for top in (base / "export", release):
            for p in [top, *top.rglob("*")]:
                modes[str(p.relative_to(base))] = stat.S_IMODE(p.stat().st_mode)
        modes["published/LATEST"] = stat.S_IMODE((base / "published" / "LATEST").stat().st_mode)
        report[oct(mask)] = {k: [oct(v), (base / k).is_dir()] for k, v in modes.items()}
    print(json.dumps(report))
""")


def test_outputs_honour_the_umask(tmp_path, model):
    """Was: every file 0600 and folder 0700, so a release was unreadable by the service serving it."""
    proc = subprocess.run([sys.executable, "-c", _UMASK_SCRIPT, model, tmp_path], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for mask, want_file, want_dir in (("0o22", "0o644", "0o755"), ("0o2", "0o664", "0o775")):
        modes = report[mask]
        assert any(k.endswith("diffusion_pytorch_model.safetensors") for k in modes)
        assert any(k.endswith(".safetensors") and "/ldm/" in k for k in modes)
        assert any(k.startswith("published/") and k.endswith("SHA256SUMS") for k in modes)
        wrong = {k: m for k, (m, is_dir) in modes.items() if m != (want_dir if is_dir else want_file)}
        assert not wrong, (mask, wrong)

"""Shared pieces of the benchmarks: machine description, timing, forked memory probes, random weights.

Importing this module puts the repository root first on ``sys.path``, so a benchmark always runs
the vaeft of the checkout it lives in (not whatever an editable install points at).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vaeft.compat.torchvision_cpu import ensure_torchvision  # noqa: E402

RANDOM_WEIGHTS_NOTE = ("random network weights (LPIPS backbones, Inception): for timing only, "
                       "no metric or loss value printed here means anything")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        return (f"machine: {gpu} (CUDA {torch.version.cuda}); host {cpu}; torch {torch.__version__}; "
                f"load avg {load}")
    return f"machine: CPU only, {cpu}; torch {torch.__version__}; load avg (1/5/15 min) {load}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, queued GPU work included: synchronised before, CUDA events around."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ CPU memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def forked_peak_rss_mib(prepare: Callable[[], object], work: Callable[[object], None]) -> float | None:
    """Peak RSS growth (MiB) of ``work(prepare())`` run alone in a forked child; None if unmeasurable.

    In-process RSS cannot separate two models' steps (glibc keeps freed memory and reuses it for
    the next allocation), so each side runs in its own child and reads its high-water mark. The
    mark is reset (``/proc/self/clear_refs`` 5) after ``prepare()``: what it keeps resident counts,
    its construction transients do not (torchvision builds VGG16's 400 MB classifier only for
    lpips to drop it). Must be called before the parent runs any parallel torch op: GNU OpenMP's
    thread pool does not survive a fork (the child hangs in its first parallel region).
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 1
        try:
            rss0 = _status_kib("VmRSS")
            prepared = prepare()
            Path("/proc/self/clear_refs").write_text("5")
            work(prepared)
            os.write(w, str((_status_kib("VmHWM") - rss0) / 1024).encode())
            code = 0
        except BaseException as err:  # noqa: BLE001 - report, the parent decides
            os.write(w, f"error {type(err).__name__}: {err}".encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    if text.startswith("error"):
        raise RuntimeError(f"memory probe failed in the child: {text}")
    return float(text)


# ------------------------------------------------------------------------------ random weights


_STORE: Path | None = None


@contextlib.contextmanager
def random_weight_store(path: str | Path | None = None) -> Iterator[Path]:
    """This run's weight store of RANDOM LPIPS backbones and a Kaiming-initialised Inception.

    ``path``: a store to use and fill where files are missing (kept). By default a fresh one under
    the temp dir, removed when the run ends: the files (~150 MB) take seconds to write, and a
    fixed shared path raced between concurrent runs. The real weights cannot be downloaded here
    (REFERENCE §6). Inside the ``with``, ``VAEFT_WEIGHTS_DIR`` points at the store.
    """
    global _STORE
    from tests.randweights import write_random_backbone, write_random_inception
    from vaeft.weights import registry

    with contextlib.ExitStack() as stack:
        if path is None:
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vaeft-bench-weights-")))
        else:
            store = Path(path)
        reg = registry()
        for name in ("lpips-vgg", "lpips-alex"):
            if not (store / reg[name].filename).is_file():
                write_random_backbone(store, name)
        if not (store / reg["fid-inception"].filename).is_file():
            write_random_inception(store)
        old_env = os.environ.get("VAEFT_WEIGHTS_DIR")
        os.environ["VAEFT_WEIGHTS_DIR"] = str(store)
        _STORE = store
        try:
            yield store
        finally:
            _STORE = None
            if old_env is None:
                os.environ.pop("VAEFT_WEIGHTS_DIR", None)
            else:
                os.environ["VAEFT_WEIGHTS_DIR"] = old_env


def current_weight_store() -> Path:
    """The store of the enclosing :func:`random_weight_store`."""
    if _STORE is None:
        raise RuntimeError("no random weight store: call inside `with random_weight_store(...)`")
    return _STORE


def add_weights_dir_arg(ap) -> None:
    ap.add_argument("--weights-dir", default=None,
                    help="random weight store to use and fill where files are missing (kept); default: a "
                         "fresh one under the temp dir, removed at exit")


@contextlib.contextmanager
def skip_linear_init():
    """Leave 2-D (Linear) weights uninitialised while building an LPIPS network.

    lpips builds the whole torchvision VGG16 / AlexNet and keeps only ``features``: initialising
    the discarded 102 M-parameter classifier costs seconds per build. Convolutions (the backbone
    and lpips' 1x1 heads) are initialised as usual.
    """
    reset, normal = torch.nn.Linear.reset_parameters, torch.nn.init.normal_

    def lazy_normal(tensor, *args, **kwargs):
        return tensor if tensor.dim() == 2 else normal(tensor, *args, **kwargs)

    torch.nn.Linear.reset_parameters = lambda self: None
    torch.nn.init.normal_ = lazy_normal
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters, torch.nn.init.normal_ = reset, normal


def photo_batch(n: int, size: int, seed: int = 0):
    """uint8 N x 3 x size x size crops of the photos scikit-image ships (numpy, no torch op)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        arr = getattr(skdata, name)()
        photos.append(Image.fromarray(arr[..., :3]))
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(rng.integers(size, min(img.size) + 1))
        left = int(rng.integers(0, img.width - side + 1))
        top = int(rng.integers(0, img.height - side + 1))
        crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        out[i] = np.asarray(crop).transpose(2, 0, 1)
    return out


__all__ = ["ROOT", "RANDOM_WEIGHTS_NOTE", "add_weights_dir_arg", "current_weight_store", "ensure_torchvision",
           "forked_peak_rss_mib", "machine_line", "photo_batch", "pick_device", "random_weight_store",
           "skip_linear_init", "sync", "timed"]

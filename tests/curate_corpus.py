"""Builders for curation test corpora: odd image files, ICC profiles, PNG/tar writers."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size=(96, 80)) -> np.ndarray:
    """A smooth random photo-like RGB array (upscaled noise), distinct per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize(size, Image.BICUBIC))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rgb16_png(arr16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, which Pillow cannot write itself."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\0" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def swapped_primaries_icc() -> bytes:
    """An ICC v2 RGB matrix/TRC profile whose red and green primaries are sRGB's green and red.

    Converting to sRGB must therefore turn reddish pixels greenish: a visible, testable effect.
    """
    srgb_d50 = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}
    xyz = lambda v: b"XYZ \0\0\0\0" + b"".join(_s15(c) for c in v)  # noqa: E731
    curv = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"  # gamma 2.2, padded to 4
    desc_text = b"swapped\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(desc_text)) + desc_text + b"\0" * 12 + b"\0" * 67
    desc += b"\0" * (-len(desc) % 4)
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(srgb_d50["g"])),
            (b"gXYZ", xyz(srgb_d50["r"])), (b"bXYZ", xyz(srgb_d50["b"])), (b"rTRC", curv), (b"gTRC", curv),
            (b"bTRC", curv)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
              + b"acsp" + b"\0" * 24 + b"\0" * 4 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def add_symlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            add_bytes(tf, name, data)
    return path

"""Fault injection: inputs and interruptions that used to go wrong silently, each pinned by a test."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from patchdd.data.sources import open_rgb, scan_class_folders


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (greyscale (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 16-bit RGB."""
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_greyscale_png_is_scaled_not_white(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    image = np.asarray(open_rgb(write_png16(tmp_path / "grey16.png", ramp)))
    assert image.dtype == np.uint8 and image.shape == (8, 32, 3)
    assert image[0, 0].tolist() == [0, 0, 0] and image[0, -1].tolist() == [255, 255, 255]
    assert np.allclose(image[0, :, 0], np.round(ramp[0] / 257), atol=1)  # a ramp, not a white image


def test_16_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), np.uint16)
    pixels[..., 0], pixels[..., 1] = 65535, 32896
    image = np.asarray(open_rgb(write_png16(tmp_path / "rgb16.png", pixels)))
    assert image[0, 0].tolist() == [255, 128, 0]


def test_hidden_folders_inside_class_folders_are_not_images(tmp_path: Path) -> None:
    for name in ("cat/a.png", "cat/.ipynb_checkpoints/a-checkpoint.png", "cat/._b.png", "cat/sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert scan_class_folders(tmp_path, ["cat"]).ids == ["cat/a.png", "cat/sub/c.png"]

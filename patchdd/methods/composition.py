"""Synthetic images from chosen patches (paper Sec. 3.4): crop the ORIGINAL images, resize, tile.

IPC <= ``compose_max_ipc`` (10): every image is ``grid x grid`` (2 x 2) patches, each resized to
``output_size // grid`` and tiled row-major (RDED's layout). Larger IPC: one patch per image at
``output_size``. Crops are taken from the original image files at the stored boxes (PIL crop + antialiased
bicubic resize); nothing passes through the VAE. Every image opened is first checked to be the one that was scored
(its file size in bytes and its pixel size, as the store recorded them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from patchdd.data.sources import ImageSource, open_rgb, reopen_data_module
from patchdd.errors import DataError


@dataclass(frozen=True)
class LayoutOptions:
    """How patches become images: output side, the IPC up to which patches are tiled, tiles per side."""

    output_size: int = 224
    compose_max_ipc: int = 10
    grid: int = 2


@dataclass(frozen=True)
class Layout:
    """The layout of one IPC: ``grid`` tiles per side, each ``tile`` pixels."""

    grid: int
    tile: int

    @property
    def patches_per_image(self) -> int:
        return self.grid * self.grid


def layout_for(ipc: int, options: LayoutOptions) -> Layout:
    """Tiled when ``ipc <= options.compose_max_ipc``, else one patch per image."""
    if ipc < 1:
        raise ValueError(f"IPC must be at least 1, got {ipc}")
    grid = options.grid if ipc <= options.compose_max_ipc else 1
    if options.output_size % grid:
        raise ValueError(f"output_size {options.output_size} is not divisible by grid {grid}")
    return Layout(grid, options.output_size // grid)


def crop_patch(image: Image.Image, box: Sequence[int], size: int) -> np.ndarray:
    """The box ``(x0, y0, x1, y1)`` of ``image`` resized to ``size x size`` (bicubic, antialiased): uint8 (H, W, 3)."""
    patch = image.crop(tuple(int(v) for v in box))
    return np.array(patch.resize((size, size), Image.Resampling.BICUBIC))


def tile_images(tiles: np.ndarray, grid: int) -> torch.Tensor:
    """``(N * grid**2, t, t, 3)`` uint8 tiles -> ``(N, 3, grid*t, grid*t)``; tile ``k`` of an image goes to row
    ``k // grid``, column ``k % grid``."""
    count, t = len(tiles) // (grid * grid), tiles.shape[1]
    if count * grid * grid != len(tiles):
        raise ValueError(f"{len(tiles)} tiles do not fill whole {grid}x{grid} images")
    images = tiles.reshape(count, grid, grid, t, t, 3).transpose(0, 5, 1, 3, 2, 4)
    return torch.from_numpy(np.ascontiguousarray(images.reshape(count, 3, grid * t, grid * t)))


class ImageRecord(NamedTuple):
    """What a store recorded of an original image: its file size (-1: not recorded) and pixel size."""

    file_bytes: int
    width: int
    height: int


class OriginalImages:
    """The original images a store was scored on, opened by image id: for file-based data straight from the
    split's folder (``folder / id``: nothing is listed, only the picked images are touched), otherwise through the
    data module's image source. With ``records`` (the store's record of each image), an image whose file size or
    pixel size differs from the scored one is an error naming it: crops are never cut from a replaced image."""

    def __init__(self, source: ImageSource | None = None, folder: Path | None = None,
                 records: Callable[[str], ImageRecord] | None = None) -> None:
        if (source is None) == (folder is None):
            raise ValueError("OriginalImages needs an image source or an image folder")
        self.source, self.folder, self.records = source, folder, records
        self.position = {image_id: i for i, image_id in enumerate(source.ids)} if source is not None else {}

    @classmethod
    def from_data_spec(cls, data: dict, root: str | None = None,
                       records: Callable[[str], ImageRecord] | None = None) -> "OriginalImages":
        """Reopen the split described by a store manifest's ``data`` (``class_path``, ``init_args``, ``split``).

        ``root`` replaces ``init_args["root"]`` (for a store whose images have moved); without it the absolute root
        the store recorded is used, whatever the working directory.
        """
        root = root or (data.get("fingerprint") or {}).get("root")
        module, split = reopen_data_module(data, root), data.get("split", "train")
        if hasattr(module, "image_folder"):
            folder = Path(module.image_folder(split))
            if not folder.is_dir():
                raise DataError(f"data folder does not exist: {folder} (moved? pass images_root=...)")
            return cls(folder=folder, records=records)
        return cls(source=module.source(split), records=records)

    def load(self, image_id: str) -> Image.Image:
        """The original image ``image_id``, checked against the store's record of it."""
        record = self.records(image_id) if self.records is not None else None
        if self.folder is not None:
            path = self.folder / image_id
            if path.is_file():
                if record is not None and record.file_bytes >= 0 and path.stat().st_size != record.file_bytes:
                    raise DataError(f"image {path} is not the one that was scored: its file has "
                                    f"{path.stat().st_size} bytes, the store recorded {record.file_bytes} (replaced "
                                    "or re-encoded? images_root must point at the original files)")
                return self.checked_size(image_id, open_rgb(path), record)
        elif image_id in self.position:
            return self.checked_size(image_id, self.source.load(self.position[image_id]), record)
        raise DataError(f"image {image_id!r} of the store is not in the data source any more "
                        f"(moved or deleted? pass images_root=...)")

    @staticmethod
    def checked_size(image_id: str, image: Image.Image, record: ImageRecord | None) -> Image.Image:
        """``image``, when its pixel size is the recorded one."""
        if record is not None and image.size != (record.width, record.height):
            raise DataError(f"image {image_id!r} is {image.width}x{image.height}, the store scored it at "
                            f"{record.width}x{record.height}: the images found are not the ones the store was "
                            "scored on (a resized copy? images_root must point at the originals)")
        return image

    def crops(self, image_ids: Sequence[str], boxes: np.ndarray, size: int) -> np.ndarray:
        """``crop_patch`` for every (image, box), each image opened once: uint8 (N, size, size, 3)."""
        out = np.empty((len(image_ids), size, size, 3), np.uint8)
        by_image: dict[str, list[int]] = {}
        for i, image_id in enumerate(image_ids):
            by_image.setdefault(image_id, []).append(i)
        for image_id, rows in by_image.items():
            image = self.load(image_id)
            outside = [boxes[i].tolist() for i in rows if not box_inside(boxes[i], image.size)]
            if outside:
                raise DataError(f"box {outside[0]} lies outside image {image_id!r} ({image.width}x{image.height}): "
                                "the images found are not the ones the store was scored on (a resized copy? "
                                "images_root must point at the originals)")
            for i in rows:
                out[i] = crop_patch(image, boxes[i], size)
        return out


def box_inside(box: Sequence[int], size: tuple[int, int]) -> bool:
    """Whether ``(x0, y0, x1, y1)`` (x1, y1 exclusive) is a non-empty box within an image of ``size`` (w, h)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]

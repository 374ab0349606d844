"""Baseline ``random``: uniformly placed boxes of the store's patch size (in original pixels) on the class's
stored images, every image used once before any is used twice, seeded per class."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from patchdd.methods.base import class_rng
from patchdd.methods.composition import Layout, OriginalImages
from patchdd.methods.selection import Picks
from patchdd.methods.store_index import StoreIndex

if TYPE_CHECKING:
    from patchdd.methods.registry import SynthesisOptions


def patch_box_size(width: int, height: int, patch_size: int, image_size: int,
                   whole_image: bool = False) -> tuple[int, int]:
    """(width, height) in original pixels of a ``patch_size`` patch, scaled as the scorer scaled the image:
    short side to ``image_size`` (aspect kept), or both sides to ``image_size`` when ``whole_image``."""
    if whole_image:
        scale_x, scale_y = width / image_size, height / image_size
    else:
        scale_x = scale_y = min(width, height) / image_size
    return (max(1, min(width, round(patch_size * scale_x))), max(1, min(height, round(patch_size * scale_y))))


def random_boxes(sizes: np.ndarray, count: int, box_size, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uniformly placed boxes: (image positions into ``sizes``, boxes (count, 4)).

    ``box_size(width, height) -> (w, h)`` gives the box of an image. Images are drawn without replacement,
    cycling through fresh permutations when ``count`` exceeds them.
    """
    if len(sizes) == 0:
        raise ValueError("no images to draw random patches from")
    rounds = math.ceil(count / len(sizes))
    chosen = np.concatenate([rng.permutation(len(sizes)) for _ in range(rounds)])[:count]
    boxes = np.empty((count, 4), np.int64)
    for i, (width, height) in enumerate(sizes[chosen]):
        box_w, box_h = box_size(int(width), int(height))
        x0 = int(rng.integers(0, width - box_w + 1))
        y0 = int(rng.integers(0, height - box_h + 1))
        boxes[i] = (x0, y0, x0 + box_w, y0 + box_h)
    return chosen, boxes


class RandomSelector:
    """Uniformly placed boxes of the store's patch size (in original pixels) on the class's stored images."""

    name = "random"

    def __init__(self, index: StoreIndex, seed: int) -> None:
        self.index = index
        self.seed = seed
        self.box_size = partial(patch_box_size, patch_size=int(index.setting("patch_size")),
                                image_size=int(index.setting("image_size")),
                                whole_image=bool(index.store.manifest.settings.get("whole_image", False)))

    @classmethod
    def from_options(cls, index: StoreIndex, images: OriginalImages, options: SynthesisOptions) -> RandomSelector:
        return cls(index, options.seed)

    def options(self) -> dict:
        return {"seed": self.seed}

    def capacity(self, rows: np.ndarray) -> int:
        return np.iinfo(np.int64).max if len(rows) else 0

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        images = self.index.images_of(rows)
        chosen, boxes = random_boxes(self.index.sizes[images], count, self.box_size, class_rng(self.seed, folder))
        return Picks.of(label, self.index.image_ids[images[chosen]], boxes, np.full(count, np.nan))

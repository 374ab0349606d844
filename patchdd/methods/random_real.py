"""Baseline ``random_real``: whole real images drawn at random, seeded per class (DD-Ranking's "random" set, the
reference of its improvement-over-random). Each image is its centred square (as Resize + CenterCrop sees it),
one per synthetic image: a set of whole images is never tiled."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from patchdd.methods.base import class_rng
from patchdd.methods.composition import Layout, OriginalImages
from patchdd.methods.selection import Picks
from patchdd.methods.store_index import StoreIndex

if TYPE_CHECKING:
    from patchdd.methods.registry import SynthesisOptions


def centre_squares(sizes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` boxes of the centred short-side square of images of ``sizes`` ``(N, 2)`` (width, height)."""
    side = sizes.min(axis=1)
    x0, y0 = (sizes[:, 0] - side) // 2, (sizes[:, 1] - side) // 2
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1).astype(np.int64)


class RandomRealSelector:
    """``count`` distinct whole images of the class, drawn at random with a generator per (seed, class)."""

    name = "random_real"
    composes = False

    def __init__(self, index: StoreIndex, seed: int) -> None:
        self.index = index
        self.seed = seed

    @classmethod
    def from_options(cls, index: StoreIndex, images: OriginalImages, options: SynthesisOptions) -> RandomRealSelector:
        return cls(index, options.seed)

    def options(self) -> dict:
        return {"seed": self.seed}

    def capacity(self, rows: np.ndarray) -> int:
        return len(self.index.images_of(rows))

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        images = self.index.images_of(rows)
        chosen = images[np.sort(class_rng(self.seed, folder).choice(len(images), count, replace=False))]
        return Picks.of(label, self.index.image_ids[chosen], centre_squares(self.index.sizes[chosen]),
                        np.full(count, np.nan))

"""The paper's method (Sec. 3.3, supplement 5): per-class k-means on the stored DIFT vectors (cached), clusters
ranked by their median score, members by their distance to the centroid (:mod:`patchdd.methods.selection`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchdd.methods.composition import Layout, OriginalImages
from patchdd.methods.selection import ClusterCache, ClusterOptions, Picks, Selection, select_patches
from patchdd.methods.store_index import StoreIndex

if TYPE_CHECKING:
    from patchdd.methods.registry import SynthesisOptions

CACHE_DIR = "clusters"


class DiffusionSelector:
    """The paper's selection: cached per-class k-means on DIFT vectors, median-score cluster ranking."""

    name = "diffusion"

    def __init__(self, index: StoreIndex, options: ClusterOptions, cache_dir: str | Path) -> None:
        self.index = index
        self.clustering = options
        self.cache = ClusterCache(cache_dir)

    @classmethod
    def from_options(cls, index: StoreIndex, images: OriginalImages, options: SynthesisOptions) -> DiffusionSelector:
        return cls(index, options.clustering, options.cache_dir or index.store.directory / CACHE_DIR)

    def options(self) -> dict:
        return asdict(self.clustering)

    def capacity(self, rows: np.ndarray) -> int:
        return len(rows)

    def selection(self, folder: str, rows: np.ndarray, count: int) -> Selection:
        key = ClusterCache.key(self.index.content_hash, folder, self.clustering)
        clustering = self.cache.get(key, self.index.row_ids(rows), lambda: self.index.features(rows), self.clustering)
        return select_patches(clustering, self.index.scores[rows], count, self.clustering.top_clusters)

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        chosen = self.selection(folder, rows, count)
        picked = rows[chosen.positions]
        return Picks.of(label, self.index.image_ids[picked], self.index.boxes[picked], self.index.scores[picked],
                        store_rows=picked, selection=chosen)

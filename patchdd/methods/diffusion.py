"""The paper's method (Sec. 3.3, supplement 5): per-class k-means on the stored DIFT vectors (cached), clusters
ranked by their median score, members by their distance to the centroid (:mod:`patchdd.methods.selection`)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchdd.methods.composition import Layout, OriginalImages
from patchdd.methods.selection import ClusterCache, ClusterOptions, Clustering, Picks, Selection, select_patches
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

    def clustering_of(self, folder: str, rows: np.ndarray) -> Clustering:
        """The class's k-means (cached on disk and in memory; its DIFT vectors are read only on a miss)."""
        key = ClusterCache.key(self.index.content_hash, folder, self.clustering)
        return self.cache.get(key, self.index.row_ids(rows), lambda: self.index.features(rows), self.clustering)

    def prepare(self, rows_by_class: dict[str, np.ndarray]) -> None:
        """Cluster every class up front, in parallel over the cores with one thread each (on 2 cores k-means takes
        0.2 s a class with one thread and 2.4 s with the default threads competing)."""
        from threadpoolctl import threadpool_limits

        def cluster(folder: str) -> None:
            with threadpool_limits(limits=1):
                self.clustering_of(folder, rows_by_class[folder])

        with ThreadPoolExecutor(max(1, min(len(rows_by_class), os.cpu_count() or 1))) as pool:
            list(pool.map(cluster, rows_by_class))

    def selection(self, folder: str, rows: np.ndarray, count: int) -> Selection:
        clustering = self.clustering_of(folder, rows)
        return select_patches(clustering, self.index.scores[rows], count, self.clustering.top_clusters)

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        chosen = self.selection(folder, rows, count)
        picked = rows[chosen.positions]
        return Picks.of(label, self.index.image_ids[picked], self.index.boxes[picked], self.index.scores[picked],
                        store_rows=picked, selection=chosen)

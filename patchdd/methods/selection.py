"""Stage II selection (paper Sec. 3.3, supplement 5): cluster a class's patches, rank, and choose.

Per class, k-means on the DIFT vectors of the stored patches (k = 32). Clusters are ranked by the MEDIAN score
of their members (high first); inside a cluster, members by their distance to the centroid (near first). From
the top M = 10 clusters, ``count // M`` patches are taken each (``count`` = patches needed: ``4 * IPC`` when
four patches are tiled per image, ``IPC`` otherwise, which is the paper's ``4*IPC // M`` / ``IPC // M``); the
rest is filled with the best-scoring unused patches. No patch is chosen twice.

The clustering does not depend on IPC, M or the class subset: :class:`ClusterCache` keeps it on disk, keyed by
the store's content hash, the clustering settings and the class, so that a new IPC costs only the selection.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from patchdd.errors import NotEnoughPatchesError

CACHE_FORMAT = 1


@dataclass(frozen=True)
class ClusterOptions:
    """k-means settings (part of the cache key) and the number of top clusters drawn from (not part of it)."""

    num_clusters: int = 32
    top_clusters: int = 10
    seed: int = 0
    n_init: int = 3
    max_iter: int = 300

    def cache_fields(self) -> dict:
        """The settings that change the clustering itself."""
        fields = asdict(self)
        fields.pop("top_clusters")
        return fields


@dataclass
class Clustering:
    """k-means result for one class: cluster of every patch and its distance to that cluster's centroid."""

    assignment: np.ndarray  # (N,) int64
    distance: np.ndarray  # (N,) float32

    @property
    def num_clusters(self) -> int:
        return int(self.assignment.max()) + 1 if len(self.assignment) else 0


@dataclass
class Selection:
    """Patches chosen for one class, in composition order; positions index the class's candidate rows."""

    positions: np.ndarray  # (count,) int64
    clusters: np.ndarray  # (count,) cluster id of each chosen patch
    cluster_ranks: np.ndarray  # (count,) rank of that cluster, 0 = highest median score
    member_ranks: np.ndarray  # (count,) rank inside the cluster, 0 = nearest to the centroid
    filled: np.ndarray  # (count,) bool: taken by the best-score fill rather than from a top cluster


def cluster_features(features: np.ndarray, options: ClusterOptions) -> Clustering:
    """k-means with a fixed seed; fewer clusters than asked when the class has fewer distinct vectors."""
    from sklearn.cluster import KMeans

    features = np.asarray(features, np.float64)
    if len(features) == 0:
        return Clustering(np.zeros(0, np.int64), np.zeros(0, np.float32))
    k = min(options.num_clusters, len(np.unique(features, axis=0)))
    kmeans = KMeans(n_clusters=k, random_state=options.seed, n_init=options.n_init, max_iter=options.max_iter)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        assignment = kmeans.fit_predict(features)
    distance = np.linalg.norm(features - kmeans.cluster_centers_[assignment], axis=1)
    return Clustering(_compact_ids(assignment), distance.astype(np.float32))


def _compact_ids(assignment: np.ndarray) -> np.ndarray:
    """Renumber cluster ids to 0..K-1 (k-means can leave a cluster empty)."""
    return np.unique(assignment, return_inverse=True)[1].astype(np.int64)


def rank_clusters(assignment: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Cluster ids ordered by the median score of their members, highest first (ties: lower id first)."""
    ids = np.unique(assignment)
    medians = np.array([np.median(scores[assignment == c]) for c in ids])
    return ids[np.lexsort((ids, -medians))]


def member_order(clustering: Clustering, scores: np.ndarray) -> np.ndarray:
    """Rank of every patch inside its cluster: nearest to the centroid first (ties: higher score, then position)."""
    positions = np.arange(len(scores))
    order = np.lexsort((positions, -scores, clustering.distance, clustering.assignment))
    ranks = np.empty(len(scores), np.int64)
    cluster_of_sorted = clustering.assignment[order]
    starts = np.searchsorted(cluster_of_sorted, cluster_of_sorted, side="left")
    ranks[order] = np.arange(len(order)) - starts
    return ranks


def select_patches(clustering: Clustering, scores: np.ndarray, count: int, top_clusters: int) -> Selection:
    """The paper's rule: ``count // top_clusters`` nearest-to-centroid patches from each of the top clusters,
    then the best-scoring unused patches until ``count``."""
    scores = np.asarray(scores, np.float64)
    if count > len(scores):
        raise NotEnoughPatchesError(f"{count} patches needed but only {len(scores)} available")
    ranked = rank_clusters(clustering.assignment, scores)
    cluster_rank = np.empty(clustering.num_clusters, np.int64)
    cluster_rank[ranked] = np.arange(len(ranked))
    member_rank = member_order(clustering, scores)
    per_cluster = count // top_clusters
    taken = [np.flatnonzero((clustering.assignment == c) & (member_rank < per_cluster)) for c in ranked[:top_clusters]]
    taken = [members[np.argsort(member_rank[members])] for members in taken]
    from_clusters = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    unused = np.setdiff1d(np.arange(len(scores)), from_clusters)
    by_score = unused[np.lexsort((unused, -scores[unused]))]
    fill = by_score[: count - len(from_clusters)]
    positions = np.concatenate([from_clusters, fill]).astype(np.int64)
    return Selection(
        positions=positions,
        clusters=clustering.assignment[positions],
        cluster_ranks=cluster_rank[clustering.assignment[positions]],
        member_ranks=member_rank[positions],
        filled=np.arange(len(positions)) >= len(from_clusters),
    )


class ClusterCache:
    """Per-class clusterings on disk (``<directory>/<key>.npz``) and in memory for the life of the object."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._memory: dict[str, Clustering] = {}
        self.computed = 0  # clusterings computed (not read back) by this object
        self._lock = threading.Lock()  # classes may be clustered on several threads

    @staticmethod
    def key(store_hash: str, folder: str, options: ClusterOptions) -> str:
        parts = {"format": CACHE_FORMAT, "store": store_hash, "class": folder, **options.cache_fields()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def get(self, key: str, row_ids: list[str], features, options: ClusterOptions) -> Clustering:
        """The cached clustering for ``key``, else k-means on ``features()`` (a callable, read only on a miss).

        ``row_ids`` identify the rows in order; a cached file made for other rows is recomputed.
        """
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.npz"
        digest = hashlib.sha256("\n".join(row_ids).encode()).hexdigest()
        clustering = _read_clustering(path, digest)
        if clustering is None:
            clustering = cluster_features(features(), options)
            with self._lock:
                self.computed += 1
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")  # ranks may write the same key at once
            np.savez(tmp, assignment=clustering.assignment, distance=clustering.distance, rows=np.array(digest))
            tmp.replace(path)
        self._memory[key] = clustering
        return clustering


def _read_clustering(path: Path, digest: str) -> Clustering | None:
    if not path.is_file():
        return None
    with np.load(path) as data:
        if str(data["rows"]) != digest:
            return None
        return Clustering(data["assignment"].astype(np.int64), data["distance"].astype(np.float32))


@dataclass
class Picks:
    """Chosen patches of any selector, in composition order: each run of ``grid**2`` consecutive picks of a
    class is one synthetic image. Fields a selector does not produce hold -1 (NaN for a missing score)."""

    labels: np.ndarray  # (N,) int64, label in the synthetic class mapping
    image_ids: np.ndarray  # (N,) object: source image id
    boxes: np.ndarray  # (N, 4) int64: x0, y0, x1, y1 in original pixels
    scores: np.ndarray  # (N,) float32: the selector's score (diffusion: -R(p|c); rded: teacher log-prob)
    clusters: np.ndarray  # (N,) int64
    cluster_ranks: np.ndarray  # (N,) int64
    member_ranks: np.ndarray  # (N,) int64
    filled: np.ndarray  # (N,) bool
    store_rows: np.ndarray  # (N,) int64: row in the store's sorted table

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def of(cls, label: int, image_ids, boxes, scores, store_rows=None, selection: Selection | None = None) -> "Picks":
        """Picks of one class; cluster fields from ``selection`` (else -1)."""
        n = len(image_ids)
        unset = np.full(n, -1, np.int64)
        return cls(
            labels=np.full(n, label, np.int64),
            image_ids=np.asarray(image_ids, dtype=object),
            boxes=np.asarray(boxes, np.int64).reshape(n, 4),
            scores=np.asarray(scores, np.float32),
            clusters=unset if selection is None else selection.clusters.astype(np.int64),
            cluster_ranks=unset if selection is None else selection.cluster_ranks.astype(np.int64),
            member_ranks=unset if selection is None else selection.member_ranks.astype(np.int64),
            filled=np.zeros(n, bool) if selection is None else selection.filled.astype(bool),
            store_rows=unset if store_rows is None else np.asarray(store_rows, np.int64),
        )

    @classmethod
    def concat(cls, parts: list["Picks"]) -> "Picks":
        names = [f.name for f in fields(cls)]
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in names})

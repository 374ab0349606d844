"""The latent statistics store of D3HR: per-class sums of inverted latents, written once per dataset and read by
``generate --method d3hr`` for any IPC and class subset.

Layout (the score store's habits, :mod:`patchdd.formats.stores`)::

    manifest.json                    format, inversion settings, classes, data description and fingerprint
    shards/rank{R}-{S}.safetensors   per class present: count, sum and sum of squares (fp64) of the flattened
                                     latents; metadata: the ids of the images summed

Sums merge by addition, so shards from any number of ranks, in any order, give the same statistics; the image ids
let an interrupted pass resume with the images not yet summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from patchdd.errors import DataError, StoreError
from patchdd.formats.stores import IdShardStore


@dataclass
class ClassSums:
    """Per-class count, sum and sum of squares (fp64) of flattened latents; ``labels`` index the classes."""

    labels: torch.Tensor  # (K,) int64
    count: torch.Tensor  # (K,) int64
    total: torch.Tensor  # (K, D) float64
    squares: torch.Tensor  # (K, D) float64

    @classmethod
    def of(cls, latents: torch.Tensor, labels: torch.Tensor) -> "ClassSums":
        """The sums of a batch of latents (N, ...) with their class labels (N,)."""
        flat = latents.detach().reshape(len(latents), -1).double().cpu()
        labels = labels.cpu().long()
        present = labels.unique()
        rows = [flat[labels == c] for c in present]
        return cls(present, torch.tensor([len(r) for r in rows]), torch.stack([r.sum(0) for r in rows]),
                   torch.stack([r.pow(2).sum(0) for r in rows]))

    @classmethod
    def empty(cls, dims: int = 0) -> "ClassSums":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dims, dtype=torch.float64), torch.zeros(0, dims, dtype=torch.float64))

    def __add__(self, other: "ClassSums") -> "ClassSums":
        labels = torch.cat([self.labels, other.labels])
        present, index = labels.unique(return_inverse=True)
        dims = max(self.total.shape[1], other.total.shape[1])

        def merged(a: torch.Tensor, b: torch.Tensor, shape: tuple) -> torch.Tensor:
            out = torch.zeros(shape, dtype=a.dtype)
            return out.index_add_(0, index, torch.cat([a.reshape(-1, *shape[1:]), b.reshape(-1, *shape[1:])]))

        return ClassSums(present, merged(self.count, other.count, (len(present),)),
                         merged(self.total, other.total, (len(present), dims)),
                         merged(self.squares, other.squares, (len(present), dims)))

    @property
    def images(self) -> int:
        return int(self.count.sum())

    def gaussian(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance (fp64, (D,)) of class ``label``; fewer than 2 latents is an error."""
        rows = (self.labels == label).nonzero()
        count = int(self.count[rows[0, 0]]) if len(rows) else 0
        if count < 2:
            raise DataError(f"class {label} has {count} inverted latent(s): its variance needs at least 2")
        total, squares = self.total[rows[0, 0]], self.squares[rows[0, 0]]
        mean = total / count
        return mean, ((squares - count * mean.pow(2)) / (count - 1)).clamp_min(0.0)


class LatentStatsStore(IdShardStore):
    """A latent statistics store directory: manifest, per-rank shards of :class:`ClassSums`."""

    FORMAT_NAME, FORMAT_VERSION, KIND = "patchdd-latent-stats", 1, "latent statistics store"

    def append(self, sums: ClassSums, image_ids: list[str], rank: int = 0) -> None:
        """Write one shard of sums atomically."""
        self.write_shard({"labels": sums.labels, "count": sums.count, "total": sums.total,
                          "squares": sums.squares}, image_ids, rank)

    def sums(self) -> ClassSums:
        """Every shard merged; an image summed twice is an error (the sums could not be undone)."""
        ids = [i for shard in self.shard_image_ids() for i in shard]
        if len(ids) != len(set(ids)):
            raise StoreError(f"{self.directory} sums some images twice; delete the store and invert again")
        merged = ClassSums.empty()
        for path in self.shard_paths():
            merged = merged + ClassSums(**load_file(str(path)))
        return merged

    def stored_counts(self) -> dict[str, int]:
        """Images summed per class folder."""
        folders = self.manifest.classes["folders"]
        sums = self.sums()
        return {folders[int(label)]: int(count) for label, count in zip(sums.labels, sums.count)}

"""D4M's latent cache: the VAE latent of every training image, encoded once per dataset by a sharded, resumable
``predict`` pass inside ``generate --method d4m`` and read for the prototypes of every IPC.

Layout (the score store's habits, :mod:`patchdd.formats.stores`)::

    manifest.json                    format, encoding settings (VAE hash, size, filter, latent mode, seed, precision),
                                     classes, data description and fingerprint
    shards/rank{R}-{S}.safetensors   latents (N, C, h, w) in the encoding precision's dtype (fp16 under 16-true)
                                     and labels (N,); metadata: the images' ids
    prototypes/ipc{N}-{key}.safetensors   per class, its k-means prototypes at IPC N (``key``: what they depend on)

A latent depends on its image and the settings only (its posterior noise is seeded by (seed, image id)), so the
cache is the same whatever the world size or the batching, and a cut pass resumes with the images not yet encoded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchdd.errors import StoreError
from patchdd.formats.stores import IdShardStore


class LatentCache(IdShardStore):
    """A latent cache directory: manifest, per-rank shards of per-image latents."""

    FORMAT_NAME, FORMAT_VERSION, KIND = "patchdd-latent-cache", 1, "latent cache"

    def append(self, latents: torch.Tensor, labels: torch.Tensor, image_ids: list[str], rank: int = 0) -> None:
        """Write one shard of latents atomically, in the dtype they were encoded in."""
        self.write_shard({"latents": latents.cpu(), "labels": labels.long().cpu()}, image_ids, rank)

    def rows_by_class(self) -> dict[int, list[tuple[str, Path, int]]]:
        """Per class label, where each of its images' latents lies: (image id, shard, row), sorted by id, so that
        a class reads the same latents in the same order whatever the sharding. An image held twice is an error."""
        from safetensors import safe_open

        rows: dict[int, list[tuple[str, Path, int]]] = {}
        seen: set[str] = set()
        for path, ids in zip(self.shard_paths(), self.shard_image_ids()):
            with safe_open(str(path), "pt") as shard:
                labels = shard.get_tensor("labels").tolist()
            for row, (image_id, label) in enumerate(zip(ids, labels)):
                if image_id in seen:
                    raise StoreError(f"{self.directory} holds the image {image_id} twice; delete the cache")
                seen.add(image_id)
                rows.setdefault(label, []).append((image_id, path, row))
        return {label: sorted(members) for label, members in rows.items()}

    def latents_of(self, rows: list[tuple[str, Path, int]]) -> torch.Tensor:
        """The latents (N, C, h, w) at ``rows`` (from :meth:`rows_by_class`), in that order; one class at a time
        (ImageNet's 1,300 latents of a class at 512 px are 43 MB in fp16; the whole cache is 1,000 times that)."""
        from safetensors import safe_open

        latents = []
        for path in dict.fromkeys(path for _, path, _ in rows):
            with safe_open(str(path), "pt") as shard:
                table = shard.get_slice("latents")
                latents += [(image_id, table[row:row + 1][0]) for image_id, p, row in rows if p == path]
        order = {image_id: i for i, (image_id, _, _) in enumerate(rows)}
        return torch.stack([latent for _, latent in sorted(latents, key=lambda item: order[item[0]])])

    def stored_counts(self) -> dict[str, int]:
        """Images encoded per class folder."""
        folders = self.manifest.classes["folders"]
        return {folders[label]: len(members) for label, members in self.rows_by_class().items()}

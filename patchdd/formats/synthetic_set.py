"""The synthetic training set handed from Stage II (distillation) to the student trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from patchdd.data.sources import ClassMapping


@dataclass
class SyntheticSet(Dataset):
    """Distilled images held in memory as uint8, ready to live on the GPU; also a ``torch.utils.data.Dataset`` of
    ``(image, label)`` pairs (uint8 (3, H, W), int), for a loop of one's own::

        images, picks = patchdd.synthetic_set("runs/demo/scores", ipc=10)
        loader = torch.utils.data.DataLoader(images, batch_size=32, shuffle=True)

    ``grid`` is the number of tiles per side of every image: 2 for the 2x2 composition of four patches
    (IPC <= 10 in the paper and RDED), 1 for one patch per image. The student's patch-shuffle augmentation
    reads it.

    Args:
        images: (N, 3, H, W) uint8.
        labels: (N,) int64, indices into ``classes``.
        classes: the class mapping of the labels.
        grid: tiles per side of every image.
    """

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64, indices into ``classes``
    classes: ClassMapping
    grid: int = 1

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"SyntheticSet.images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError("SyntheticSet needs one label per image")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError("SyntheticSet label outside the class mapping")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def images_per_class(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=len(self.classes))

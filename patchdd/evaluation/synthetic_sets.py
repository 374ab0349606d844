"""What a synthetic set looks like to a reader, before any student is trained: how often a teacher recognises its
images, and how varied each class's images are. Plain functions on tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def class_diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """1 - the mean pairwise cosine similarity of each class's images, averaged over the classes with at least
    two: each image (uint8 or float, N x C x H x W) flattened and standardised (mean 0, std 1 over its pixels), so
    brightness does not count. 0: copies of one image; about 1: unrelated images."""
    flat = images.flatten(1).float()
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)
    unit = F.normalize(flat, dim=1)
    per_class = []
    for label in labels.unique():
        members = unit[labels == label]
        n = len(members)
        if n > 1:
            similarity = (members @ members.T).sum() - n  # off-diagonal
            per_class.append(1 - float(similarity) / (n * (n - 1)))
    if not per_class:
        raise ValueError("diversity needs a class with at least two images (IPC >= 2)")
    return sum(per_class) / len(per_class)


@torch.no_grad()
def recognition_rate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, image_size: int,
                     mean: Sequence[float], std: Sequence[float], batch_size: int = 256) -> float:
    """Share of ``images`` (uint8, N x C x H x W) that ``model`` (in eval mode) assigns to their label, each image
    resized to ``image_size`` (bilinear, antialiased) and normalised with ``mean`` / ``std``."""
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float() / 255
        if batch.shape[-1] != image_size or batch.shape[-2] != image_size:
            batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
        predicted = model((batch - mean_t) / std_t).argmax(1)
        correct += int((predicted == labels[start:start + batch_size]).sum())
    return correct / len(images)

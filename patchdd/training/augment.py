"""The student's training augmentation (RDED's evaluation protocol), batched on the device or per sample on the CPU.

Per image, in RDED's order (LINs-lab/RDED ``validation/main.py``): ShufflePatches(grid) -> RandomResizedCrop(size,
scale, antialias) -> RandomHorizontalFlip -> normalisation; then per batch CutMix or Mixup.

Two paths draw from the same distribution:

* :func:`augment_batch` takes a uint8 batch already on the device and does everything in a few batched kernels:
  tile permutation by one gather, crop boxes drawn for the whole batch exactly as torchvision's
  ``RandomResizedCrop.get_params`` draws them (:func:`sample_crop_boxes`), and the crops resized by one
  ``roi_align`` call (bilinear; several samples per output pixel when a crop shrinks, which plays the role of
  antialiasing);
* :func:`per_sample_transform` is a callable on one uint8 CHW tensor for CPU data-loader workers, built from
  torchvision's own transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2

from patchdd.data.pixels import normalize
from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD

ShuffleMode = Literal["strips", "tiles"]
MixMode = Literal["cutmix", "mixup", "none"]
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


@dataclass
class AugmentOptions:
    """Per-image augmentation of the student (RDED's values as defaults).

    ``shuffle`` chooses how the ``grid x grid`` tiles of a composed image are reordered: ``strips`` is RDED's
    ShufflePatches (a random order of the tile columns, then of the tile rows), ``tiles`` any permutation of the
    tiles. The grid itself comes from the synthetic set (2 for 2x2 compositions, 1 = no shuffle).

    ``scale`` is the RandomResizedCrop area range; ``None`` (the default) is RDED's rule ``(1 / factor, 1)`` with
    the set's composition factor: ``(0.5, 1)`` for 2x2 sets, ``(1, 1)`` for one patch per image.

    ``enabled: false`` is DD-Ranking's no-augmentation protocol: Resize + Normalize only (no tile shuffle, crop,
    flip, and no mixing in the student).
    """

    enabled: bool = True
    image_size: int = 224
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    shuffle: ShuffleMode = "strips"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def tile_permutations(batch: int, grid: int, mode: ShuffleMode, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, grid*grid) source-tile index of every output tile (row-major), one random order per image."""
    if mode == "tiles":
        return torch.rand(batch, grid * grid, generator=generator, device=device).argsort(1)
    if mode == "strips":
        rows = torch.rand(batch, grid, generator=generator, device=device).argsort(1)
        cols = torch.rand(batch, grid, generator=generator, device=device).argsort(1)
        return (rows[:, :, None] * grid + cols[:, None, :]).reshape(batch, grid * grid)
    raise ValueError(f"unknown shuffle mode {mode!r}; choose 'strips' or 'tiles'")


def shuffle_patches(images: torch.Tensor, grid: int, mode: ShuffleMode = "strips",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Reorder the ``grid x grid`` tiles of every image of (B, C, H, W) independently.

    Sides that ``grid`` does not divide lose their last ``H % grid`` rows / ``W % grid`` columns, as in RDED.
    """
    if grid <= 1:
        return images
    b, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"images of {h}x{w} px cannot be split into {grid}x{grid} tiles")
    tiles = images[:, :, : th * grid, : tw * grid].reshape(b, c, grid, th, grid, tw)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, th, tw)
    order = tile_permutations(b, grid, mode, generator, images.device)
    tiles = tiles[torch.arange(b, device=images.device)[:, None], order]
    return tiles.reshape(b, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, th * grid, tw * grid)


def sample_crop_boxes(batch: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, 4) integer boxes ``x0, y0, x1, y1`` drawn like ``torchvision RandomResizedCrop.get_params``.

    Each row takes the first of ten independent attempts that fits (area fraction uniform in ``scale``, log
    aspect ratio uniform in ``log(ratio)``, sides rounded, position uniform); rows with no fitting attempt get
    torchvision's central fallback. Drawn on ``device`` (no host-device synchronisation on a GPU).
    """
    area = height * width
    draws = torch.rand(2, batch, CROP_ATTEMPTS, generator=generator, device=device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[1]
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1)
    rows = torch.arange(batch, device=device)
    w, h, found = w[rows, first], h[rows, first], fits.any(1)
    fallback_w, fallback_h = central_fallback(height, width, ratio)
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
    u = torch.rand(batch, 2, generator=generator, device=device)
    y0 = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), float((height - fallback_h) // 2))
    x0 = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), float((width - fallback_w) // 2))
    return torch.stack([x0, y0, x0 + w, y0 + h], 1).long()


def central_fallback(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """Width and height of torchvision's fallback crop: the whole image, clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Float crops (B, C, size, size) of ``images`` at integer ``boxes`` (x0, y0, x1, y1), bilinear.

    Sample positions equal ``F.interpolate(crop, size, mode="bilinear", align_corners=False)``; a crop larger
    than ``size`` is averaged over ``ceil(side / size)`` samples per output pixel and side.
    """
    rois = torch.cat([torch.arange(len(images), device=images.device, dtype=torch.float32)[:, None],
                      boxes.to(images.device, torch.float32)], 1)
    return roi_align(images.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def crop_scale(options: AugmentOptions, grid: int) -> tuple[float, float]:
    """The crop area range: ``options.scale``, or RDED's ``(1 / factor, 1)`` for a set of ``grid x grid`` images."""
    return tuple(options.scale) if options.scale is not None else (1 / grid, 1.0)


def augment_batch(images: torch.Tensor, grid: int, options: AugmentOptions,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """RDED's per-image augmentation of a uint8 batch (B, 3, H, W) on its own device -> normalised float."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"augment_batch needs a uint8 (B, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    if not options.enabled:
        resized = F.interpolate(images.float(), size=(options.image_size, options.image_size), mode="bilinear",
                                antialias=True, align_corners=False)
        return normalize(resized, options.mean, options.std)
    images = shuffle_patches(images, grid, options.shuffle, generator)
    boxes = sample_crop_boxes(len(images), images.shape[2], images.shape[3], crop_scale(options, grid),
                              options.ratio, generator, images.device)
    crops = resized_crops(images, boxes, options.image_size)
    if options.flip:
        crops = random_flip(crops, generator)
    return normalize(crops, options.mean, options.std)


class ShufflePatches(torch.nn.Module):
    """:func:`shuffle_patches` for one CHW image (a picklable step of a CPU transform)."""

    def __init__(self, grid: int, mode: ShuffleMode = "strips") -> None:
        super().__init__()
        self.grid, self.mode = grid, mode

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return shuffle_patches(image[None], self.grid, self.mode)[0]


def per_sample_transform(grid: int, options: AugmentOptions) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same augmentation for one uint8 CHW tensor (CPU data-loader workers), from torchvision's transforms."""
    if not options.enabled:
        return v2.Compose([v2.Resize((options.image_size, options.image_size), antialias=True),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(options.mean, options.std)])
    steps: list[Callable] = [ShufflePatches(grid, options.shuffle)] if grid > 1 else []
    steps.append(v2.RandomResizedCrop(options.image_size, scale=crop_scale(options, grid), ratio=options.ratio,
                                      antialias=True))
    if options.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(options.mean, options.std)]
    return v2.Compose(steps)


@dataclass
class MixedBatch:
    """A mixed batch: ``images``, the ``partner`` of each image (a permutation of the batch; None when nothing
    was mixed) and ``own_fraction``, the share of each image that is still its own (CutMix: the area outside the
    box; Mixup: lambda), which weighs the two labels of a hard-label loss."""

    images: torch.Tensor
    partner: torch.Tensor | None = None
    own_fraction: float = 1.0


def cutmix(images: torch.Tensor, alpha: float = 1.0) -> MixedBatch:
    """Paste one random box of a shuffled copy of the batch into every image (RDED's CutMix, one box per batch).

    lambda ~ Beta(alpha, alpha); box sides ``int(side * sqrt(1 - lambda))`` around a uniform centre, clipped; the
    own fraction is the area outside the clipped box (as IDC weighs its two cross-entropies).
    """
    b, _, h, w = images.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    partner = torch.randperm(b, device=images.device)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[partner, :, y0:y1, x0:x1]
    return MixedBatch(mixed, partner, 1 - (y1 - y0) * (x1 - x0) / (h * w))


def mixup(images: torch.Tensor, alpha: float = 0.8) -> MixedBatch:
    """Blend every image with one of a shuffled copy of the batch: ``lam * x + (1 - lam) * x[perm]``."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(images), device=images.device)
    return MixedBatch(lam * images + (1 - lam) * images[partner], partner, lam)


def mix_batch(images: torch.Tensor, mode: MixMode, cutmix_alpha: float = 1.0, mixup_alpha: float = 0.8) -> MixedBatch:
    """Apply the per-batch mixing ``mode`` (``cutmix``, ``mixup`` or ``none``)."""
    if mode == "cutmix":
        return cutmix(images, cutmix_alpha)
    if mode == "mixup":
        return mixup(images, mixup_alpha)
    if mode == "none":
        return MixedBatch(images)
    raise ValueError(f"unknown mixing {mode!r}; choose 'cutmix', 'mixup' or 'none'")


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mixed: MixedBatch) -> torch.Tensor:
    """Cross-entropy on the labels of a mixed batch: ``own * CE(labels) + (1 - own) * CE(partner's labels)`` (IDC's
    CutMix loss; plain cross-entropy when nothing was mixed)."""
    loss = F.cross_entropy(logits, labels)
    if mixed.partner is None:
        return loss
    return mixed.own_fraction * loss + (1 - mixed.own_fraction) * F.cross_entropy(logits, labels[mixed.partner])

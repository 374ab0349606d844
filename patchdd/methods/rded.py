"""Baseline ``rded`` (Sun et al., CVPR 2024, LINs-lab/RDED): teacher-scored random crops.

Sample ``images_per_class`` images of a class (their scripts: 300), take ``crops_per_image`` square
random-resized crops of each (5; area scale 0.08-1, aspect 1), resize each to the tile size, zero-pad it (in
normalised space) to the teacher's input size, score it by the teacher's log-probability of the true class, keep
the best crop per image and the best images per class. At a tiled layout image ``i`` gets the crops ranked
``i, n+i, 2n+i, 3n+i`` (``n`` = IPC), as RDED tiles them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from patchdd.data.pixels import normalize
from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD, ClassMapping, teacher_class_folders
from patchdd.errors import NotEnoughPatchesError
from patchdd.methods.base import class_rng
from patchdd.methods.composition import Layout, OriginalImages
from patchdd.methods.selection import Picks
from patchdd.methods.store_index import StoreIndex
from patchdd.training.augment import sample_crop_boxes
from patchdd.training.zoo import build_model, recorded_class_mapping

if TYPE_CHECKING:
    from patchdd.methods.registry import SynthesisOptions

SQUARE = (1.0, 1.0)  # RDED's crops: RandomResizedCrop with aspect ratio 1

@dataclass(frozen=True)
class RDEDOptions:
    """RDED's settings (defaults from its ImageNet scripts) and the teacher that scores the crops.

    ``teacher_kwargs`` go to :func:`build_model` (e.g. ``{"width": 64}`` for a ConvNet).
    ``teacher_classes``: the teacher's output classes: ``None`` = the store's class list, ``"imagenet1k"`` = the
    1000 ImageNet wnids (hub-pretrained models), or a ``class_mapping.json`` written by a teacher run.
    ``teacher_image_size``: the teacher's input side (``None`` = the output size).
    """

    teacher: str = "resnet18"
    teacher_kwargs: dict | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    teacher_classes: str | None = None
    teacher_image_size: int | None = None
    images_per_class: int = 300
    crops_per_image: int = 5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 100
    device: str = "auto"


def teacher_inputs(crops: np.ndarray, input_size: int, mean, std) -> torch.Tensor:
    """uint8 (N, t, t, 3) crops -> normalised (N, 3, S, S): zero-padded around the centre when ``t < S``
    (RDED scores a tile padded to the full input), resized when ``t > S``."""
    x = normalize(torch.from_numpy(crops).permute(0, 3, 1, 2), mean, std)
    t = x.shape[-1]
    if t > input_size:
        return F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    before = (input_size - t) // 2
    return F.pad(x, (before, input_size - t - before, before, input_size - t - before))


class TeacherScorer:
    """A teacher network scoring crops by its log-probability of a class."""

    def __init__(self, options: RDEDOptions, store_classes: ClassMapping, output_size: int) -> None:
        self.options = options
        if not (options.pretrained or options.checkpoint):
            raise ValueError("the rded method ranks crops with a teacher: give it weights (rded.checkpoint=PATH or "
                             "rded.pretrained=true); a random network's ranking is noise")
        spec = options.teacher_classes or recorded_class_mapping(options.checkpoint)
        folders = teacher_class_folders(spec, store_classes.folders)
        self.index = {folder: i for i, folder in enumerate(folders)}
        self.input_size = options.teacher_image_size or output_size
        self.device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if options.device == "auto" else options.device)
        model = build_model(options.teacher, num_classes=len(folders), pretrained=options.pretrained,
                            checkpoint=options.checkpoint, image_size=self.input_size,
                            **(options.teacher_kwargs or {}))
        self.model = model.eval().to(self.device)

    def class_index(self, folder: str) -> int:
        if folder not in self.index:
            raise ValueError(f"class {folder!r} is not among the teacher's classes (set rded.teacher_classes)")
        return self.index[folder]

    @torch.no_grad()
    def log_probs(self, crops: np.ndarray, folder: str) -> np.ndarray:
        """log p(class | crop) for uint8 crops (N, t, t, 3)."""
        target = self.class_index(folder)
        out = []
        for start in range(0, len(crops), self.options.batch_size):
            x = teacher_inputs(crops[start:start + self.options.batch_size], self.input_size,
                               self.options.mean, self.options.std)
            logits = self.model(x.to(self.device)).float()
            out.append(logits.log_softmax(1)[:, target].cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def rded_tile_order(count: int, grid: int) -> np.ndarray:
    """Order of ranked crops so that consecutive ``grid**2`` form RDED's images: image ``i`` gets ranks
    ``i, n+i, 2n+i, ...`` with ``n = count // grid**2``."""
    per_image = grid * grid
    return np.arange(count).reshape(per_image, count // per_image).T.ravel()


def rded_pick(sizes: np.ndarray, count: int, grid: int, crop_and_score, options: RDEDOptions,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RDED for one class: (image positions into ``sizes``, boxes, scores) of ``count`` crops in tile order.

    ``crop_and_score(positions, boxes) -> scores`` crops the images at the boxes and scores them.
    """
    sampled = min(options.images_per_class, len(sizes))
    if sampled < count:
        raise NotEnoughPatchesError(f"RDED keeps one crop per image: {count} needed but only {sampled} images "
                                    f"sampled (images_per_class={options.images_per_class}, {len(sizes)} images)")
    images = np.sort(rng.choice(len(sizes), sampled, replace=False))
    m = options.crops_per_image
    generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    boxes = torch.cat([sample_crop_boxes(m, int(h), int(w), options.crop_scale, SQUARE, generator)
                       for w, h in sizes[images]]).numpy()
    scores = np.asarray(crop_and_score(np.repeat(images, m), boxes)).reshape(sampled, m)
    best = scores.argmax(1)
    best_scores = scores[np.arange(sampled), best]
    ranked = np.argsort(-best_scores, kind="stable")[:count][rded_tile_order(count, grid)]
    return images[ranked], boxes.reshape(sampled, m, 4)[ranked, best[ranked]], best_scores[ranked]


class RDEDSelector:
    """RDED: teacher-scored random crops, one per image, the most confident images per class."""

    name = "rded"

    def __init__(self, index: StoreIndex, images: OriginalImages, options: RDEDOptions, seed: int,
                 output_size: int) -> None:
        self.index = index
        self.images = images
        self.rded = options
        self.seed = seed
        self.scorer = TeacherScorer(options, index.classes, output_size)

    @classmethod
    def from_options(cls, index: StoreIndex, images: OriginalImages, options: SynthesisOptions) -> RDEDSelector:
        return cls(index, images, options.rded, options.seed, options.layout.output_size)

    def options(self) -> dict:
        return {**asdict(self.rded), "seed": self.seed}

    def capacity(self, rows: np.ndarray) -> int:
        return min(self.rded.images_per_class, len(self.index.images_of(rows)))

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        images = self.index.images_of(rows)
        ids = self.index.image_ids[images]

        def crop_and_score(positions: np.ndarray, boxes: np.ndarray) -> np.ndarray:
            return self.scorer.log_probs(self.images.crops(ids[positions], boxes, layout.tile), folder)

        chosen, boxes, scores = rded_pick(self.index.sizes[images], count, layout.grid, crop_and_score,
                                          self.rded, class_rng(self.seed, folder))
        return Picks.of(label, ids[chosen], boxes, scores)

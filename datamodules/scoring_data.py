"""The data side of Stage I: original images resized into shape buckets, sharded over ranks, resumable.

:class:`ScoringDataModule` wraps a real data module (``datamodules.real``), reads the originals of one split
through its ``source(split).load(i)``, keeps a seeded subset of at most ``max_images_per_class`` per class,
leaves out the images a score store already holds, and batches images of the same bucket shape together so
that no padding enters the UNet. Its batch sampler shards by rank itself (Lightning cannot wrap a custom batch
sampler), disjoint and unrepeated whatever the dataset size modulo the world size.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from datamodules.real import ClassMapping, DataError, ImageSource, RealDataModule, seeded_subset

# Lightning warns that it cannot set drop_last on a custom batch sampler; ours never drops anything.
warnings.filterwarnings("ignore", message="You are using a custom batch sampler", category=PossibleUserWarning)

READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class ResizeGeometry(NamedTuple):
    """How an original image became the scored one: resize to (resized_w, resized_h), then crop at (left, top)."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    out_width: int
    out_height: int

    def box_to_original(self, box: Sequence[float]) -> tuple[int, int, int, int]:
        """A box (x0, y0, x1, y1) in scored-image pixels as a box in ORIGINAL pixels (clamped, x1/y1 exclusive)."""
        sx, sy = self.width / self.resized_width, self.height / self.resized_height
        x0, y0, x1, y1 = box
        mapped = (round((x0 + self.left) * sx), round((y0 + self.top) * sy),
                  round((x1 + self.left) * sx), round((y1 + self.top) * sy))
        return (min(max(mapped[0], 0), self.width), min(max(mapped[1], 0), self.height),
                min(max(mapped[2], 0), self.width), min(max(mapped[3], 0), self.height))


def plan_resize(width: int, height: int, image_size: int, multiple: int = 64, max_aspect: float = 2.0,
                square: bool = False) -> ResizeGeometry:
    """Short side -> ``image_size``; long side -> its aspect-preserving length rounded to ``multiple`` (a stretch
    of at most ``multiple / 2`` px), or, beyond ``max_aspect`` x ``image_size``, aspect-preserved and centre-cropped
    to that cap. ``square`` resizes to ``image_size`` x ``image_size`` (whole-image mode for low-res data)."""
    if square:
        return ResizeGeometry(width, height, image_size, image_size, 0, 0, image_size, image_size)
    short, long = min(width, height), max(width, height)
    exact_long = long * image_size / short
    cap = max(image_size, int(image_size * max_aspect) // multiple * multiple)
    if exact_long > cap:
        resized_long, out_long = round(exact_long), cap
    else:
        resized_long = out_long = min(max(round(exact_long / multiple) * multiple, image_size), cap)
    offset = (resized_long - out_long) // 2
    if width >= height:
        return ResizeGeometry(width, height, resized_long, image_size, offset, 0, out_long, image_size)
    return ResizeGeometry(width, height, image_size, resized_long, 0, offset, image_size, out_long)


def resize_for_scoring(image: Image.Image, geometry: ResizeGeometry) -> torch.Tensor:
    """The scored image (uint8, 3 x out_height x out_width) of ``geometry``."""
    resized = TF.resize(image, [geometry.resized_height, geometry.resized_width],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
    cropped = TF.crop(resized, geometry.top, geometry.left, geometry.out_height, geometry.out_width)
    return TF.pil_to_tensor(cropped)


@dataclass
class ScoringBatch:
    """Images of one bucket shape (uint8), their originals (uint8, any size), labels, ids and geometry."""

    images: torch.Tensor
    originals: list[torch.Tensor]
    labels: torch.Tensor
    image_ids: list[str]
    geometry: list[ResizeGeometry]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def pin_memory(self) -> "ScoringBatch":
        return ScoringBatch(self.images.pin_memory(), [o.pin_memory() for o in self.originals],
                            self.labels.pin_memory(), self.image_ids, self.geometry, self.skipped)


class ScoringImages(Dataset):
    """Item ``j`` = the ``positions[j]``-th image of a source, resized per its planned geometry."""

    def __init__(self, source: ImageSource, positions: Sequence[int], geometry: Sequence[ResizeGeometry],
                 skip_unreadable: bool) -> None:
        self.source, self.positions, self.geometry = source, list(positions), list(geometry)
        self.skip_unreadable = skip_unreadable
        self.ids = source.ids

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int):
        position, geometry = self.positions[j], self.geometry[j]
        image_id = self.ids[position]
        try:
            image = self.source.load(position)
        except READ_ERRORS as err:
            if not self.skip_unreadable:
                raise DataError(f"unreadable image {image_id}: {err} (set skip_unreadable to score the rest)") from err
            warnings.warn(f"skipping unreadable image {image_id}: {err}", stacklevel=2)
            return image_id
        if image.size != (geometry.width, geometry.height):
            raise DataError(f"image {image_id} changed size since it was scanned: {image.size}")
        return (resize_for_scoring(image, geometry), TF.pil_to_tensor(image), self.source.labels[position],
                image_id, geometry)


def collate_scoring(items: list) -> ScoringBatch:
    """Stack the readable items (same bucket shape); unreadable ones arrive as their id and are listed."""
    readable = [item for item in items if not isinstance(item, str)]
    skipped = [item for item in items if isinstance(item, str)]
    if not readable:
        return ScoringBatch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), [], torch.empty(0, dtype=torch.long), [],
                            [], skipped)
    images, originals, labels, ids, geometry = zip(*readable)
    return ScoringBatch(torch.stack(images), list(originals), torch.tensor(labels, dtype=torch.long), list(ids),
                        list(geometry), skipped)


def bucket_batches(shapes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """All batches of item positions: items grouped by shape (sorted), in position order, chunked."""
    groups: dict[tuple[int, int], list[int]] = {}
    for position, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(position)
    return [members[start:start + batch_size] for shape in sorted(groups)
            for members in [groups[shape]] for start in range(0, len(members), batch_size)]


class ShardedBucketBatchSampler(Sampler[list[int]]):
    """This rank's share of the bucket batches: batches ``rank, rank + world, ...``; disjoint and unrepeated."""

    def __init__(self, shapes: Sequence[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batches = bucket_batches(shapes, batch_size)[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def scan_sizes(source: ImageSource, positions: Sequence[int], workers: int = 16) -> list[tuple[int, int] | None]:
    """(width, height) of every image at ``positions``, from file headers when the source has paths; None for an
    image that cannot be read."""
    path_of = getattr(source, "path", None)

    def size_of(position: int):
        try:
            if path_of is None:
                return source.load(position).size
            with Image.open(path_of(position)) as image:
                return image.size
        except READ_ERRORS:
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(size_of, positions))


def init_args_of(module: object) -> dict:
    """Constructor arguments of ``module`` recovered from its attributes of the same name (through **kwargs to
    parent classes), JSON-friendly: enough to build an equal module again."""
    args = {}
    for cls in type(module).__mro__:
        if cls in (object, L.LightningDataModule) or "__init__" not in vars(cls):
            continue
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) or name == "self":
                continue
            if name not in args and hasattr(module, name):
                value = getattr(module, name)
                args[name] = list(value) if isinstance(value, tuple) else (
                    str(value) if not isinstance(value, (int, float, bool, str, list, dict, type(None))) else value)
    return args


def reopen_data(data: dict) -> RealDataModule:
    """The real data module a store's manifest ``data`` entry describes (class_path + init_args)."""
    module_name, _, class_name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**data["init_args"])


class ScoringDataModule(L.LightningDataModule):
    """Predict-time data for :class:`lightning_modules.scoring.DiffusionScorer`.

    Args:
        data: the real data module (``ImageFolderDataModule``, ``CIFARDataModule``, ...), by class_path in YAML.
        root: shortcut that replaces the real data module's ``root`` (``--data.root DIR``).
        split: which split to score (``train``, as the paper distils the training set).
        image_size: short side of the scored image (the paper: 256).
        bucket_multiple: the long side is rounded to a multiple of this (pixels).
        max_aspect: the long side is capped at this times ``image_size`` (centre-cropped beyond).
        whole_image: resize every image to ``image_size`` x ``image_size`` (low-resolution sets: CIFAR,
            TinyImageNet); pair with the scorer's ``patch_size: null``.
        max_images_per_class: score a seeded random subset of at most this many images per class.
        subset_seed: seed of that subset.
        batch_size: images per predict step (the UNet sees 2 x this).
        num_workers: loader processes (decode + resize).
        skip_unreadable: leave unreadable images out with a warning instead of stopping with an error.
        scan_workers: threads reading image headers to plan the buckets.
    """

    def __init__(self, data: RealDataModule, root: str | None = None, split: str = "train", image_size: int = 256,
                 bucket_multiple: int = 64, max_aspect: float = 2.0, whole_image: bool = False,
                 max_images_per_class: int | None = None, subset_seed: int = 0, batch_size: int = 32,
                 num_workers: int = 4, skip_unreadable: bool = False, scan_workers: int = 16) -> None:
        super().__init__()
        if not whole_image and image_size % bucket_multiple:
            raise ValueError(f"image_size {image_size} must be a multiple of bucket_multiple {bucket_multiple}")
        if root is not None:
            if not hasattr(data, "root"):
                raise ValueError(f"{type(data).__name__} has no root to replace")
            data.root = Path(root)
        self.data, self.split = data, split
        self.image_size, self.bucket_multiple, self.max_aspect = image_size, bucket_multiple, max_aspect
        self.whole_image = whole_image
        self.max_images_per_class, self.subset_seed = max_images_per_class, subset_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skip_unreadable, self.scan_workers = skip_unreadable, scan_workers
        self.done_ids: set[str] = set()

    @property
    def class_mapping(self) -> ClassMapping:
        return self.data.class_mapping

    @property
    def source(self) -> ImageSource:
        return self.data.source(self.split)

    def settings(self) -> dict:
        """The data settings that decide what a score store holds (compared on resume)."""
        return {"split": self.split, "image_size": self.image_size, "bucket_multiple": self.bucket_multiple,
                "max_aspect": self.max_aspect, "whole_image": self.whole_image,
                "max_images_per_class": self.max_images_per_class, "subset_seed": self.subset_seed}

    def describe(self) -> dict:
        """How to reopen the scored images: the real data module's class_path + init_args, and the split."""
        init_args = init_args_of(self.data) | {"classes": list(self.class_mapping.folders)}
        return {"class_path": f"{type(self.data).__module__}.{type(self.data).__qualname__}",
                "init_args": init_args, "split": self.split}

    def exclude(self, image_ids: set[str]) -> None:
        """Leave these images out (they are already in the store)."""
        self.done_ids = set(image_ids)

    def pending_positions(self) -> list[int]:
        """Positions in the source of the images still to score: the seeded subset minus the stored ones."""
        source = self.source
        ids = source.ids
        subset = seeded_subset(source.labels, self.max_images_per_class, self.subset_seed)
        return [p for p in subset if ids[p] not in self.done_ids]

    def scan(self, positions: Sequence[int]) -> list[tuple[int, int] | None]:
        """Image sizes at ``positions``; under DDP every rank reads the headers of its share and they are summed."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return scan_sizes(self.source, positions, self.scan_workers)
        rank = trainer.global_rank
        mine = scan_sizes(self.source, positions[rank::world], self.scan_workers)
        table = torch.zeros(len(positions), 2, dtype=torch.long)
        table[rank::world] = torch.tensor([size or (-1, -1) for size in mine], dtype=torch.long).view(-1, 2)
        table = trainer.strategy.reduce(table.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return [tuple(row) if row[0] >= 0 else None for row in table.tolist()]

    def plan(self, positions: Sequence[int]) -> tuple[list[int], list[ResizeGeometry]]:
        """The readable positions and their resize geometry; unreadable images stop here unless skipped."""
        sizes = self.scan(positions)
        ids = self.source.ids
        unreadable = [ids[p] for p, size in zip(positions, sizes) if size is None]
        if unreadable and not self.skip_unreadable:
            raise DataError(f"{len(unreadable)} unreadable image(s) in {self.split}: {unreadable[:5]} "
                            "(set skip_unreadable to score the rest)")
        if unreadable:
            warnings.warn(f"skipping {len(unreadable)} unreadable image(s): {unreadable[:5]}", stacklevel=2)
        kept = [(p, s) for p, s in zip(positions, sizes) if s is not None]
        geometry = [plan_resize(w, h, self.image_size, self.bucket_multiple, self.max_aspect, self.whole_image)
                    for _, (w, h) in kept]
        return [p for p, _ in kept], geometry

    def setup(self, stage: str | None = None) -> None:
        self.class_mapping  # noqa: B018 -- resolves the classes now: unknown classes fail before any work

    def predict_dataloader(self) -> DataLoader:
        positions, geometry = self.plan(self.pending_positions())
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shapes = [(g.out_height, g.out_width) for g in geometry]
        sampler = ShardedBucketBatchSampler(shapes, self.batch_size, rank, world)
        dataset = ScoringImages(self.source, positions, geometry, self.skip_unreadable)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_scoring,
                          pin_memory=torch.cuda.is_available())


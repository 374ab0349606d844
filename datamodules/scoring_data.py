"""The data side of Stage I: :class:`ScoringDataModule` wraps a real data module for the scoring pass.

It reads the originals of one split through the real module's ``source(split).load(i)``, keeps a seeded subset of
at most ``max_images_per_class`` per class, leaves out the images a score store already holds, and serves them in
shape buckets (:mod:`patchdd.data.scoring_images`), sharded by rank.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from patchdd.data.scoring_images import (RESIZE_MODES, SKIP_OPTION, ResizeGeometry, ScoringImages,
                                         ShardedBucketBatchSampler, collate_scoring, plan_resize, scan_sizes,
                                         torchvision_geometry)
from patchdd.data.sources import ClassMapping, ImageSource, data_fingerprint, seeded_subset
from patchdd.datamodules.real import RealDataModule
from patchdd.errors import DataError

# Lightning warns that it cannot set drop_last on a custom batch sampler; ours never drops anything.
warnings.filterwarnings("ignore", message="You are using a custom batch sampler", category=PossibleUserWarning)


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


class ScoringDataModule(L.LightningDataModule):
    """Predict-time data for :class:`lightning_modules.scoring.DiffusionScorer`.

    Args:
        data: the real data module (``ImageFolderDataModule``, ``CIFARDataModule``, ...), by class_path in YAML.
        root: shortcut that replaces the real data module's ``root`` (``--data.root DIR``).
        classes: shortcut that replaces the real data module's ``classes`` (``--data.classes imagewoof``): ``all``,
            a preset or class folders / names, as in every other command.
        split: which split to score (``train``, as the paper distils the training set).
        image_size: short side of the scored image (the paper: 256).
        bucket_multiple: the long side is rounded to a multiple of this (pixels).
        max_aspect: the long side is capped at this times ``image_size`` (centre-cropped beyond).
        whole_image: resize every image to ``image_size`` x ``image_size`` (low-resolution sets: CIFAR,
            TinyImageNet); pair with the scorer's ``patch_size: null``.
        resize: ``buckets`` (short side to ``image_size`` by bicubic, the long side to a bucket) or ``torchvision``
            (torchvision's own ``Resize(image_size)`` -> ``CenterCrop(image_size)``, bilinear: D3HR's inversion;
            with ``whole_image``, its ``Resize((image_size, image_size))``: D4M's squash).
        max_images_per_class: score a seeded random subset of at most this many images per class.
        subset_seed: seed of that subset.
        batch_size: images per predict step (the UNet sees 2 x this).
        num_workers: loader processes (decode + resize).
        skip_unreadable: leave unreadable images out with a warning instead of stopping with an error.
        scan_workers: threads reading image headers to plan the buckets.
    """

    def __init__(self, data: RealDataModule, root: str | None = None, classes: str | list[str] | None = None,
                 split: str = "train", image_size: int = 256,
                 bucket_multiple: int = 64, max_aspect: float = 2.0, whole_image: bool = False,
                 max_images_per_class: int | None = None, subset_seed: int = 0, batch_size: int = 32,
                 num_workers: int = 4, skip_unreadable: bool = False, scan_workers: int = 16,
                 resize: str = "buckets") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        if not whole_image and image_size % bucket_multiple:
            raise ValueError(f"image_size {image_size} must be a multiple of bucket_multiple {bucket_multiple}")
        if root is not None:
            if not hasattr(data, "root"):
                raise ValueError(f"{type(data).__name__} has no root to replace")
            data.root = Path(root)
        if classes is not None:
            if not hasattr(data, "classes"):
                raise ValueError(f"{type(data).__name__} has no classes to replace")
            data.classes = classes
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
                "max_aspect": self.max_aspect, "whole_image": self.whole_image, "resize": self.resize,
                "max_images_per_class": self.max_images_per_class, "subset_seed": self.subset_seed}

    def describe(self) -> dict:
        """How to reopen the scored images (the real data module's class_path + init_args with its root made
        absolute, and the split), the data's fingerprint (root, per-class file lists and sizes), which a resumed
        store must match, and the images the pass plans per class (a store short of them is incomplete)."""
        folders = list(self.class_mapping.folders)
        init_args = init_args_of(self.data) | {"classes": folders}
        if init_args.get("root") is not None:
            init_args["root"] = str(Path(init_args["root"]).expanduser().resolve())
        source = self.source
        planned = seeded_subset(source.labels, self.max_images_per_class, self.subset_seed)
        counts = Counter(source.labels[p] for p in planned)
        return {"class_path": f"{type(self.data).__module__}.{type(self.data).__qualname__}",
                "init_args": init_args, "split": self.split,
                "fingerprint": data_fingerprint(source, folders, getattr(self.data, "root", None)),
                "expected_counts": {folder: counts[label] for label, folder in enumerate(folders)}}

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
            raise DataError(f"{len(unreadable)} unreadable image(s) in {self.split}: {unreadable[:5]}: fix them or pass "
                            f"{SKIP_OPTION}")
        if unreadable:
            warnings.warn(f"skipping {len(unreadable)} unreadable image(s): {unreadable[:5]}", stacklevel=2)
        kept = [(p, s) for p, s in zip(positions, sizes) if s is not None]
        geometry = [torchvision_geometry(w, h, self.image_size) if self.resize == "torchvision" and not self.whole_image
                    else plan_resize(w, h, self.image_size, self.bucket_multiple, self.max_aspect, self.whole_image)
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
        dataset = ScoringImages(self.source, positions, geometry, self.skip_unreadable, self.resize)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_scoring,
                          pin_memory=torch.cuda.is_available())

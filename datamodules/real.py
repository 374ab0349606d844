"""Real image data modules: ImageNet-style folders (class folders or a flat val folder), CIFAR-10/100, TinyImageNet.

Every data module here exposes the same three things the rest of the suite relies on:

* ``class_mapping``: a :class:`~patchdd.data.sources.ClassMapping` (folders / wnids in label order, and names);
* ``source(split)``: an :class:`~patchdd.data.sources.ImageSource`, which the scoring pass and the distillation
  read original images from;
* the usual ``train_dataloader`` / ``val_dataloader`` with configurable transforms.

The class mapping is saved as ``class_mapping.json`` in every run's log directory.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from patchdd.data.sources import (CLASS_MAPPING_FILE, IMAGENET_MEAN, IMAGENET_STD, TRAIN_CROPS, ArrayImageSource,
                                  ClassMapping, FileImageSource, ImageSource, LabelledImages, collate_readable,
                                  eval_transform, list_class_folders, scan_class_folders, scan_flat_folder,
                                  train_transform)
from patchdd.data.subsets import resolve_classes
from patchdd.errors import DataError
from patchdd.datamodules.resumable import ResumableLoader


def rank_zero_log_dir(trainer) -> Path | None:
    """The run's log directory on global rank 0 (``None`` elsewhere, or without a trainer or a directory), read
    from the logger itself: ``Trainer.log_dir`` is a broadcast that every rank must join, and a rank-0-only call
    of it stalls a DDP run."""
    if trainer is None or not trainer.is_global_zero:
        return None
    loggers = trainer.loggers
    directory = (loggers[0].log_dir if hasattr(loggers[0], "log_dir") else loggers[0].save_dir) if loggers \
        else trainer.default_root_dir
    return Path(directory) if directory is not None else None


def save_class_mapping(trainer, mapping: ClassMapping) -> None:
    """Write ``class_mapping.json`` into the run's log directory (rank 0 only; no-op without a trainer)."""
    log_dir = rank_zero_log_dir(trainer)
    if log_dir is None:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    mapping.save(log_dir / CLASS_MAPPING_FILE)


class RealDataModule(L.LightningDataModule):
    """Shared loaders and transforms; subclasses say where the images and classes come from.

    Args:
        image_size: side of the training crops and of the evaluation centre crop.
        eval_resize: evaluation resize of the short side before the centre crop (default RDED's ``image_size // 7 * 8``:
            256 at 224 px, 144 at 128 px, 72 at 64 px).
        train_scale: area range of the training ``RandomResizedCrop``.
        train_crop: ``random_resized`` (``RandomResizedCrop`` over ``train_scale``) or ``center_crop_arr`` (ADM's
            centre crop: the short side to ``image_size``, the centre square; Minimax's and Li et al.'s fine-tune).
        mean: per-channel normalisation mean (ImageNet's by default).
        std: per-channel normalisation std (ImageNet's by default).
        batch_size: training batch size.
        eval_batch_size: validation / test batch size (default ``batch_size``).
        num_workers: loader worker processes.
        persistent_workers: keep the workers from one epoch to the next (faster epochs); off, a run cut mid-epoch
            resumes exactly as an uncut run goes on (the workers' random streams start with each epoch).
    """

    def __init__(
        self,
        image_size: int = 224,
        eval_resize: int | None = None,
        train_scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        train_crop: str = "random_resized",
    ) -> None:
        super().__init__()
        if train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {train_crop!r}")
        self.image_size, self.train_crop = image_size, train_crop
        self.eval_resize = eval_resize or image_size // 7 * 8  # RDED: Resize(s // 7 * 8) -> CenterCrop(s)
        self.train_scale = tuple(train_scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.persistent_workers = num_workers, persistent_workers
        self._sources: dict[str, ImageSource] = {}
        self._skipped_reported = 0

    @property
    def class_mapping(self) -> ClassMapping:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_mapping)

    def _load_source(self, split: str) -> ImageSource:
        raise NotImplementedError

    def source(self, split: str) -> ImageSource:
        """The images of ``split`` (``"train"`` or ``"val"``), scanned once."""
        if split not in self._sources:
            self._sources[split] = self._load_source(split)
        return self._sources[split]

    def setup(self, stage: str | None = None) -> None:
        self.source("train" if stage in (None, "fit", "predict") else "val")
        if stage in (None, "fit", "validate", "test"):
            self.source("val")
        save_class_mapping(self.trainer, self.class_mapping)

    def train_dataset(self) -> Dataset:
        tf = train_transform(self.image_size, self.train_scale, self.mean, self.std, self.train_crop)
        return LabelledImages(self.source("train"), tf)

    def eval_dataset(self) -> Dataset:
        tf = eval_transform(self.image_size, self.eval_resize, self.mean, self.std)
        return LabelledImages(self.source("val"), tf)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset(), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """Training (``shuffle``): a :class:`ResumableLoader`, which a cut run resumes mid-epoch."""
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_readable,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
        )


class ImageFolderDataModule(RealDataModule):
    """ImageNet-style data: ``root/train/<wnid>/*.JPEG`` and ``root/val`` as class folders or a flat folder.

    ``classes`` selects a subset: ``all``, a preset (``imagenette``, ``imagewoof``, ``imagenet100``), a list of
    wnids / folder names or of class names. A flat validation folder needs ``val_labels`` (a ground-truth file,
    see :func:`~patchdd.data.sources.read_ground_truth`); TinyImageNet's ``val/images`` +
    ``val/val_annotations.txt`` is found alone. Loader and transform options: :class:`RealDataModule`.

    Args:
        root: the data root holding ``train_dir`` and ``val_dir``.
        train_dir: training split folder under ``root`` (class folders, searched recursively).
        val_dir: validation split folder under ``root`` (class folders, or flat with ``val_labels``).
        val_labels: ground-truth file of a flat validation folder (Kaggle CSV, ``filename wnid`` lines, or the
            devkit's ground truth with ``meta.mat`` beside it).
        classes: ``all`` (or None), a preset (``imagenette``, ``imagewoof``, ``imagenet100``), a comma-separated
            string or a list of wnids / folder names / class names.
        class_names: JSON file ``{folder: name}`` overriding the display names (used in prompts).
        loader_kwargs: :class:`RealDataModule`'s options (``image_size``, ``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self,
        root: str = "data/toy",
        train_dir: str = "train",
        val_dir: str = "val",
        val_labels: str | None = None,
        classes: str | list[str] | None = None,
        class_names: str | None = None,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        self.root = Path(root)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.val_labels = val_labels
        self.classes = classes
        self.class_names = class_names
        self._mapping: ClassMapping | None = None

    @property
    def class_mapping(self) -> ClassMapping:
        if self._mapping is None:
            if not self.root.is_dir():
                raise DataError(f"data root does not exist: {self.root}")
            available = list_class_folders(self.root / self.train_dir)
            if not available:
                raise DataError(f"no class folders in {self.root / self.train_dir}")
            self._mapping = ClassMapping.for_folders(resolve_classes(self.classes, available), self.class_names)
        return self._mapping

    def _load_source(self, split: str) -> FileImageSource:
        folders = self.class_mapping.folders
        if split == "train":
            return scan_class_folders(self.root / self.train_dir, folders)
        val_dir = self.root / self.val_dir
        labels_file = self._val_labels_file(val_dir)
        if labels_file is None:
            present = set(list_class_folders(val_dir))
            missing = [f for f in folders if f not in present]
            if missing:
                raise DataError(f"validation folder {val_dir} lacks class folders {missing[:5]} (or pass val_labels)")
            return scan_class_folders(val_dir, folders)
        return scan_flat_folder(val_dir, labels_file, folders)

    def image_folder(self, split: str) -> Path:
        """The folder that image ids of ``split`` are relative to: an image opens as ``folder / id`` without
        listing anything (Stage II opens only the images it picks)."""
        return self.root / (self.train_dir if split == "train" else self.val_dir)

    def _val_labels_file(self, val_dir: Path) -> Path | None:
        if self.val_labels:
            return Path(self.val_labels)
        tiny = val_dir / "val_annotations.txt"
        return tiny if tiny.is_file() else None


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class CIFARDataModule(RealDataModule):
    """CIFAR-10 / CIFAR-100 from the python pickles in ``root`` (as torchvision downloads them; no download here).

    Args:
        root: folder holding ``cifar-10-batches-py`` or ``cifar-100-python``.
        variant: ``cifar10`` or ``cifar100``.
        classes: ``all`` (or None), or a list / comma-separated string of class names.
        image_size: training crop and evaluation size (32: the native resolution).
        eval_resize: evaluation resize (default ``image_size``).
        train_scale: area range of the training ``RandomResizedCrop``.
        mean: per-channel normalisation mean (CIFAR's).
        std: per-channel normalisation std (CIFAR's).
        loader_kwargs: :class:`RealDataModule`'s loader options (``batch_size``, ``num_workers``, ...).
    """

    def __init__(self, root: str = "data", variant: str = "cifar10", classes: str | list[str] | None = None,
                 image_size: int = 32, eval_resize: int | None = None, train_scale: tuple[float, float] = (0.5, 1.0),
                 mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465),
                 std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616), **loader_kwargs) -> None:
        if variant not in CIFAR_FOLDERS:
            raise DataError(f"unknown CIFAR variant {variant!r}; choose from {sorted(CIFAR_FOLDERS)}")
        super().__init__(image_size=image_size, eval_resize=eval_resize or image_size, train_scale=train_scale,
                         mean=mean, std=std, **loader_kwargs)
        self.root = Path(root)
        self.variant = variant
        self.classes = classes
        self._mapping: ClassMapping | None = None

    @property
    def _folder(self) -> Path:
        folder = self.root / CIFAR_FOLDERS[self.variant]
        if not folder.is_dir():
            raise DataError(f"{self.variant} not found: expected the folder {folder} (torchvision's layout)")
        return folder

    def _all_names(self) -> list[str]:
        meta_file, key = ("batches.meta", "label_names") if self.variant == "cifar10" else ("meta", "fine_label_names")
        with (self._folder / meta_file).open("rb") as fh:
            return list(pickle.load(fh, encoding="latin1")[key])

    @property
    def class_mapping(self) -> ClassMapping:
        if self._mapping is None:
            self._mapping = ClassMapping.for_folders(resolve_classes(self.classes, self._all_names()))
        return self._mapping

    def _load_source(self, split: str) -> ArrayImageSource:
        if self.variant == "cifar10":
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            label_key = "labels"
        else:
            files = ["train"] if split == "train" else ["test"]
            label_key = "fine_labels"
        arrays, labels = [], []
        for name in files:
            with (self._folder / name).open("rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            arrays.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += list(entry[label_key])
        all_names = self._all_names()
        remap = {all_names.index(f): i for i, f in enumerate(self.class_mapping.folders)}
        keep = [i for i, label in enumerate(labels) if label in remap]
        array = np.concatenate(arrays)[keep]
        return ArrayImageSource(array, [remap[labels[i]] for i in keep], f"{self.variant}/{split}")

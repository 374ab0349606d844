"""Real image data: ImageNet-style folders (class folders or a flat val folder), CIFAR-10/100, TinyImageNet.

Every data module here exposes the same three things the rest of the suite relies on:

* ``class_mapping``: a :class:`ClassMapping` (folders / wnids in label order, and display names);
* ``source(split)``: an :class:`ImageSource` (stable string ids, labels, ``load(i) -> PIL image``), which the
  scoring pass and the distillation read original images from;
* the usual ``train_dataloader`` / ``val_dataloader`` with configurable transforms.

Labels of a class subset are remapped to ``0..K-1`` in the sorted order of the folder names / wnids
(see :func:`datamodules.subsets.resolve_classes`); the mapping is saved as ``class_mapping.json`` in every
run's log directory.
"""

from __future__ import annotations

import csv
import json
import pickle
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from datamodules.subsets import display_name, imagenet_wnids, resolve_classes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASS_MAPPING_FILE = "class_mapping.json"


class DataError(ValueError):
    """A data root, split or class list that cannot be used as given."""


@dataclass(frozen=True)
class ClassMapping:
    """Folders (wnids) in label order and the human-readable names used in prompts and reports."""

    folders: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.folders) != len(self.names):
            raise ValueError("ClassMapping needs one name per folder")

    def __len__(self) -> int:
        return len(self.folders)

    def index(self, folder: str) -> int:
        return self.folders.index(folder)

    def to_json(self) -> dict:
        return {"folders": list(self.folders), "names": list(self.names)}

    @classmethod
    def from_json(cls, data: dict) -> "ClassMapping":
        return cls(tuple(data["folders"]), tuple(data["names"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ClassMapping":
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def for_folders(cls, folders: Sequence[str], names_file: str | None = None) -> "ClassMapping":
        """Display names from the ImageNet lemmas / folder names, overridden by a JSON ``{folder: name}`` file."""
        overrides = json.loads(Path(names_file).read_text()) if names_file else {}
        return cls(tuple(folders), tuple(overrides.get(f, display_name(f)) for f in folders))


class ImageSource(Protocol):
    """Images of one split: stable ids, labels, and the original image by position."""

    ids: list[str]
    labels: list[int]

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image: ...


@dataclass
class FileImageSource:
    """Images stored as files; ids are paths relative to ``root``."""

    root: Path
    ids: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, i: int) -> Path:
        return self.root / self.ids[i]

    def load(self, i: int) -> Image.Image:
        with Image.open(self.path(i)) as img:
            return img.convert("RGB")


@dataclass
class ArrayImageSource:
    """Images held in a uint8 array (N, H, W, 3), e.g. CIFAR; ids are ``{prefix}/{index}``."""

    array: np.ndarray
    labels: list[int]
    prefix: str

    @property
    def ids(self) -> list[str]:
        return [f"{self.prefix}/{i}" for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i])


class ImageBatch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    skipped: int


class LabelledImages(Dataset):
    """An :class:`ImageSource` with a transform; an unreadable image yields ``None`` and a warning."""

    def __init__(self, source: ImageSource, transform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image = self.source.load(i)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            warnings.warn(f"skipping unreadable image {self.source.ids[i]}: {err}", stacklevel=2)
            return None
        return self.transform(image), self.source.labels[i]


def collate_readable(items: list) -> ImageBatch:
    """Stack the readable items of a batch and count the unreadable ones that were dropped."""
    readable = [item for item in items if item is not None]
    skipped = len(items) - len(readable)
    if not readable:
        return ImageBatch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = zip(*readable)
    return ImageBatch(torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped)


def list_class_folders(split_dir: Path) -> list[str]:
    """Sub-folders of a split that hold at least one file (an empty class folder is an error)."""
    if not split_dir.is_dir():
        raise DataError(f"data folder does not exist: {split_dir}")
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return folders


def scan_class_folders(split_dir: Path, folders: Sequence[str]) -> FileImageSource:
    """Image files under ``split_dir/<folder>/`` (recursively: TinyImageNet keeps them in ``images/``)."""
    ids, labels = [], []
    for label, folder in enumerate(folders):
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            raise DataError(f"class folder {folder!r} is missing in {split_dir}")
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder holds no images: {class_dir}")
        ids += [str(p.relative_to(split_dir)) for p in files]
        labels += [label] * len(files)
    return FileImageSource(split_dir, ids, labels)


def read_ground_truth(labels_file: Path) -> dict[str, str]:
    """Flat-folder ground truth as ``{file stem: wnid}``.

    Accepted formats: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``), TinyImageNet's
    ``val_annotations.txt`` and any ``filename wnid ...`` text file (whitespace separated), and the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC id per line, in file-name order) with the devkit's
    ``meta.mat`` beside it.
    """
    if not labels_file.is_file():
        raise DataError(f"ground-truth file does not exist: {labels_file}")
    if labels_file.suffix == ".csv":
        with labels_file.open() as fh:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(fh)}
    lines = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    if lines and len(lines[0]) == 1:
        return _devkit_ground_truth(labels_file, [int(line[0]) for line in lines])
    return {Path(parts[0]).stem: parts[1] for parts in lines}


def _devkit_ground_truth(labels_file: Path, ilsvrc_ids: list[int]) -> dict[str, str]:
    from scipy.io import loadmat

    meta = labels_file.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(f"{labels_file.name} holds ILSVRC ids; it needs the devkit's meta.mat beside it ({meta})")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s[0]): str(s[1]) for s in synsets}
    return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[c] for i, c in enumerate(ilsvrc_ids)}


def scan_flat_folder(split_dir: Path, labels_file: Path, folders: Sequence[str]) -> FileImageSource:
    """A flat folder of images labelled by a ground-truth file; images of other classes are left out."""
    truth = read_ground_truth(labels_file)
    label_of = {folder: i for i, folder in enumerate(folders)}
    ids, labels, unlabelled = [], [], 0
    for path in sorted(p for p in split_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        wnid = truth.get(path.stem)
        if wnid is None:
            unlabelled += 1
        elif wnid in label_of:
            ids.append(str(path.relative_to(split_dir)))
            labels.append(label_of[wnid])
    if unlabelled:
        raise DataError(f"{unlabelled} images in {split_dir} have no entry in {labels_file}")
    missing = sorted(set(folders) - {folders[label] for label in labels})
    if missing:
        raise DataError(f"classes {missing[:5]} have no images in the flat folder {split_dir}")
    return FileImageSource(split_dir, ids, labels)


def save_class_mapping(trainer, mapping: ClassMapping) -> None:
    """Write ``class_mapping.json`` into the run's log directory (rank 0 only; no-op without a trainer)."""
    if trainer is None or trainer.log_dir is None or not trainer.is_global_zero:
        return
    log_dir = Path(trainer.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    mapping.save(log_dir / CLASS_MAPPING_FILE)


def teacher_class_folders(spec: str | None, data_folders: Sequence[str]) -> list[str]:
    """A teacher's output classes, in its output order.

    ``spec``: ``None`` = the data's own classes, ``"imagenet1k"`` = the 1000 ImageNet-1K wnids (hub-pretrained
    models), or the path of a ``class_mapping.json`` written by the teacher's run.
    """
    if spec is None:
        return list(data_folders)
    if spec == "imagenet1k":
        return imagenet_wnids()
    return list(ClassMapping.load(spec).folders)


def teacher_output_positions(teacher_folders: Sequence[str], data_folders: Sequence[str]) -> list[int]:
    """Position of each data class among a teacher's outputs; an error names the classes the teacher lacks."""
    position = {folder: i for i, folder in enumerate(teacher_folders)}
    missing = [f for f in data_folders if f not in position]
    if missing:
        raise DataError(f"{len(missing)} of the data's classes are not among the teacher's {len(teacher_folders)} "
                        f"output classes (e.g. {missing[:3]}); say which classes its outputs are "
                        "(teacher_classes: imagenet1k or a class_mapping.json)")
    return [position[f] for f in data_folders]


def train_transform(image_size: int, scale: tuple[float, float], mean: Sequence[float], std: Sequence[float]):
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=scale, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(image_size: int, resize: int, mean: Sequence[float], std: Sequence[float]):
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


class RealDataModule(L.LightningDataModule):
    """Shared loaders and transforms; subclasses say where the images and classes come from."""

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
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.eval_resize = eval_resize or round(image_size * 256 / 224)
        self.train_scale = tuple(train_scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
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
        tf = train_transform(self.image_size, self.train_scale, self.mean, self.std)
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
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_readable,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )


class ImageFolderDataModule(RealDataModule):
    """ImageNet-style data: ``root/train/<wnid>/*.JPEG`` and ``root/val`` as class folders or a flat folder.

    ``classes`` selects a subset: ``all``, a preset (``imagenette``, ``imagewoof``, ``imagenet100``), a list of
    wnids / folder names or of class names. A flat validation folder needs ``val_labels`` (a ground-truth file,
    see :func:`read_ground_truth`); TinyImageNet's ``val/images`` + ``val/val_annotations.txt`` is found alone.
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

    def _val_labels_file(self, val_dir: Path) -> Path | None:
        if self.val_labels:
            return Path(self.val_labels)
        tiny = val_dir / "val_annotations.txt"
        return tiny if tiny.is_file() else None


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class CIFARDataModule(RealDataModule):
    """CIFAR-10 / CIFAR-100 from the python pickles in ``root`` (as torchvision downloads them; no download here)."""

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

    def train_dataset(self) -> Dataset:
        tf = T.Compose([T.RandomResizedCrop(self.image_size, scale=self.train_scale, antialias=True),
                        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(self.mean, self.std)])
        return LabelledImages(self.source("train"), tf)


def seeded_subset(labels: Sequence[int], max_per_class: int | None, seed: int) -> list[int]:
    """Positions of at most ``max_per_class`` items per class, drawn with a fixed seed, in ascending order."""
    if max_per_class is None:
        return list(range(len(labels)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = [i for members in by_class.values() for i in rng.sample(members, min(max_per_class, len(members)))]
    return sorted(chosen)

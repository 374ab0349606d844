"""Framework-free access to real images: class mappings, image sources, folder scanning, ground-truth files.

Every real data module (:mod:`patchdd.datamodules.real`) exposes its images through these pieces:

* :class:`ClassMapping`: folders / wnids in label order, and the display names used in prompts and reports;
* an :class:`ImageSource` per split (stable string ids, labels, ``load(i) -> PIL image``), which the scoring
  pass and the distillation read original images from.

Labels of a class subset are remapped to ``0..K-1`` in the sorted order of the folder names / wnids
(:func:`patchdd.data.subsets.resolve_classes`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import random
import warnings
import zlib
from functools import partial
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from patchdd.data.subsets import display_name, imagenet_wnids
from patchdd.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASS_MAPPING_FILE = "class_mapping.json"


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

    def identity(self, i: int) -> str: ...

    def file_bytes(self, i: int) -> int: ...


# Pillow's modes of high-bit-depth greyscale images (16-bit PNG / TIFF); convert("RGB") clips them to white.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB; 16-bit greyscale is scaled to 8 bits (65535 -> 255), not clipped to white.
    (Pillow already reads 16-bit RGB PNGs as 8-bit RGB.)"""
    with Image.open(path) as img:
        if img.mode not in HIGH_BIT_DEPTH_MODES:
            return img.convert("RGB")
        pixels = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(pixels / 257), 0, 255).astype(np.uint8)).convert("RGB")


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
        return open_rgb(self.path(i))

    def identity(self, i: int) -> str:
        """What makes image ``i`` this image, for the data fingerprint: its relative path and file size."""
        return f"{self.ids[i]}\t{self.file_bytes(i)}"

    def file_bytes(self, i: int) -> int:
        """The size of image ``i``'s file in bytes."""
        return self.path(i).stat().st_size


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

    def identity(self, i: int) -> str:
        """What makes image ``i`` this image, for the data fingerprint: its id and a checksum of its pixels."""
        return f"{self.ids[i]}\t{zlib.crc32(self.array[i].tobytes())}"

    def file_bytes(self, i: int) -> int:
        """-1: the image is no file of its own."""
        return -1


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


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; hidden files and folders (``.ipynb_checkpoints``,
    ``._x.jpg``) are left out."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_class_folders(split_dir: Path, folders: Sequence[str]) -> FileImageSource:
    """Image files under ``split_dir/<folder>/`` (recursively: TinyImageNet keeps them in ``images/``)."""
    ids, labels = [], []
    for label, folder in enumerate(folders):
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            raise DataError(f"class folder {folder!r} is missing in {split_dir}")
        files = image_files(class_dir)
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
    for path in image_files(split_dir):
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


TRAIN_CROPS = ("random_resized", "center_crop_arr")


def adm_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (guided-diffusion, as Minimax and Li et al. fine-tune DiT): halve with a box
    filter while the short side is at least twice ``image_size``, resize the short side to ``image_size`` (bicubic,
    the long side rounded), crop the centre square (offsets floored)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - image_size) // 2, (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def train_transform(image_size: int, scale: tuple[float, float], mean: Sequence[float], std: Sequence[float],
                    crop: str = "random_resized"):
    """Training crops (``random_resized``: ``RandomResizedCrop`` over ``scale``; ``center_crop_arr``: ADM's
    centre crop, :func:`adm_center_crop`), a horizontal flip, normalisation."""
    if crop not in TRAIN_CROPS:
        raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {crop!r}")
    cropping = T.RandomResizedCrop(image_size, scale=scale, antialias=True) if crop == "random_resized" else \
        T.Lambda(partial(adm_center_crop, image_size=image_size))
    return T.Compose([cropping, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(image_size: int, resize: int, mean: Sequence[float], std: Sequence[float]):
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


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


def reopen_data_module(data: dict, root: str | None = None):
    """The real data module a store's manifest ``data`` entry describes (its ``class_path`` and ``init_args``);
    ``root`` replaces ``init_args["root"]`` (for images that have moved). Nothing is scanned yet."""
    try:
        class_path = data["class_path"]
        if class_path.startswith("datamodules."):  # stores written before the modules moved under `patchdd`
            class_path = f"patchdd.{class_path}"
        module_name, _, class_name = class_path.rpartition(".")
        module_class = getattr(importlib.import_module(module_name), class_name)
    except (KeyError, ImportError, AttributeError, ValueError) as err:
        raise DataError(f"cannot reopen the store's images from its data description {data!r}: {err}") from err
    init_args = dict(data.get("init_args", {}))
    if root is not None:
        init_args["root"] = root
    return module_class(**init_args)


def reopen_source(data: dict, root: str | None = None) -> ImageSource:
    """The images a store's manifest ``data`` entry describes (its data module's ``source(split)``, scanned)."""
    return reopen_data_module(data, root).source(data.get("split", "train"))


def data_fingerprint(source: ImageSource, folders: Sequence[str], root: str | Path | None) -> dict:
    """What a score store records of the data it was scored on, to refuse resuming on other data: the data root
    and, per class, ``[image count, sha256 of the images' identities]`` (relative paths and file sizes, so a
    resized copy of the same files differs too)."""
    lines: dict[int, list[str]] = {}
    for i, label in enumerate(source.labels):
        lines.setdefault(label, []).append(source.identity(i))
    classes = {folder: [len(lines.get(label, [])), hashlib.sha256("\n".join(lines.get(label, [])).encode())
                        .hexdigest()[:16]] for label, folder in enumerate(folders)}
    return {"root": None if root is None else str(Path(root).expanduser().resolve()), "classes": classes}

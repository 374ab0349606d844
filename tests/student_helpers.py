"""Tiny data and teachers for the student / matrix tests: coloured squares, one colour per class."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from patchdd.data.pixels import normalize
from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD, ClassMapping, ImageBatch
from patchdd.formats.synthetic_set import SyntheticSet
from patchdd.training.zoo import build_model

PALETTE = torch.tensor([[230, 30, 30], [30, 200, 40], [40, 60, 230], [235, 220, 40]], dtype=torch.uint8)
CLASSES = ClassMapping(("red", "green", "blue", "yellow"), ("red", "green", "blue", "yellow"))
SIZE = 32


def squares(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, size, size): a square of the class colour on grey noise, random place and side."""
    images = torch.randint(90, 166, (len(labels), 3, size, size), generator=generator, dtype=torch.uint8)
    for image, label in zip(images, labels.tolist()):
        side = int(torch.randint(size // 2, size + 1, (1,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        image[:, y:y + side, x:x + side] = PALETTE[label][:, None, None]
    return images


def synthetic_set(ipc: int, seed: int = 0) -> SyntheticSet:
    """A 2x2-composed synthetic set: each image tiles four class squares of half size."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(ipc)
    tiles = squares(labels.repeat_interleave(4), SIZE // 2, generator).reshape(len(labels), 2, 2, 3, SIZE // 2, SIZE // 2)
    images = tiles.permute(0, 3, 1, 4, 2, 5).reshape(len(labels), 3, SIZE, SIZE).contiguous()
    return SyntheticSet(images, labels, CLASSES, grid=2)


def real_images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat(per_class)
    return squares(labels, SIZE, generator), labels


def collate_batch(items) -> ImageBatch:
    images, labels = zip(*items)
    return ImageBatch(torch.stack(images), torch.stack(labels), 0)


class SquaresData(L.LightningDataModule):
    """Synthetic uint8 training batches and a normalised real validation split, like DistilledDataModule."""

    def __init__(self, ipc: int = 4, val_per_class: int = 8, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.synthetic_set = synthetic_set(ipc, seed)
        val, val_labels = real_images(val_per_class, seed + 1)
        self.val_images = normalize(val, IMAGENET_MEAN, IMAGENET_STD)
        self.val_labels = val_labels
        self.batch_size = batch_size
        self.num_classes = len(CLASSES)
        self.class_mapping = CLASSES

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.synthetic_set.images, self.synthetic_set.labels)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.val_images, self.val_labels)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_batch)


def make_student(teacher_path, **kwargs):
    """A ConvNet-D2 FKD student of a ConvNet-D2 teacher on the squares (32 px)."""
    from patchdd.lightning_modules.student import FKDStudent
    from patchdd.training.augment import AugmentOptions

    options = dict(teacher="convnet_d2", student="convnet_d2", num_classes=4, teacher_checkpoint=str(teacher_path),
                   teacher_kwargs={"width": 16}, student_kwargs={"width": 16}, model_image_size=SIZE,
                   augment=AugmentOptions(image_size=SIZE), lr=3e-3)
    return FKDStudent(**{**options, **kwargs})


def train_teacher(path: Path, name: str = "convnet_d2", width: int = 16, steps: int = 60) -> Path:
    """A ConvNet trained with cross-entropy on coloured squares, saved as a state dict."""
    torch.manual_seed(0)
    model = build_model(name, len(CLASSES), image_size=SIZE, width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = real_images(64, seed=123)
    inputs = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    for step in range(steps):
        batch = torch.randint(0, len(labels), (32,))
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    return path


def write_real_folder(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder ``root/{train,val}/<class>/*.png`` of coloured squares."""
    for split, offset in (("train", 0), ("val", 1)):
        images, labels = real_images(per_class, seed + offset)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / CLASSES.folders[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


def write_synthetic_export(directory: Path, ipc: int) -> Path:
    """Export a squares synthetic set the way ``cli.py distill`` does (PNGs, synthetic.json, tiles.parquet)."""
    from patchdd.formats.synthetic_folder import SyntheticFolderWriter
    from patchdd.methods.selection import Picks

    synthetic = synthetic_set(ipc)
    writer = SyntheticFolderWriter(directory, synthetic.classes, synthetic.grid)
    tiles = synthetic.grid**2
    for label in range(len(CLASSES)):
        ids = [f"src/{label}/{i}" for i in range(ipc * tiles)]
        picks = Picks.of(label, ids, np.zeros((len(ids), 4)), np.zeros(len(ids)))
        writer.add(label, synthetic.images[synthetic.labels == label], picks)
    return writer.close({"ipc": ipc, "selector": "random"})

"""The synthetic set of one IPC and class subset as a LightningDataModule, for the student trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from patchdd.data.sources import ClassMapping
from patchdd.datamodules.real import RealDataModule, save_class_mapping
from patchdd.errors import DataError
from patchdd.formats.score_store import ScoreStore
from patchdd.formats.synthetic_folder import INFO_FILE, read_image_folder, read_synthetic_folder, synthetic_classes
from patchdd.formats.synthetic_set import SyntheticSet
from patchdd.methods.registry import SynthesisOptions
from patchdd.methods.selection import Picks
from patchdd.methods.store_index import check_settings
from patchdd.methods.synthesis import subset_mapping, synthetic_set
from patchdd.training.augment import AugmentOptions, per_sample_transform
from patchdd.training.kd import rded_batch_size


class DistilledDataModule(L.LightningDataModule):
    """The synthetic set of one IPC and class subset, from a score store or an exported folder.

    ``train_dataloader`` yields shuffled ``(uint8 images (B, 3, H, W), int64 labels)``; the student augments
    on the device. With ``augment_in_workers`` the loader workers apply ``augment`` per sample instead
    (:func:`patchdd.training.augment.per_sample_transform`) and yield normalised float images. ``val_dataloader``
    is ``real``'s, whose class subset is set to the synthetic classes (same sorted order, so labels agree).

    Args:
        store: score store to build the set from (give this or ``synthetic_dir``).
        synthetic_dir: a folder exported by ``distill`` (read exactly, ``synthetic.json`` beside the images), or a
            plain ImageFolder from another method (resized to ``folder_image_size``).
        classes: ``all`` (or None), a preset (imagenette, imagewoof, imagenet100), comma-separated wnids / names,
            or a list.
        ipc: images per class.
        synthesis: how the set is made from the store: the method (``selector``), layout, clustering, RDED's
            teacher, seed (:class:`~patchdd.methods.registry.SynthesisOptions`).
        real: the real data module whose validation split evaluates the student (its ``classes`` is set here).
        batch_size: the GLOBAL training batch size, or ``rded``: RDED's rule from the IPC and the class count (10 /
            50 / 100 from IPC 1 / 10 / 50, doubled for 100+ classes, at most IPC x classes), the one rule ``fit``
            and ``matrix`` share. Under DDP each of W ranks takes ``batch_size // W`` (an error when W does not
            divide it), so the protocol's batch and learning rate hold whatever the device count.
        num_workers: loader worker processes.
        augment_in_workers: augment per sample in the loader workers (the CPU path) instead of on the device.
        augment: the per-sample augmentation for ``augment_in_workers`` (give it the student's values).
        folder_grid: tiles per side of a plain ImageFolder's images (2 for RDED-style 2x2, 1 for single images);
            drives the student's patch shuffle.
        folder_image_size: side to which a plain ImageFolder's images are resized.
    """

    def __init__(
        self,
        store: str | None = None,
        synthetic_dir: str | None = None,
        classes: str | list[str] | None = None,
        ipc: int = 10,
        synthesis: SynthesisOptions = SynthesisOptions(),
        real: RealDataModule | None = None,
        batch_size: int | Literal["rded"] = "rded",
        num_workers: int = 0,
        augment_in_workers: bool = False,
        augment: AugmentOptions = AugmentOptions(),
        folder_grid: int = 1,
        folder_image_size: int = 224,
    ) -> None:
        super().__init__()
        if (store is None) == (synthetic_dir is None):
            raise ValueError("DistilledDataModule needs exactly one of store=DIR or synthetic_dir=DIR")
        self.store_dir, self.synthetic_dir = store, synthetic_dir
        self.ipc = ipc
        self.synthesis = synthesis
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment_in_workers, self.augment = augment_in_workers, augment
        self.folder_grid, self.folder_image_size = folder_grid, folder_image_size
        self.class_mapping = subset_mapping(self._available_classes(), classes)
        if batch_size == "rded":
            self.batch_size = rded_batch_size(ipc, len(self.class_mapping))
        self.real = real
        if real is not None:
            _attach_real(real, self.class_mapping)
        self.synthetic_set: SyntheticSet | None = None
        self.picks: Picks | None = None

    def _available_classes(self) -> ClassMapping:
        if self.synthetic_dir is not None:
            return synthetic_classes(self.synthetic_dir)
        store = ScoreStore.open(self.store_dir)
        check_settings(store, self.synthesis.expect_settings)
        return ClassMapping.from_json(store.manifest.classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_mapping)

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic_set is None:
            self.synthetic_set = self._build()
        save_class_mapping(self.trainer, self.class_mapping)

    def _build(self) -> SyntheticSet:
        if self.synthetic_dir is not None:
            folders = list(self.class_mapping.folders)
            if (Path(self.synthetic_dir) / INFO_FILE).is_file():
                return read_synthetic_folder(self.synthetic_dir, folders)
            return read_image_folder(self.synthetic_dir, self.folder_grid, self.folder_image_size, folders)
        synthetic, self.picks = synthetic_set(self.store_dir, self.ipc, list(self.class_mapping.folders),
                                              self.synthesis)
        return synthetic

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def device_batch_size(self) -> int:
        """The batch each rank takes: the global batch over the world size."""
        if self.batch_size % self.world_size:
            raise ValueError(f"the global batch size {self.batch_size} does not divide over {self.world_size} devices "
                             "(each rank takes batch_size // devices): choose a device count that divides it")
        return self.batch_size // self.world_size

    def train_dataloader(self) -> DataLoader:
        if self.synthetic_set is None:
            raise RuntimeError("call setup() before train_dataloader()")
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.augment_in_workers:
            dataset = AugmentedImages(self.synthetic_set, per_sample_transform(self.synthetic_set.grid, self.augment))
            return DataLoader(dataset, batch_size=self.device_batch_size, shuffle=True, **workers)
        return DataLoader(SyntheticBatches(self.synthetic_set), batch_size=self.device_batch_size, shuffle=True,
                          collate_fn=already_batched, **workers)

    def val_dataloader(self):
        return self.real.val_dataloader() if self.real is not None else []

    def test_dataloader(self):
        return self.real.test_dataloader() if self.real is not None else []


class SyntheticBatches(Dataset):
    """uint8 images and labels for on-device augmentation, fetched a whole batch at once (one gather per batch
    instead of stacking images one by one); works with any sampler, Lightning's distributed one included."""

    def __init__(self, synthetic: SyntheticSet) -> None:
        self.images, self.labels = synthetic.images, synthetic.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def already_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`SyntheticBatches`, whose fetch already returns a batch."""
    return batch


class AugmentedImages(Dataset):
    """A synthetic set whose images pass through a per-sample transform (in the loader workers)."""

    def __init__(self, synthetic: SyntheticSet, transform) -> None:
        self.synthetic = synthetic
        self.transform = transform

    def __len__(self) -> int:
        return len(self.synthetic)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.synthetic.images[i]), self.synthetic.labels[i]


def _attach_real(real: RealDataModule, classes: ClassMapping) -> None:
    """Give the real module the synthetic class subset and check that its labels agree."""
    real.classes = list(classes.folders)
    if real.class_mapping.folders != classes.folders:
        raise DataError(f"the real data module's classes {real.class_mapping.folders[:5]}... do not match the "
                        f"synthetic classes {classes.folders[:5]}... (was its class mapping read before?)")

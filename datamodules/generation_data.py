"""The data side of ``generate``: planned work items served in canonical batches, and the callback that writes
the generated images.

Each rank takes every ``world``-th canonical batch (Lightning's distributed sampler is not used), so an image is
computed in the same batch whatever the world size; the writer saves each image atomically under its planned file
name, so a cut run leaves only whole PNGs and a rerun skips the batches whose images are all there.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from patchdd.datamodules.callbacks import stop_if_terminated
from patchdd.formats.outputs import writing
from patchdd.generation.plan import WorkItem, collate_items

# Lightning warns that it cannot set drop_last on a custom batch sampler; ours never drops anything.
warnings.filterwarnings("ignore", message="You are using a custom batch sampler", category=PossibleUserWarning)

RESIZE_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
                  "bilinear": Image.Resampling.BILINEAR}


class FixedBatches(Sampler):
    """A batch sampler that yields the given batches of positions, in order."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [list(b) for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class WorkItemDataModule(L.LightningDataModule):
    """Predict-time data of :class:`patchdd.lightning_modules.generation.LatentGenerator`.

    Args:
        items: the planned work items (:mod:`patchdd.generation.plan`).
        batches: the canonical batches to run, as positions into ``items``.
    """

    def __init__(self, items: Sequence[WorkItem], batches: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.items, self.batches = list(items), [list(b) for b in batches]

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(self.items, batch_sampler=FixedBatches(self.batches[rank::world]), collate_fn=collate_items)


def save_png_atomically(image: Image.Image, path: Path) -> None:
    """Write ``path`` through a temporary file and a rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.png")
    with writing(path):
        image.save(tmp)
        os.replace(tmp, path)


class SyntheticImageWriter(BasePredictionWriter):
    """Save every generated image as ``<its IPC's folder>/<class folder>/img_NNN.png``, resized when asked.

    Args:
        directories: the (building) folder of each IPC's set.
        output_size: side of the saved images (``None``: as decoded).
        resize_filter: ``lanczos`` (D3HR), ``bicubic`` (D4M) or ``bilinear``.
    """

    def __init__(self, directories: dict[int, str], output_size: int | None = None,
                 resize_filter: str = "lanczos") -> None:
        super().__init__(write_interval="batch")
        if resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter must be one of {sorted(RESIZE_FILTERS)}, got {resize_filter!r}")
        self.directories = {ipc: Path(d) for ipc, d in directories.items()}
        self.output_size, self.resize_filter = output_size, resize_filter

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        stop_if_terminated(trainer, "the images written")  # SIGTERM between two batches: start no other

    def write_on_batch_end(self, trainer, pl_module, prediction: tuple[torch.Tensor, list[WorkItem]], batch_indices,
                           batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, items = prediction
        for image, item in zip(images, items):
            picture = Image.fromarray(image.permute(1, 2, 0).numpy())
            if self.output_size is not None and picture.size != (self.output_size, self.output_size):
                picture = picture.resize((self.output_size, self.output_size), RESIZE_FILTERS[self.resize_filter])
            save_png_atomically(picture, self.directories[item.ipc] / item.file)
        stop_if_terminated(trainer, "the images written")

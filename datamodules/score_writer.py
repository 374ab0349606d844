"""The callbacks that stream a ``predict`` pass into a store, per rank: Stage I's score store (``--store.*``),
D3HR's latent statistics store (``--stats.*``) and D4M's latent cache (inside ``generate --method d4m``).

Both are added to every LightningCLI command and act only in ``predict``, and only for the module that produces
their kind of store (``output_store`` of the LightningModule). On setup a writer checks that an existing store was
written with the same settings and data, and tells the data module which images it already holds, so a rerun after
a crash or pre-emption does only the rest; a new store is created with its first shard.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from patchdd.datamodules.callbacks import stop_if_terminated
from patchdd.formats.latent_cache import LatentCache
from patchdd.formats.latent_stats import ClassSums, LatentStatsStore
from patchdd.formats.outputs import BackgroundWrites
from patchdd.formats.score_store import PatchTable, ScoreStore
from patchdd.formats.stores import MANIFEST_FILE, Manifest, ManifestStore

log = logging.getLogger(__name__)


def code_version() -> str:
    """The git commit of this checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pass_settings(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> dict:
    """What a predict pass's values depend on, compared when a store is resumed or reused: the module's and the
    data's settings and the Trainer's precision (a resume at another precision would mix values of both)."""
    return pl_module.settings() | datamodule.settings() | {"precision": str(trainer.precision)}


def store_manifest(trainer: L.Trainer, pl_module: L.LightningModule) -> Manifest:
    """The manifest of a predict pass: its settings, class mapping, how to reopen the images."""
    datamodule = trainer.datamodule
    for name, owner in (("settings", pl_module), ("settings", datamodule), ("describe", datamodule)):
        if not hasattr(owner, name):
            raise TypeError(f"a store writer needs {type(owner).__name__}.{name}() (use a scoring or inversion "
                            "module with ScoringDataModule)")
    provenance = {"code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "world_size": trainer.world_size}
    return Manifest(settings=pass_settings(trainer, pl_module, datamodule),
                    classes=datamodule.class_mapping.to_json(), data=datamodule.describe(), provenance=provenance)


class StoreWriter(BasePredictionWriter):
    """Shared habits of the store writers (see the module's docstring); subclasses say which store and how a
    prediction is written.

    Args:
        dir: the store directory (created if missing; an existing store is resumed after its settings are checked).
    """

    store_class: ClassVar[type[ManifestStore]]
    produces: ClassVar[str]  # the ``output_store`` of the modules this writer serves
    option: ClassVar[str]

    def __init__(self, dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.dir = dir
        self.store: ManifestStore | None = None
        self.manifest: Manifest | None = None
        self.writes = BackgroundWrites()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" or getattr(pl_module, "output_store", None) != self.produces:
            return  # another module predicts: this writer stays idle
        if self.dir is None:  # the pass would run for hours and keep nothing
            raise ValueError(f"set the {self.store_class.KIND} directory: {self.option} OUT")
        self.manifest = store_manifest(trainer, pl_module)
        if (Path(self.dir) / MANIFEST_FILE).is_file():
            self.store = self.store_class.create_or_check(self.dir, self.manifest)
            done = self.store.done_ids()
            trainer.datamodule.exclude(done)
            if done and trainer.is_global_zero:
                log.info("%s %s already holds %d images; doing the rest", self.store_class.KIND, self.dir, len(done))
        trainer.strategy.barrier("store-read")  # every rank has read the store before any rank writes
        # The results live on disk; keeping them for trainer.predict's return value would grow with the dataset.
        trainer.predict_loop.return_predictions = False

    def open_store(self) -> ManifestStore:
        """The store, created with the first write (everything was validated by then)."""
        if self.store is None:
            self.store = self.store_class.create_or_check(self.dir, self.manifest)
        return self.store

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.stop_if_terminated(trainer)  # SIGTERM between two batches: start no other

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if self.manifest is None:
            return
        self.add(prediction, trainer.global_rank)
        self.stop_if_terminated(trainer)

    def stop_if_terminated(self, trainer: L.Trainer) -> None:
        """On SIGTERM (SLURM pre-emption): write what is buffered and stop, everything scored so far kept."""
        if self.manifest is not None and trainer.received_sigterm:
            self.flush(trainer.global_rank)
            self.writes.drain()
            stop_if_terminated(trainer, f"the {self.store_class.KIND}'s shards")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.manifest is not None:
            self.flush(trainer.global_rank)
            self.writes.drain()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.writes.drain()  # what was computed before the failure is kept

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After a pass that ended without error (Lightning calls no teardown after one): every rank's shards are
        written, so the store is marked complete. A cut pass leaves it unmarked: ``distill`` and ``generate``
        refuse it until the same command has finished it."""
        if stage != "predict" or self.manifest is None:
            return
        trainer.strategy.barrier("store-written")
        if trainer.is_global_zero:
            self.open_store().mark_complete()

    def add(self, prediction, rank: int) -> None:
        raise NotImplementedError

    def flush(self, rank: int) -> None:
        """Write what is buffered (nothing for a writer that writes every batch)."""


class ScoreStoreWriter(StoreWriter):
    """Append every predicted batch's rows to the score store in ``dir`` (one shard per batch and rank).

    An existing store is checked (settings, classes, data fingerprint) in ``setup`` and its images are left out;
    a new store's manifest is written with the first shard, so a run that fails before scoring anything (a
    misspelled prior, an empty class folder) leaves no store behind. On SIGTERM (SLURM pre-emption) the pass stops
    after the batch in hand, everything scored so far kept; the same command resumes it.

    Shards are written on a background thread while the next batch is computed (at most 4 wait at a time).

    Args:
        dir: the store directory (created if missing; an existing store is resumed after its settings are checked).
            Required when predicting with a scorer; other modules predict with the writer idle.
    """

    store_class, produces, option = ScoreStore, "scores", "--store.dir"

    def add(self, prediction: PatchTable, rank: int) -> None:
        if len(prediction):
            self.writes.submit(self.open_store().append, prediction, rank)


class LatentStatsWriter(StoreWriter):
    """Sum every predicted batch's inverted latents per class into the latent statistics store in ``dir``.

    Sums are buffered and written as one shard per ``flush_images`` images and rank (and at the end, and on
    SIGTERM); a crash loses at most the buffer, and the same command resumes with the images not yet summed.

    Args:
        dir: the store directory (created if missing; an existing store is resumed after its settings are checked).
            Required when predicting with an inverter; other modules predict with the writer idle.
        flush_images: images summed in memory before a shard is written.
    """

    store_class, produces, option = LatentStatsStore, "latent_stats", "--stats.dir"

    def __init__(self, dir: str | None = None, flush_images: int = 4096) -> None:
        super().__init__(dir)
        self.flush_images = flush_images
        self.pending, self.pending_ids = ClassSums.empty(), []

    def add(self, prediction: tuple[ClassSums, list[str]], rank: int) -> None:
        sums, image_ids = prediction
        self.pending, self.pending_ids = self.pending + sums, self.pending_ids + list(image_ids)
        if len(self.pending_ids) >= self.flush_images:
            self.flush(rank)

    def flush(self, rank: int) -> None:
        if self.pending_ids:
            self.writes.submit(self.open_store().append, self.pending, self.pending_ids, rank)
            self.pending, self.pending_ids = ClassSums.empty(), []


class LatentCacheWriter(StoreWriter):
    """Write every predicted batch's latents to D4M's latent cache in ``dir`` (buffered, one shard per
    ``flush_images`` images and rank, at the end and on SIGTERM); the same command resumes with the images not yet
    encoded, and a complete cache is reused by every later IPC.

    Args:
        dir: the cache directory (created if missing; an existing cache is resumed after its settings are checked).
        flush_images: latents held in memory before a shard is written.
    """

    store_class, produces, option = LatentCache, "latent_cache", "--latent_cache"

    def __init__(self, dir: str | None = None, flush_images: int = 1024) -> None:
        super().__init__(dir)
        self.flush_images = flush_images
        self.pending: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def add(self, prediction: tuple[torch.Tensor, torch.Tensor, list[str]], rank: int) -> None:
        if prediction[2]:
            self.pending.append(prediction)
        if sum(len(ids) for _, _, ids in self.pending) >= self.flush_images:
            self.flush(rank)

    def flush(self, rank: int) -> None:
        if self.pending:
            latents, labels, ids = zip(*self.pending)
            self.writes.submit(self.open_store().append, torch.cat(latents), torch.cat(labels),
                               [i for chunk in ids for i in chunk], rank)
            self.pending = []

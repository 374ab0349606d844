"""The callback that streams Stage I's rows into a score store, per rank, batch by batch.

Added to every LightningCLI command as ``--store.*``; it acts only in ``predict``. On setup it checks that an
existing store was written with the same settings and data, and tells the data module which images are already
scored, so a rerun after a crash or pre-emption scores only the rest; a new store is created with its first shard.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from patchdd.formats.score_store import MANIFEST_FILE, Manifest, PatchTable, ScoreStore

log = logging.getLogger(__name__)


def code_version() -> str:
    """The git commit of this checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def scoring_manifest(trainer: L.Trainer, pl_module: L.LightningModule) -> Manifest:
    """The manifest of a scoring run: module + data settings, class mapping, how to reopen the images."""
    datamodule = trainer.datamodule
    for name, owner in (("settings", pl_module), ("settings", datamodule), ("describe", datamodule)):
        if not hasattr(owner, name):
            raise TypeError(f"ScoreStoreWriter needs {type(owner).__name__}.{name}() (use DiffusionScorer and "
                            "ScoringDataModule)")
    provenance = {"code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "precision": str(trainer.precision), "world_size": trainer.world_size}
    return Manifest(settings=pl_module.settings() | datamodule.settings(),
                    classes=datamodule.class_mapping.to_json(), data=datamodule.describe(), provenance=provenance)


class ScoreStoreWriter(BasePredictionWriter):
    """Append every predicted batch's rows to the score store in ``dir`` (one shard per batch and rank).

    An existing store is checked (settings, classes, data fingerprint) in ``setup`` and its images are left out;
    a new store's manifest is written with the first shard, so a run that fails before scoring anything (a
    misspelled prior, an empty class folder) leaves no store behind. On SIGTERM (SLURM pre-emption) the pass stops
    after the batch in hand, everything scored so far kept; the same command resumes it.

    Args:
        dir: the store directory (created if missing; an existing store is resumed after its settings are checked).
            Required when predicting with a scorer; other modules predict with the writer idle.
    """

    def __init__(self, dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.dir = dir
        self.store: ScoreStore | None = None
        self.manifest: Manifest | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.dir is None:
            if hasattr(pl_module, "settings"):  # a scorer without a store would run for hours and keep nothing
                raise ValueError("set the score store directory: --store.dir OUT")
            return  # predicting with another module: the writer stays idle
        self.manifest = scoring_manifest(trainer, pl_module)
        if (Path(self.dir) / MANIFEST_FILE).is_file():
            self.store = ScoreStore.create_or_check(self.dir, self.manifest)
            done = self.store.scored_ids()
            trainer.datamodule.exclude(done)
            if done and trainer.is_global_zero:
                log.info("score store %s already holds %d images; scoring the rest", self.dir, len(done))
        trainer.strategy.barrier("score-store-read")  # every rank has read the store before any rank writes
        # The rows live on disk; keeping them for trainer.predict's return value would grow with the dataset.
        trainer.predict_loop.return_predictions = False

    def write_on_batch_end(self, trainer, pl_module, prediction: PatchTable, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if self.manifest is None:
            return
        if len(prediction):
            if self.store is None:  # the first rows of a new store: everything was validated by now
                self.store = ScoreStore.create_or_check(self.dir, self.manifest)
            self.store.append(prediction, trainer.global_rank)
        if trainer.received_sigterm:  # Lightning's predict loop does not stop on SIGTERM by itself
            raise SIGTERMException

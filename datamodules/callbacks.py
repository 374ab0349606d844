"""Trainer plug-ins: the student protocol's validation schedule, a CSV logger whose metrics survive a resume, and
the stop of a predict pass on SIGTERM."""

from __future__ import annotations

import csv
import signal
import sys

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from patchdd.training.kd import idc_validates, rded_validates


SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def stop_if_terminated(trainer: L.Trainer, kept: str) -> None:
    """After a predict batch is written: on SIGTERM (SLURM pre-emption; Lightning's predict loop does not stop by
    itself) say so in one line and leave with exit code 143, ``kept`` (what was written) kept for the resume."""
    if not trainer.received_sigterm:
        return
    if trainer.is_global_zero:
        print(f"stopped by SIGTERM after the batch in hand; {kept} kept: the same command resumes", file=sys.stderr,
              flush=True)
    raise SIGTERMException(SIGTERM_EXIT_CODE)


class RDEDValidationSchedule(Callback):
    """Run validation only on the epochs :func:`~patchdd.training.kd.rded_validates` names (RDED: every 10 epochs
    in the last 20%; the last epoch always).

    Args:
        every: validate after every ``every``-th epoch of the window.
        last_fraction: the window is the last ``last_fraction`` of the epochs.
    """

    def __init__(self, every: int = 10, last_fraction: float = 0.2) -> None:
        self.every, self.last_fraction = every, last_fraction

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validate = rded_validates(trainer.current_epoch, trainer.max_epochs, self.every, self.last_fraction)
        # The epoch loop validates when (epoch + 1) % check_val_every_n_epoch == 0.
        trainer.check_val_every_n_epoch = 1 if validate else trainer.max_epochs + 1


class IDCValidationSchedule(Callback):
    """Run validation only on the epochs :func:`~patchdd.training.kd.idc_validates` names (IDC: every
    ``max_epochs // 100`` epochs, the last one included).

    Args:
        divisions: validations over the run (IDC: 100).
    """

    def __init__(self, divisions: int = 100) -> None:
        self.divisions = divisions

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validate = idc_validates(trainer.current_epoch, trainer.max_epochs, self.divisions)
        trainer.check_val_every_n_epoch = 1 if validate else trainer.max_epochs + 1


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued (its columns kept), not
    deleted: what a run cut short logged stays in the file when it resumes."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` for a resumed fit (``--ckpt_path``): it appends to the run's ``metrics.csv`` (the plain one
    deletes it), so the metrics of a cut and resumed run read as one run. Options: :class:`CSVLogger`'s."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

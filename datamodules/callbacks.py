"""Trainer callbacks of the student protocol."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from patchdd.training.kd import rded_validates


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

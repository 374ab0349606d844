"""The LightningCLI of the suite: ``patchdd fit | validate | test | predict -c config.yaml``."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from patchdd.datamodules.score_writer import ScoreStoreWriter


class PatchDDCLI(LightningCLI):
    """LightningCLI with the suite's defaults: a fixed seed recorded in the saved config, and Stage I's score store
    writer as ``--store.*`` (it acts in ``predict`` only, so ``fit`` runs without it)."""

    def __init__(self, args: list[str]) -> None:
        with warnings.catch_warnings():  # args given from Python (the demo, the matrix) while sys.argv is the caller's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(seed_everything_default=0, save_config_kwargs={"overwrite": True}, args=args,
                             auto_configure_optimizers=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ScoreStoreWriter, "store")

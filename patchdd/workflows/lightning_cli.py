"""The LightningCLI of the suite: ``patchdd fit | validate | test | predict -c config.yaml``."""

from __future__ import annotations

import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from patchdd.datamodules.score_writer import LatentStatsWriter, ScoreStoreWriter
from patchdd.training.zoo import find_run_checkpoint
from patchdd.workflows.parser_errors import OneLineErrors


class PatchDDArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line (:class:`~patchdd.errors.OptionError`)."""


class PatchDDCLI(LightningCLI):
    """LightningCLI with the suite's defaults: a fixed seed recorded in the saved config, Stage I's score store
    writer as ``--store.*`` and D3HR's latent statistics writer as ``--stats.*`` (they act in ``predict`` only, for
    the module that produces their store, so ``fit`` runs without them)."""

    def __init__(self, args: list[str]) -> None:
        with warnings.catch_warnings():  # args given from Python (the demo, the matrix) while sys.argv is the caller's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(seed_everything_default=0, save_config_kwargs={"overwrite": True}, args=args,
                             auto_configure_optimizers=False, parser_class=PatchDDArgumentParser,
                             parser_kwargs={"prog": "patchdd"})  # not sys.argv[0] (cli.py, -c, __main__.py)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ScoreStoreWriter, "store")
        parser.add_lightning_class_args(LatentStatsWriter, "stats")

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` with the default logger resumes the newest run of ``default_root_dir`` in its own
        ``lightning_logs/version_N`` (its ``metrics.csv`` continued), instead of starting ``version_N+1``."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("ckpt_path") != "last" or config.trainer.logger not in (None, True):
            return
        root = Path(config.trainer.default_root_dir or ".")
        last = find_run_checkpoint(root, "last.ckpt")
        if last is None:
            raise FileNotFoundError(f"nothing to resume: no lightning_logs/version_*/checkpoints/last.ckpt under "
                                    f"{root} (drop --ckpt_path to start a new run)")
        config.ckpt_path = str(last)
        version = int(last.parents[1].name.removeprefix("version_"))
        config.trainer.logger = Namespace(class_path="patchdd.datamodules.callbacks.ResumableCSVLogger",
                                          init_args=Namespace(save_dir=str(root), name="lightning_logs",
                                                              version=version))

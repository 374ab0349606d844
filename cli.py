"""patchdd command line: LightningCLI (fit / validate / test / predict) plus the suite's own commands.

    python cli.py fit -c configs/teacher/toy_convnet.yaml
    python cli.py toydata --out data/toy
    python cli.py --help

Every command takes ``-c config.yaml`` and ``--print_config``.
"""

from __future__ import annotations

import sys
import typing
import warnings
from collections.abc import Callable, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from datamodules.distilled import distill
from datamodules.score_writer import ScoreStoreWriter
from datamodules.toy import write_toy_dataset
from workflows.demo import demo
from workflows.matrix import matrix

# Commands that are not Trainer methods: name -> function whose signature and docstring define the options.
COMMANDS: dict[str, Callable] = {
    "toydata": write_toy_dataset,
    "matrix": matrix,
    "distill": distill,
    "demo": demo,
}
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


class PatchDDCLI(LightningCLI):
    """LightningCLI with the suite's defaults: a fixed seed recorded in the saved config."""

    def __init__(self, args: list[str] | None = None) -> None:
        with warnings.catch_warnings():  # args given from Python (the demo, the matrix) while sys.argv is the caller's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                seed_everything_default=0,
                save_config_kwargs={"overwrite": True},
                args=args,
                auto_configure_optimizers=False,
            )

    def add_arguments_to_parser(self, parser) -> None:
        # Stage I's score store writer (--store.dir); it acts in `predict` only, so `fit` runs without it.
        parser.add_lightning_class_args(ScoreStoreWriter, "store")


def command_parser(name: str, function: Callable) -> ArgumentParser:
    """A jsonargparse parser for ``function`` with the ``-c/--config`` and ``--print_config`` habits."""
    parser = ArgumentParser(prog=f"cli.py {name}", description=(function.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file with the options below")
    parser.add_function_arguments(function, as_group=False)
    return parser


def run_command(name: str, args: list[str]):
    """Parse ``args`` for the suite command ``name`` and run it."""
    function = COMMANDS[name]
    parser = command_parser(name, function)
    config = parser.instantiate(parser.parse_args(spread_list_values(function, args)))
    options = {k: v for k, v in vars(config).items() if k not in ("config", "__path__")}
    return function(**options)


def list_options(function: Callable) -> set[str]:
    """``--name`` of every parameter of ``function`` typed as a list / sequence (optionally ``| None``)."""
    options = set()
    for name, hint in typing.get_type_hints(function).items():
        if name == "return":
            continue
        hints = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        if any(typing.get_origin(h) in (list, Sequence) for h in hints):
            options.add(f"--{name}")
    return options


def spread_list_values(function: Callable, args: list[str]) -> list[str]:
    """Let list options take space-separated values: ``--ipc 1 10 50`` becomes ``--ipc [1,10,50]``."""
    lists, out, i = list_options(function), [], 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1] not in lists:
            continue
        values = []
        while i < len(args) and not args[i].startswith("-"):
            values.append(args[i])
            i += 1
        if len(values) == 1 and values[0].startswith("["):
            out += values
        elif values:
            out.append(f"[{','.join(values)}]")
    return out


def print_overview() -> None:
    print("usage: cli.py COMMAND [-c CONFIG] [options]\n\ncommands:")
    for name in TRAINER_COMMANDS:
        print(f"  {name:<10} Lightning Trainer.{name} (LightningCLI; model and data by class_path in the config)")
    for name, function in COMMANDS.items():
        print(f"  {name:<10} {(function.__doc__ or '').strip().splitlines()[0]}")
    print("\n`python cli.py COMMAND --help` lists the options of one command.")


def main(argv: list[str] | None = None) -> None:
    """Run one command; ``argv`` defaults to the process's command line."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print_overview()
        return
    if args[0] in COMMANDS:
        run_command(args[0], args[1:])
        return
    PatchDDCLI(args=argv)


if __name__ == "__main__":
    main()

"""Running the suite's commands from Python, the same way the command line runs them.

:func:`run_trainer_command` runs ``fit`` / ``validate`` / ``test`` / ``predict`` through :class:`PatchDDCLI`
(:mod:`patchdd.workflows.lightning_cli`); :func:`run_function` parses options for any command function (``distill``, ``toydata``,
``matrix``, ``demo``) with jsonargparse, with ``-c config.yaml`` and ``--print_config``. The command line, the
demo and the matrix all go through these two, so a stage of the demo is exactly the command a user types.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from patchdd.workflows.parser_errors import OneLineErrors, parsing

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
CONFIG_FLAGS = ("-c", "--config")
PACKAGED = ("configs/", "assets/")


def deprecated(old: str, new: str) -> None:
    """One line on the console: ``old`` is an old spelling of ``new``, still accepted for one release."""
    print(f"note: {old} is deprecated, use {new} (accepted until the next release)", file=sys.stderr)


def packaged_path(path: str) -> str:
    """``path`` itself when it exists; else, for ``configs/...`` and ``assets/...``, the copy installed with the
    package (``site-packages/patchdd/configs``, or the checkout's ``configs/`` for an editable install), so that
    ``patchdd demo`` works from any directory."""
    if Path(path).exists() or not path.startswith(PACKAGED):
        return path
    package = Path(__file__).resolve().parents[1]
    for root in (package, package.parent):
        if (root / path).exists():
            return str(root / path)
    return path


def with_packaged_configs(args: Sequence[str]) -> list[str]:
    """``args`` with every ``-c PATH`` / ``--config=PATH`` resolved by :func:`packaged_path`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = packaged_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + packaged_path(arg.partition("=")[2])
    return out


def import_lightning_classes() -> None:
    """Import every LightningModule, LightningDataModule and callback of the suite, so that configs and
    ``--model.help`` can name them by their short class name (``FKDStudent``, ``DistilledDataModule``)."""
    import patchdd.datamodules.callbacks  # noqa: F401
    import patchdd.datamodules.distilled  # noqa: F401
    import patchdd.datamodules.generation_data  # noqa: F401
    import patchdd.datamodules.real  # noqa: F401
    import patchdd.datamodules.score_writer  # noqa: F401
    import patchdd.datamodules.scoring_data  # noqa: F401
    import patchdd.lightning_modules.classifier  # noqa: F401
    import patchdd.lightning_modules.diffusion_prior  # noqa: F401
    import patchdd.lightning_modules.dit_prior  # noqa: F401
    import patchdd.lightning_modules.generation  # noqa: F401
    import patchdd.lightning_modules.inversion  # noqa: F401
    import patchdd.lightning_modules.scoring  # noqa: F401
    import patchdd.lightning_modules.student  # noqa: F401


def run_trainer_command(args: Sequence[str]) -> None:
    """``fit`` / ``validate`` / ``test`` / ``predict`` with LightningCLI, e.g. ``["fit", "-c", "cfg.yaml"]``."""
    from patchdd.workflows.lightning_cli import PatchDDCLI

    import_lightning_classes()
    args = with_packaged_configs(args)
    with parsing(args):
        PatchDDCLI(args=args)


def command_parser(name: str, function: Callable):
    """A jsonargparse parser for ``function`` with the ``-c/--config`` and ``--print_config`` habits; errors are
    one :class:`OptionError` line."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    class CommandParser(OneLineErrors, ArgumentParser):
        pass

    parser = CommandParser(prog=f"patchdd {name}", description=(function.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file with the options below")
    parser.add_function_arguments(function, as_group=False)
    return parser


def run_function(name: str, function: Callable, args: Sequence[str]):
    """Parse ``args`` for the command ``name`` (whose options are ``function``'s parameters) and call it."""
    parser = command_parser(name, function)
    args = with_packaged_configs(args)
    with parsing(args):
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


def is_option(arg: str) -> bool:
    """Whether ``arg`` is an option name (``--ipc``), not a value (``-1`` is a value)."""
    if not arg.startswith("-"):
        return False
    try:
        float(arg)
    except ValueError:
        return True
    return False


def spread_list_values(function: Callable, args: Sequence[str]) -> list[str]:
    """Let list options take space-separated values: ``--ipc 1 10 50`` becomes ``--ipc [1,10,50]``."""
    lists, out, i = list_options(function), [], 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1] not in lists:
            continue
        values = []
        while i < len(args) and not is_option(args[i]):
            values.append(args[i])
            i += 1
        if len(values) == 1 and values[0].startswith("["):
            out += values
        elif values:
            out.append(f"[{','.join(values)}]")
    return out

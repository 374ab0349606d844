"""Parser errors in one line: jsonargparse's messages (a usage dump, a union of sub-errors) become one
:class:`~patchdd.errors.OptionError` naming the unknown option and the nearest known one, or the missing option;
the parser's own message stays in the error's ``details`` (``--verbose`` prints it)."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from patchdd.errors import OptionError

# The command line being parsed: the configs and class names it gives tell which class an unknown option was for.
COMMAND_ARGS: ContextVar[Sequence[str]] = ContextVar("COMMAND_ARGS", default=())


class OneLineErrors:
    """For jsonargparse parsers: an error raises :class:`OptionError` with one line saying what is wrong (the
    unknown option and the nearest known one, the missing config, the base config a preset needs) instead of
    printing the usage and exiting."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        explained = ex if isinstance(ex, OptionError) else getattr(ex, "__context__", None)
        if isinstance(explained, OptionError):  # a subcommand's parser explained it already
            raise explained
        parser = getattr(ex, "subcommand_parser", None) or self
        args = COMMAND_ARGS.get()
        raise OptionError(explain_parser_error(message, parser, args) + stacking_hint(args), details=message) from ex


@contextmanager
def parsing(args: Sequence[str]) -> Iterator[None]:
    """Inside, parser errors know the command line they came from (its ``-c`` paths made absolute: jsonargparse
    changes the working directory while it reads a config)."""
    token = COMMAND_ARGS.set([os.path.abspath(arg) if i and args[i - 1] in ("-c", "--config") else arg
                              for i, arg in enumerate(args)])
    try:
        yield
    finally:
        COMMAND_ARGS.reset(token)


def option_names(parser) -> list[str]:
    """Every ``--option`` a parser (and its nested groups) accepts."""
    return [name for action in parser._actions for name in action.option_strings if name.startswith("--")]


def named_class(name: str | None) -> type | None:
    """The class a config names: a dotted class path, or the short name of a Lightning class already imported."""
    if not name:
        return None
    if "." in name:
        module, _, short = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), short)
        except (ImportError, AttributeError, ValueError):
            return None
    import lightning as L

    pending = [L.LightningModule, L.LightningDataModule]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending += cls.__subclasses__()
    return None


def configured_class(key: str, args: Sequence[str]) -> type | None:
    """The class the command line gives ``key`` (``model``, ``data``): from its ``-c`` configs in order, then from
    ``--key CLASS`` / ``--key.class_path CLASS``."""
    import yaml

    name = None
    for i, arg in enumerate(args[:-1]):
        if arg in ("-c", "--config"):
            try:
                with open(args[i + 1], encoding="utf-8") as handle:
                    value = (yaml.safe_load(handle) or {}).get(key)
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            name = value.get("class_path", name) if isinstance(value, dict) else value if isinstance(value, str) \
                else name
        elif arg in (f"--{key}", f"--{key}.class_path"):
            name = args[i + 1]
    return named_class(name)


def class_options(cls: type | None, prefix: str) -> list[str]:
    """``--prefix.name`` of every constructor parameter of ``cls`` (and of its bases through ``**kwargs``)."""
    if cls is None:
        return []
    names = {p for klass in cls.__mro__ if "__init__" in vars(klass)
             for p, param in inspect.signature(klass.__init__).parameters.items()
             if p != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)}
    return [f"--{prefix}.{p}" for p in sorted(names)]


def nearest(option: str, known: Sequence[str]) -> str:
    """`` (did you mean --x?)`` for the known option nearest to ``option``, or nothing."""
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def explain_parser_error(message: str, parser, args: Sequence[str] = ()) -> str:
    """One line for a jsonargparse error message: an unknown option with the nearest known one, a missing required
    option, or the message's first line."""
    refused = re.search(r"Option '([\w.]+)' is not accepted", message)
    key = re.search(r'Parser key "([\w.]+)"', message)
    class_path = re.search(r"given class_path '([\w.]+)'", message)
    if refused and key:
        option = f"--{key.group(1)}.{refused.group(1)}"
        cls = named_class(class_path.group(1)) if class_path else configured_class(key.group(1), args)
        return f"unknown option {option}{nearest(option, class_options(cls, key.group(1)))}"
    unknown = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if unknown:
        option = next((a for a in unknown.group(1).split() if a.startswith("-")), unknown.group(1).split()[0])
        return f"unknown option {option}{nearest(option.split('=')[0], option_names(parser))}"
    required = re.search(r'Key "([\w.]+)" is required', message) or re.search(
        r"the following arguments are required: (.*)", message)
    if required:
        keys = [k.strip() for k in required.group(1).split(",")]
        command = keys[0].split(".")[0] if keys[0].split(".")[0] in CONFIG_FOLDERS else parser.prog.split()[-1]
        return missing_options(command, [key.split(".")[-1] for key in keys])
    return next(line.strip() for line in message.splitlines() if line.strip())


# Where each command's configs are (a missing required option usually means a missing -c).
CONFIG_FOLDERS = {"fit": "configs/teacher/, configs/student/ or configs/prior/", "predict": "configs/score/ or "
                  "configs/invert/", "distill": "configs/distill/", "generate": "configs/generate/",
                  "matrix": "configs/matrix/", "demo": "configs/demo/"}


def missing_options(command: str, names: list[str]) -> str:
    """The one line for required options that were not given."""
    listed = ", ".join(f"--{name}" for name in names)
    folder = CONFIG_FOLDERS.get(command)
    where = f" (from {folder})" if folder else ""
    if names == ["model"] or names == ["data"]:
        return f"patchdd {command} needs a config: -c CONFIG.yaml{where}"
    return f"missing {listed}: give {'it' if len(names) == 1 else 'them'}, or a config that sets " \
           f"{'it' if len(names) == 1 else 'them'} with -c CONFIG.yaml{where}"


def stacking_hint(args: Sequence[str]) -> str:
    """When a ``-c`` config says it is stacked on another (``-c BASE -c THIS`` in its header) that is not given:
    `` (CONFIG is stacked on BASE: pass -c BASE first)``; else nothing."""
    given = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-c", "--config")]
    for config in given:
        try:
            header = open(config, encoding="utf-8").read(4096)
        except OSError:
            continue
        name = config.replace(os.sep, "/").split("configs/")[-1]
        for base in re.findall(r"-c (configs/\S+\.yaml) -c configs/" + re.escape(name), header):
            if not any(g.endswith(base) for g in given):
                return f" (configs/{name} is stacked on {base}: pass -c {base} before it)"
    return ""

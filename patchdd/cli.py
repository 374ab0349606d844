"""The patchdd command line: ``patchdd COMMAND [-c CONFIG] [options]`` (also ``python -m patchdd``, ``python cli.py``).

    patchdd fit -c configs/teacher/toy_convnet.yaml
    patchdd toydata --out data/toy
    patchdd --help

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands; the others are the suite's own
commands, read by jsonargparse with the same habits (``-c config.yaml``, ``--print_config``). Every error is one
line on the console; ``--traceback`` shows the stack, ``--verbose`` everything child runs print.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import sys
from pathlib import Path

from patchdd.errors import one_line

# The suite's own commands: name -> "module:function"; the function's signature and docstring define the options.
COMMANDS = {
    "toydata": "patchdd.data.toy:write_toy_dataset",
    "distill": "patchdd.workflows.distill:distill",
    "generate": "patchdd.workflows.generate:generate",
    "matrix": "patchdd.workflows.matrix:matrix",
    "methods": "patchdd.methods.catalog:list_methods",
    "demo": "patchdd.workflows.demo:demo",
}
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
GLOBAL_FLAGS = {"--traceback": "show the stack of an error", "--verbose": "child runs print to the console too"}


def summary(target: str) -> str:
    """First docstring line of a command function, read from its source file without importing it (fast)."""
    module, _, name = target.partition(":")
    source = importlib.util.find_spec(module).origin
    tree = ast.parse(open(source, encoding="utf-8").read())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)
    return (ast.get_docstring(function) or "").splitlines()[0]


def print_overview() -> None:
    print("usage: patchdd [--traceback] [--verbose] COMMAND [-c CONFIG] [options]\n\ncommands:")
    for name in TRAINER_COMMANDS:
        print(f"  {name:<10} Lightning Trainer.{name} (LightningCLI; model and data by class name in the config)")
    for name, target in COMMANDS.items():
        print(f"  {name:<10} {summary(target)}")
    print("\noptions:")
    for flag, meaning in GLOBAL_FLAGS.items():
        print(f"  {flag:<12} {meaning}")
    print("\n`patchdd COMMAND --help` lists the options of one command.")


def dispatch(args: list[str]) -> None:
    """Run the command ``args[0]`` with the options ``args[1:]``."""
    from patchdd.workflows.invoke import run_function, run_trainer_command

    name = args[0]
    if name in COMMANDS:
        module, _, function = COMMANDS[name].partition(":")
        run_function(name, getattr(importlib.import_module(module), function), args[1:])
    elif name in TRAINER_COMMANDS:
        run_trainer_command(args)
    else:
        raise SystemExit(f"patchdd: unknown command {name!r}; `patchdd --help` lists the commands")


def help_cache_file(command: str) -> Path:
    """Where ``patchdd COMMAND --help`` is kept: named by a hash of every source file of the suite and of the
    versions of Python and the parser, so any change to the code or the environment makes a new one."""
    import hashlib
    from importlib.metadata import version

    digest = hashlib.sha256(f"{sys.version}:{version('jsonargparse')}:{version('lightning')}".encode())
    for package in ("patchdd", "patchdd.lightning_modules", "patchdd.datamodules"):
        folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patchdd" / "help"
    return cache / f"{command}-{digest.hexdigest()[:16]}.txt"


def command_help(command: str) -> str:
    """``patchdd COMMAND --help``'s text, built once per version of the code (building it imports torch, Lightning
    and every model class: seconds) and read from the cache afterwards."""
    cached = help_cache_file(command)
    if cached.is_file():
        return cached.read_text()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            dispatch([command, "--help"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise
    text = buffer.getvalue()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home: the help is still printed
    return text


def build_help_cache() -> None:
    """Build every command's help into the cache in one process (``make setup`` does, after the install), so that
    the first ``patchdd COMMAND --help`` is read from the cache too."""
    for command in (*TRAINER_COMMANDS, *COMMANDS):
        command_help(command)


def main(argv: list[str] | None = None) -> None:
    """Run one command; ``argv`` defaults to the process's command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in args
    if "--verbose" in args:
        os.environ["PATCHDD_VERBOSE"] = "1"
    args = [arg for arg in args if arg not in GLOBAL_FLAGS]
    if not args or args[0] in ("-h", "--help"):
        print_overview()
        return
    try:
        if args[1:] in (["--help"], ["-h"]) and args[0] in (*COMMANDS, *TRAINER_COMMANDS):
            print(command_help(args[0]), end="")
            return
        dispatch(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as err:  # every command's error is one line unless --traceback
        if show_traceback:
            raise
        details = getattr(err, "details", "")
        if details and os.environ.get("PATCHDD_VERBOSE"):
            print(details, file=sys.stderr)
        print(f"patchdd {args[0]}: error: {one_line(err)} (--traceback for the stack)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

"""How long ``patchdd COMMAND --help`` takes, as a user's shell runs it (a new process each time), on the CPU.

    python bench/help_latency.py             # every command: cold, then after make setup's build_help_cache

``cold`` is the first call with an empty help cache (what a first call took before ``make setup`` built the cache:
it builds the parser, importing torch, Lightning and the model classes); ``cached`` is a call once
``patchdd.cli.build_help_cache`` has run (what ``make setup`` does at the end of the install). Each figure is the
median of ``--repeats`` runs, each in a fresh empty cache for ``cold``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from patchdd.cli import COMMANDS, TRAINER_COMMANDS


def seconds(argv: list[str], cache_home: str) -> float:
    """Wall time of ``python ARGV`` in its own process with ``XDG_CACHE_HOME=cache_home``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=os.environ | {"XDG_CACHE_HOME": cache_home})
    return time.perf_counter() - start


def help_seconds(command: str, cache_home: str) -> float:
    """Wall time of one ``python -m patchdd COMMAND --help``."""
    return seconds(["-m", "patchdd", command, "--help"], cache_home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (the median is printed)")
    args = parser.parse_args()
    commands = [*TRAINER_COMMANDS, *COMMANDS]
    cold = {c: [] for c in commands}
    for _ in range(args.repeats):
        for command in commands:
            with tempfile.TemporaryDirectory() as empty:
                cold[command].append(help_seconds(command, empty))
    with tempfile.TemporaryDirectory() as cache_home:
        build = seconds(["-c", "from patchdd.cli import build_help_cache; build_help_cache()"], cache_home)
        cached = {c: statistics.median(help_seconds(c, cache_home) for _ in range(args.repeats)) for c in commands}
    print(f"`patchdd COMMAND --help`, a new process per call, {platform.machine()}, {os.cpu_count()} cores, "
          f"median of {args.repeats}; build_help_cache (make setup) took {build:.1f} s\n")
    print("| command | cold: empty cache (s) | cached: after build_help_cache (s) |")
    print("| --- | --- | --- |")
    for command in commands:
        print(f"| {command} | {statistics.median(cold[command]):.2f} | {cached[command]:.2f} |")


if __name__ == "__main__":
    main()

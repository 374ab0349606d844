"""Quiet consoles: what a child run prints (Lightning's summaries, library warnings, progress) goes to its log
file; the console gets one line per stage or cell. ``patchdd --verbose ...`` (``PATCHDD_VERBOSE=1``) shows all."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

VERBOSE_VARIABLE = "PATCHDD_VERBOSE"
# Loggers that install their own console handlers at import time.
CHATTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def verbose() -> bool:
    """Whether child runs print to the console (``--verbose``)."""
    return os.environ.get(VERBOSE_VARIABLE, "") == "1"


@contextlib.contextmanager
def output_to(log_file: str | Path) -> Iterator[None]:
    """Inside: ``print``, warnings, tqdm and logging of this process go to ``log_file`` (appended), not the
    console; nothing changes when :func:`verbose`."""
    if verbose():
        yield
        return
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        handler = logging.StreamHandler(stream)
        loggers = [logging.getLogger()] + [logging.getLogger(name) for name in CHATTY_LOGGERS]
        saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
        for logger in loggers:
            logger.handlers = [handler]
            logger.propagate = False
        try:
            yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers, logger.propagate = handlers, propagate


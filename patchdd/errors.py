"""The suite's errors: one base class, :class:`PatchDDError`, with one subclass per kind of failure.

The command line prints any of them as one line (``--traceback`` shows the stack). Each also derives from the
built-in exception it used to be (``ValueError`` for bad input, ``RuntimeError`` for missing weights), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

UNION_ERROR = "Does not validate against any of the Union subtypes"


class PatchDDError(Exception):
    """Base class of every error the suite raises on purpose."""


class DataError(PatchDDError, ValueError):
    """A data root, split, class list or image that cannot be used as given."""


class StoreError(PatchDDError, ValueError):
    """A score store that is missing, malformed or of another format version."""


class StoreMismatchError(StoreError):
    """A store written with other settings than the ones requested."""


class IncompleteStoreError(StoreError):
    """A store whose writing pass did not finish (cut, or changed since): using it needs ``allow_partial``."""


class NotEnoughPatchesError(PatchDDError, ValueError):
    """A class holds fewer candidate patches (or images) than the synthetic set needs."""


class OptionError(PatchDDError, ValueError):
    """A command line or config the parser refuses (an unknown option, a missing config, a bad value); the message is
    one line, the parser's own in ``details`` (printed with ``--verbose``)."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class PriorUnavailableError(PatchDDError, RuntimeError):
    """A diffusion prior (or one of its components) that can be neither built from a config nor loaded from a
    local folder or the hub."""


class WeightsUnavailableError(PatchDDError, RuntimeError):
    """Pretrained weights were asked for but cannot be obtained (no network, no local file)."""


class CheckpointMismatchError(PatchDDError, ValueError):
    """A checkpoint whose tensors do not fit the architecture (or classes) it is loaded into."""


def root_cause(message: str) -> str:
    """The error a jsonargparse union failure buries: for an optional class option (``data``, ``model``) it
    reports "Does not validate against any of the Union subtypes", the real error of the class (``data folder
    does not exist: ...``) in its ``Errors:`` list beside the ``NoneType`` alternative's. Other messages pass."""
    if UNION_ERROR not in message:
        return message
    errors = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    real = [e for e in errors if not e.startswith(("Expected a <class 'NoneType'>", "Problem with given class_path"))]
    return real[0] if real else message.splitlines()[0]


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def worker_cause(message: str) -> str:
    """The error a DataLoader worker raised, without the worker's traceback that PyTorch puts before it ("Caught
    DataError in DataLoader worker process 0. Original Traceback ...: patchdd.errors.DataError: unreadable ...").
    Other messages pass."""
    if WORKER_TRACEBACK not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    kind, separator, text = last.partition(": ")
    return text if separator and kind.replace(".", "").replace("_", "").isalnum() else last


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line: a union failure unwrapped to its cause, a DataLoader worker's error to its own
    message, a multi-line message joined by ``; ``."""
    lines = [line.strip() for line in worker_cause(root_cause(str(err))).splitlines() if line.strip()]
    return f"{type(err).__name__}: {'; '.join(lines)}" if lines else type(err).__name__

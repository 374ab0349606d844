"""Outputs that are never half-written and never shared: a folder is built beside its target and renamed into
place when complete; a lock file keeps a second run from writing into the same output at the same time; writes
can run on background threads (:class:`BackgroundWrites`)."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from patchdd.errors import PatchDDError

LOCK_FILE = ".patchdd.lock"


class OutputBusyError(PatchDDError, RuntimeError):
    """Another run holds the lock on this output."""


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside, an ``OSError`` that names no file (a full disk: ``[Errno 28] No space left on device``, as Arrow and
    safetensors raise it) is raised again naming ``path``, so that the console says where the write failed."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


@functools.cache
def current_umask() -> int:
    """The process's umask, read once (by setting it and putting it back: not while other threads create files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give ``path`` the permissions a new file gets from the umask (rw for everyone the umask allows), for files
    that a library creates private (safetensors writes 0600): a shared store stays readable by others."""
    os.chmod(path, 0o666 & ~current_umask())


@contextmanager
def exclusive_output(directory: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) while inside; a second holder fails at once
    with :class:`OutputBusyError` naming the process that holds it. The lock dies with its process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputBusyError(f"{directory} is being written by {holder}; wait for it or choose another "
                                  "output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield directory
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; renamed onto ``target`` when the block ends without error (a
    crash leaves ``target`` as it was), removed otherwise."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with writing(target):
            yield tmp
            honour_umask(tmp)
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to build into; on success it replaces ``target`` (an old
    ``target`` is removed only then), on failure it is removed and ``target`` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.with_name(f".{target.name}.building-{uuid.uuid4().hex[:8]}")
    building.mkdir()
    try:
        yield building
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    replace_directory(building, target)


def replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is first renamed aside, then deleted."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


class BackgroundWrites:
    """Writes on background threads, so that the caller (the accelerator, the next class) does not wait for
    encoding and the file system: store shards on one thread, PNGs on one per core. At most ``depth`` writes wait
    at a time (the next submit blocks), and an error in a write is raised at the next submit or at :meth:`drain`."""

    def __init__(self, depth: int = 4, workers: int = 1) -> None:
        self.depth, self.workers = depth, workers
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[Future] = deque()

    def submit(self, function, *args) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="background-writes")
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(function, *args))

    def drain(self) -> None:
        """Wait for every submitted write; raise the first error."""
        while self.pending:
            self.pending.popleft().result()

    def abort(self) -> None:
        """Drop the writes not started yet and wait for the running ones, raising nothing (the caller is failing
        already): afterwards no thread writes into a folder the caller is about to remove."""
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

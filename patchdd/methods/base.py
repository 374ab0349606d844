"""What every method that makes a synthetic set from a score store implements: :class:`PatchSelector`."""

from __future__ import annotations

import zlib
from typing import ClassVar, Protocol

import numpy as np

from patchdd.methods.composition import Layout
from patchdd.methods.selection import Picks


class PatchSelector(Protocol):
    """Chooses, per class, the patches (source image + box in original pixels) that make its synthetic images.

    ``name`` is the method's registry name; ``options`` what decided its picks (recorded in ``synthetic.json``).
    A method whose picks are whole images sets ``composes = False``: its images are never tiled. A method may
    also define ``prepare(rows_by_class)``, called once with every class's rows before the first ``pick``, to do
    its per-class work in parallel.
    """

    name: ClassVar[str]
    composes: ClassVar[bool] = True

    def capacity(self, rows: np.ndarray) -> int:
        """Most patches this selector can give for a class with these store rows."""

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        """``count`` patches of ``folder`` in composition order."""

    def options(self) -> dict:
        """The settings that decided the picks, JSON-friendly."""


def class_rng(seed: int, folder: str) -> np.random.Generator:
    """A generator per (seed, class): a class draws the same patches whatever other classes are chosen."""
    return np.random.default_rng([seed, zlib.crc32(folder.encode())])

"""The method registry: every way of making a synthetic set from a score store, by name.

A method is one class in one file of :mod:`patchdd.methods` that implements
:class:`~patchdd.methods.base.PatchSelector` and a ``from_options(index, images, options)`` constructor; it is
added here with one line in :data:`METHODS`. Everything downstream (``distill``, :class:`DistilledDataModule`,
the students, ``matrix``, the demo, the contact sheets) goes through :func:`make_selector` and the
synthetic-folder format, and never asks which method made a set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchdd.methods.base import PatchSelector
from patchdd.methods.composition import LayoutOptions, OriginalImages
from patchdd.methods.diffusion import DiffusionSelector
from patchdd.methods.random_patches import RandomSelector
from patchdd.methods.random_real import RandomRealSelector
from patchdd.methods.rded import RDEDOptions, RDEDSelector
from patchdd.methods.selection import ClusterOptions
from patchdd.methods.store_index import StoreIndex

METHODS: dict[str, type] = {
    "diffusion": DiffusionSelector,  # the paper: DIFT clusters ranked by diffusion relevance
    "random": RandomSelector,  # baseline: uniformly placed patches of the same size
    "rded": RDEDSelector,  # baseline: RDED's teacher-scored random crops
    "random_real": RandomRealSelector,  # baseline: whole real images at random (DD-Ranking's reference)
}


@dataclass
class SynthesisOptions:
    """How Stage II turns a score store into a synthetic set: the one options object shared by ``distill`` and
    ``DistilledDataModule``.

    Args:
        selector: the method of :data:`METHODS`: ``diffusion`` (the paper), ``random``, ``rded`` or
            ``random_real`` (baselines).
        layout: output image size and the tiled layout at low IPC (``compose_max_ipc``, ``grid``).
        clustering: k-means and cluster-ranking settings of the ``diffusion`` method.
        rded: settings and teacher of the ``rded`` method.
        seed: seed of the ``random`` and ``rded`` methods (per class, so a class draws the same patches in any
            subset).
        images_root: where the store's images are now, if they moved (replaces the data module's ``root``).
        cache_dir: where Stage II caches the clustering and the store's row index (default: inside the store,
            ``STORE/clusters`` and ``STORE/index``; set it for a read-only store).
        expect_settings: scoring settings the store must have been made with, e.g. ``{"patch_size": 224}``.
    """

    selector: str = "diffusion"
    layout: LayoutOptions = field(default_factory=LayoutOptions)
    clustering: ClusterOptions = field(default_factory=ClusterOptions)
    rded: RDEDOptions = field(default_factory=RDEDOptions)
    seed: int = 0
    images_root: str | None = None
    cache_dir: str | None = None
    expect_settings: dict | None = None

    def __post_init__(self) -> None:
        if self.selector not in METHODS:
            raise ValueError(f"unknown selector {self.selector!r}; choose from {', '.join(METHODS)}")


def make_selector(index: StoreIndex, images: OriginalImages, options: SynthesisOptions) -> PatchSelector:
    """The selector ``options.selector`` names, built from the options."""
    return METHODS[options.selector].from_options(index, images, options)

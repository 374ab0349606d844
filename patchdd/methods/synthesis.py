"""Stage II: one score store -> the synthetic training set of any IPC and any class subset.

:func:`synthesize_classes` asks a method (:mod:`patchdd.methods.registry`) for each class's patches, crops them
from the original images and tiles them (:mod:`patchdd.methods.composition`); :func:`build_synthetic` collects
the result in memory. ``distill`` (:mod:`patchdd.workflows.distill`) exports it; ``DistilledDataModule``
serves it to a student.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from patchdd.data.sources import ClassMapping
from patchdd.data.subsets import resolve_classes
from patchdd.errors import NotEnoughPatchesError
from patchdd.formats.score_store import ScoreStore
from patchdd.formats.synthetic_set import SyntheticSet
from patchdd.methods.base import PatchSelector
from patchdd.methods.composition import LayoutOptions, OriginalImages, layout_for, tile_images
from patchdd.methods.registry import SynthesisOptions, make_selector
from patchdd.methods.selection import Picks
from patchdd.methods.store_index import StoreIndex, check_settings


def subset_mapping(available: ClassMapping, classes: str | list[str] | None) -> ClassMapping:
    """The classes ``classes`` resolves to among ``available``, sorted as the real data modules sort them."""
    folders = resolve_classes(classes, list(available.folders))
    return ClassMapping(tuple(folders), tuple(available.names[available.index(f)] for f in folders))


def check_ipcs(ipcs: Sequence[int]) -> None:
    """Refuse an empty IPC list or an IPC below 1 (before anything is written)."""
    if not ipcs:
        raise ValueError("--ipc names no IPC")
    if any(n < 1 for n in ipcs):
        raise ValueError(f"every IPC must be at least 1, got --ipc {' '.join(map(str, ipcs))}")


def patch_count(ipc: int, layout_options: LayoutOptions) -> int:
    """Patches needed per class: ``grid**2 * IPC`` (4 * IPC when tiled 2x2, IPC otherwise)."""
    if ipc < 1:
        raise ValueError(f"IPC must be at least 1, got {ipc}")
    return ipc * layout_for(ipc, layout_options).patches_per_image


def check_capacity(index: StoreIndex, selector: PatchSelector, folders: tuple[str, ...], count: int, ipc: int) -> None:
    """Fail before any work when a class cannot give ``count`` patches (never a silently short class)."""
    short = {f: selector.capacity(index.rows_of(f)) for f in folders}
    short = {f: n for f, n in short.items() if n < count}
    if short:
        listed = ", ".join(f"{f} ({n})" for f, n in list(short.items())[:10])
        advice = ("Use a smaller IPC or score more images / keep more patches per image." if index.store.is_complete()
                  else "The store is incomplete (its scoring pass did not finish): rerun the scoring to complete it.")
        raise NotEnoughPatchesError(
            f"IPC {ipc} needs {count} patches per class with the {selector.name} selector, but {len(short)} "
            f"class(es) have fewer: {listed}. {advice}")


def synthesize_classes(index: StoreIndex, images: OriginalImages, classes: ClassMapping, ipc: int,
                       selector: PatchSelector, layout_options: LayoutOptions,
                       progress: bool = True) -> Iterator[tuple[int, torch.Tensor, Picks]]:
    """Per class of ``classes``: its label, its ``ipc`` images (uint8 (ipc, 3, S, S)) and their picks."""
    layout = layout_for(ipc, layout_options)
    count = patch_count(ipc, layout_options)
    check_capacity(index, selector, classes.folders, count, ipc)
    if hasattr(selector, "prepare"):  # per-class work that can run in parallel (the diffusion method's k-means)
        selector.prepare({folder: index.rows_of(folder) for folder in classes.folders})
    for label, folder in enumerate(tqdm(classes.folders, desc=f"IPC {ipc} ({selector.name})", disable=not progress)):
        picks = selector.pick(label, folder, index.rows_of(folder), count, layout)
        yield label, tile_images(images.crops(picks.image_ids, picks.boxes, layout.tile), layout.grid), picks


def build_synthetic(index: StoreIndex, images: OriginalImages, classes: ClassMapping, ipc: int,
                    selector: PatchSelector, layout_options: LayoutOptions,
                    progress: bool = True) -> tuple[SyntheticSet, Picks]:
    """The synthetic set of ``ipc`` images per class of ``classes`` (in memory) and the picks it was made from."""
    parts = list(synthesize_classes(index, images, classes, ipc, selector, layout_options, progress))
    labels = torch.arange(len(classes)).repeat_interleave(ipc)
    synthetic = SyntheticSet(torch.cat([p[1] for p in parts]), labels, classes, layout_for(ipc, layout_options).grid)
    return synthetic, Picks.concat([p[2] for p in parts])



class StageTwo(NamedTuple):
    """What building sets from one store needs: its rows, its original images, the classes asked, a method,
    the layout its images take, and whether the store is complete (``False``: used partial, as allowed)."""

    index: StoreIndex
    images: OriginalImages
    classes: ClassMapping
    selector: PatchSelector
    layout: LayoutOptions
    complete: bool


def method_layout(selector: PatchSelector, layout: LayoutOptions) -> LayoutOptions:
    """``layout``, except that a method of whole images (``composes = False``) is never tiled."""
    return layout if getattr(selector, "composes", True) else replace(layout, compose_max_ipc=0)


def open_store(store: str | Path, classes: str | list[str] | None, synthesis: SynthesisOptions,
               allow_partial: bool = False) -> StageTwo:
    """Open a score store for Stage II: refuse an incomplete one (unless ``allow_partial``), check its settings,
    resolve the classes, reopen its images (each checked against the store's record when opened), build the
    method ``synthesis.selector``."""
    score_store = ScoreStore.open(store)
    complete = score_store.require_complete(allow_partial)
    check_settings(score_store, synthesis.expect_settings)
    index = StoreIndex(score_store, synthesis.cache_dir)
    images = OriginalImages.from_data_spec(score_store.manifest.data, synthesis.images_root, index.image_record)
    selector = make_selector(index, images, synthesis)
    return StageTwo(index, images, subset_mapping(index.classes, classes), selector,
                    method_layout(selector, synthesis.layout), complete)


def synthetic_set(store: str | Path, ipc: int, classes: str | list[str] | None = "all",
                  synthesis: SynthesisOptions | None = None, progress: bool = True,
                  allow_partial: bool = False) -> tuple[SyntheticSet, Picks]:
    """The synthetic set of ``ipc`` images per class of ``classes`` from a score store, in memory, and the picks
    it was made from (one call for a notebook: ``patchdd.synthetic_set("runs/demo/scores", 10, "all")``); an
    incomplete store is refused unless ``allow_partial``."""
    synthesis = synthesis or SynthesisOptions()
    opened = open_store(store, classes, synthesis, allow_partial)
    return build_synthetic(opened.index, opened.images, opened.classes, ipc, opened.selector, opened.layout,
                           progress)

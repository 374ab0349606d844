"""``patchdd distill``: a score store -> exported synthetic sets (PNG ImageFolders), one per IPC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from patchdd.formats.outputs import atomic_directory, exclusive_output
from patchdd.formats.synthetic_folder import SyntheticFolderWriter
from patchdd.methods.composition import layout_for
from patchdd.methods.registry import SynthesisOptions
from patchdd.methods.synthesis import check_capacity, check_ipcs, open_store, patch_count, synthesize_classes


def distill(
    store: str,
    out: str,
    ipc: Sequence[int] = (1, 10, 50),
    classes: str | None = "all",
    synthesis: SynthesisOptions = SynthesisOptions(),
    method: str | None = None,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Distil a score store into synthetic ImageFolders (PNG), one per IPC, with manifests and contact sheets.

    Each ``ipc{N}`` folder is built beside its target and renamed into place when complete (an old one is removed
    only then), and ``out`` is locked while it is written: a second run into the same ``out`` fails at once.

    Args:
        store: score store directory (written by the scoring pass).
        out: output directory; gets ``ipc{N}/`` per IPC and ``contact_sheets/ipc{N}/``.
        ipc: images per class, one or several (``--ipc 1 10 50``); the clustering is computed once.
        classes: ``all``, a preset (imagenette, imagewoof, imagenet100) or comma-separated wnids / names.
        synthesis: the method (``--synthesis.selector``), layout, clustering, RDED's teacher, seed, moved images,
            cache and expected store settings (``SynthesisOptions``).
        method: the selection method (``diffusion``, ``rded``, ``random``, ``random_real``: ``patchdd methods``
            lists them); replaces ``synthesis.selector``.
        overwrite: replace existing ``ipc{N}`` folders.
        allow_partial: use a score store whose scoring pass did not finish (refused otherwise); the sets'
            ``synthetic.json`` records it.
        progress: show a progress bar over classes.
    """
    check_ipcs(ipc)
    if method is not None:
        synthesis = replace(synthesis, selector=method)
    targets = {n: Path(out) / f"ipc{n}" for n in ipc}
    with exclusive_output(out):
        existing = [str(p) for p in targets.values() if p.exists() and any(p.iterdir())]
        if existing and not overwrite:
            raise FileExistsError(f"output folders exist: {existing} (pass --overwrite true to replace them)")
        index, images, mapping, selector, layout, complete = open_store(store, classes, synthesis, allow_partial)
        for n in targets:  # every IPC checked before the first is written
            check_capacity(index, selector, mapping.folders, patch_count(n, layout), n)
        for n, target in targets.items():
            grid = layout_for(n, layout).grid
            sheets = Path(out) / "contact_sheets" / f"ipc{n}"
            with atomic_directory(target) as building, atomic_directory(sheets) as building_sheets, \
                    SyntheticFolderWriter(building, mapping, grid, building_sheets,
                                          title=f"IPC {n}, {selector.name}") as writer:
                for label, class_images, picks in synthesize_classes(index, images, mapping, n, selector, layout,
                                                                     progress):
                    writer.add(label, class_images, picks)
                writer.close({"ipc": n, "selector": selector.name, "store": str(Path(store).resolve()),
                              "store_hash": index.content_hash, "layout": asdict(layout),
                              "store_complete": complete, "options": selector.options()})
            print(f"wrote {target}: {writer.count} images ({len(mapping)} classes x {n}), "
                  f"{grid}x{grid} patches per {layout.output_size} px image")
    return list(targets.values())

"""Stage II: one score store -> the synthetic training set of any IPC and any class subset.

:func:`build_synthetic` chooses patches per class with a selector (``diffusion``: the paper's clustering and
ranking; ``random`` and ``rded``: baselines), crops them from the original images and tiles them
(:mod:`datamodules.composition`). :class:`DistilledDataModule` serves the result to a student with the real
validation split of the same classes attached; :func:`distill` exports it as PNG ImageFolders
(:mod:`datamodules.export`).
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.augment import AugmentOptions, per_sample_transform
from datamodules.baselines import RDEDOptions, TeacherScorer, patch_box_size, random_boxes, rded_pick
from datamodules.composition import Layout, LayoutOptions, OriginalImages, layout_for, tile_images
from datamodules.export import (INFO_FILE, SyntheticFolderWriter, read_image_folder, read_synthetic_folder,
                                synthetic_classes)
from datamodules.real import ClassMapping, DataError, RealDataModule, save_class_mapping
from datamodules.score_store import ScoreStore, StoreError, StoreMismatchError, settings_difference
from datamodules.selection import (ClusterCache, ClusterOptions, NotEnoughPatchesError, Picks, Selection,
                                   select_patches)
from datamodules.subsets import resolve_classes
from datamodules.synthetic import SyntheticSet

SelectorName = Literal["diffusion", "random", "rded"]
META_COLUMNS = ["image_id", "label", "width", "height", "patch", "box", "score"]
CACHE_DIR = "clusters"


class StoreIndex:
    """A store's rows without score maps: metadata as arrays, DIFT vectors read on first use."""

    def __init__(self, store: ScoreStore) -> None:
        self.store = store
        self.classes = ClassMapping.from_json(store.manifest.classes)
        table = store.read_arrow(META_COLUMNS)
        self.image_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self.sizes = np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], 1).astype(np.int64)
        self.patch_index = table.column("patch").to_numpy().astype(np.int64)
        self.boxes = np.asarray(table.column("box").to_pylist(), np.int64).reshape(len(self.labels), 4)
        self.scores = table.column("score").to_numpy().astype(np.float32)
        self.content_hash = store.content_hash()
        self._features = None

    def setting(self, name: str):
        if name not in self.store.manifest.settings:
            raise StoreError(f"score store {self.store.directory} has no setting {name!r}")
        return self.store.manifest.settings[name]

    def rows_of(self, folder: str) -> np.ndarray:
        return np.flatnonzero(self.labels == self.classes.index(folder))

    def row_ids(self, rows: np.ndarray) -> list[str]:
        return [f"{self.image_ids[r]}#{self.patch_index[r]}" for r in rows]

    def features(self, rows: np.ndarray) -> np.ndarray:
        """DIFT vectors (float32) of ``rows``; the feature column is read once, kept as float16."""
        if self._features is None:
            self._features = self.store.read_arrow(["feature"]).column("feature").combine_chunks()
        picked = self._features.take(rows)
        return picked.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)

    def images_of(self, rows: np.ndarray) -> np.ndarray:
        """One row per distinct image among ``rows`` (its first)."""
        _, first = np.unique(self.image_ids[rows], return_index=True)
        return rows[np.sort(first)]


def check_settings(store: ScoreStore, expected: dict | None) -> None:
    """Raise :class:`StoreMismatchError` when the store's settings differ from the ``expected`` ones given."""
    if not expected:
        return
    stored = {key: store.manifest.settings.get(key) for key in expected}
    diff = settings_difference(stored, expected)
    if diff:
        raise StoreMismatchError(f"score store {store.directory} was scored with other settings than asked:\n  "
                                 + "\n  ".join(diff))


def class_rng(seed: int, folder: str) -> np.random.Generator:
    """A generator per (seed, class): a class draws the same patches whatever other classes are chosen."""
    return np.random.default_rng([seed, zlib.crc32(folder.encode())])


class PatchSelector(Protocol):
    name: str

    def capacity(self, rows: np.ndarray) -> int:
        """Most patches this selector can give for a class with these store rows."""

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        """``count`` patches of ``folder`` in composition order."""


class DiffusionSelector:
    """The paper's selection: cached per-class k-means on DIFT vectors, median-score cluster ranking."""

    name = "diffusion"

    def __init__(self, index: StoreIndex, options: ClusterOptions, cache_dir: str | Path) -> None:
        self.index = index
        self.options = options
        self.cache = ClusterCache(cache_dir)

    def capacity(self, rows: np.ndarray) -> int:
        return len(rows)

    def selection(self, folder: str, rows: np.ndarray, count: int) -> Selection:
        key = ClusterCache.key(self.index.content_hash, folder, self.options)
        clustering = self.cache.get(key, self.index.row_ids(rows), lambda: self.index.features(rows), self.options)
        return select_patches(clustering, self.index.scores[rows], count, self.options.top_clusters)

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        chosen = self.selection(folder, rows, count)
        picked = rows[chosen.positions]
        return Picks.of(label, self.index.image_ids[picked], self.index.boxes[picked], self.index.scores[picked],
                        store_rows=picked, selection=chosen)


class RandomSelector:
    """Uniformly placed boxes of the store's patch size (in original pixels) on the class's stored images."""

    name = "random"

    def __init__(self, index: StoreIndex, seed: int) -> None:
        self.index = index
        self.seed = seed
        self.box_size = partial(patch_box_size, patch_size=int(index.setting("patch_size")),
                                image_size=int(index.setting("image_size")),
                                whole_image=bool(index.store.manifest.settings.get("whole_image", False)))

    def capacity(self, rows: np.ndarray) -> int:
        return np.iinfo(np.int64).max if len(rows) else 0

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        images = self.index.images_of(rows)
        chosen, boxes = random_boxes(self.index.sizes[images], count, self.box_size, class_rng(self.seed, folder))
        return Picks.of(label, self.index.image_ids[images[chosen]], boxes, np.full(count, np.nan))


class RDEDSelector:
    """RDED: teacher-scored random crops, one per image, the most confident images per class."""

    name = "rded"

    def __init__(self, index: StoreIndex, images: OriginalImages, options: RDEDOptions, seed: int,
                 output_size: int) -> None:
        self.index = index
        self.images = images
        self.options = options
        self.seed = seed
        self.scorer = TeacherScorer(options, index.classes, output_size)

    def capacity(self, rows: np.ndarray) -> int:
        return min(self.options.images_per_class, len(self.index.images_of(rows)))

    def pick(self, label: int, folder: str, rows: np.ndarray, count: int, layout: Layout) -> Picks:
        images = self.index.images_of(rows)
        ids = self.index.image_ids[images]

        def crop_and_score(positions: np.ndarray, boxes: np.ndarray) -> np.ndarray:
            return self.scorer.log_probs(self.images.crops(ids[positions], boxes, layout.tile), folder)

        chosen, boxes, scores = rded_pick(self.index.sizes[images], count, layout.grid, crop_and_score,
                                          self.options, class_rng(self.seed, folder))
        return Picks.of(label, ids[chosen], boxes, scores)


def selector_options(name: SelectorName, clustering: ClusterOptions, rded: RDEDOptions, seed: int) -> dict:
    """The settings that decided a selector's picks (recorded with an exported set)."""
    return {"diffusion": asdict(clustering), "random": {"seed": seed}, "rded": {**asdict(rded), "seed": seed}}[name]


def make_selector(name: SelectorName, index: StoreIndex, images: OriginalImages, *, clustering: ClusterOptions,
                  rded: RDEDOptions, seed: int, output_size: int, cache_dir: str | Path | None) -> PatchSelector:
    if name == "diffusion":
        return DiffusionSelector(index, clustering, cache_dir or index.store.directory / CACHE_DIR)
    if name == "random":
        return RandomSelector(index, seed)
    if name == "rded":
        return RDEDSelector(index, images, rded, seed, output_size)
    raise ValueError(f"unknown selector {name!r}; choose diffusion, random or rded")


def subset_mapping(available: ClassMapping, classes: str | list[str] | None) -> ClassMapping:
    """The classes ``classes`` resolves to among ``available``, sorted as the real data modules sort them."""
    folders = resolve_classes(classes, list(available.folders))
    return ClassMapping(tuple(folders), tuple(available.names[available.index(f)] for f in folders))


def patch_count(ipc: int, layout_options: LayoutOptions) -> int:
    """Patches needed per class: ``grid**2 * IPC`` (4 * IPC when tiled 2x2, IPC otherwise)."""
    return ipc * layout_for(ipc, layout_options).patches_per_image


def check_capacity(index: StoreIndex, selector: PatchSelector, folders: tuple[str, ...], count: int, ipc: int) -> None:
    """Fail before any work when a class cannot give ``count`` patches (never a silently short class)."""
    short = {f: selector.capacity(index.rows_of(f)) for f in folders}
    short = {f: n for f, n in short.items() if n < count}
    if short:
        listed = ", ".join(f"{f} ({n})" for f, n in list(short.items())[:10])
        raise NotEnoughPatchesError(
            f"IPC {ipc} needs {count} patches per class with the {selector.name} selector, but {len(short)} "
            f"class(es) have fewer: {listed}. Use a smaller IPC or score more images / keep more patches per image.")


def synthesize_classes(index: StoreIndex, images: OriginalImages, classes: ClassMapping, ipc: int,
                       selector: PatchSelector, layout_options: LayoutOptions,
                       progress: bool = True) -> Iterator[tuple[int, torch.Tensor, Picks]]:
    """Per class of ``classes``: its label, its ``ipc`` images (uint8 (ipc, 3, S, S)) and their picks."""
    layout = layout_for(ipc, layout_options)
    count = patch_count(ipc, layout_options)
    check_capacity(index, selector, classes.folders, count, ipc)
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


class DistilledDataModule(L.LightningDataModule):
    """The synthetic set of one IPC and class subset, from a score store or an exported folder.

    ``train_dataloader`` yields shuffled ``(uint8 images (B, 3, H, W), int64 labels)``; the student augments
    on the device. With ``augment_in_workers`` the loader workers apply ``augment`` per sample instead
    (:func:`datamodules.augment.per_sample_transform`) and yield normalised float images. ``val_dataloader``
    is ``real``'s, whose class subset is set to the synthetic classes (same sorted order, so labels agree).
    Give either ``store`` or ``synthetic_dir``: a folder exported by ``cli.py distill`` (read exactly), or a
    plain ImageFolder from another method, whose images are resized to ``folder_image_size`` and whose
    ``folder_grid`` (2 for RDED-style 2x2 compositions, 1 for single images) drives the patch shuffle.
    """

    def __init__(
        self,
        store: str | None = None,
        synthetic_dir: str | None = None,
        classes: str | list[str] | None = None,
        ipc: int = 10,
        selector: SelectorName = "diffusion",
        layout: LayoutOptions = LayoutOptions(),
        clustering: ClusterOptions = ClusterOptions(),
        rded: RDEDOptions = RDEDOptions(),
        seed: int = 0,
        images_root: str | None = None,
        cache_dir: str | None = None,
        expect_settings: dict | None = None,
        real: RealDataModule | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        augment_in_workers: bool = False,
        augment: AugmentOptions = AugmentOptions(),
        folder_grid: int = 1,
        folder_image_size: int = 224,
    ) -> None:
        super().__init__()
        if (store is None) == (synthetic_dir is None):
            raise ValueError("DistilledDataModule needs exactly one of store=DIR or synthetic_dir=DIR")
        self.store_dir, self.synthetic_dir = store, synthetic_dir
        self.ipc, self.selector = ipc, selector
        self.layout, self.clustering, self.rded = layout, clustering, rded
        self.seed, self.images_root, self.cache_dir = seed, images_root, cache_dir
        self.expect_settings = expect_settings
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment_in_workers, self.augment = augment_in_workers, augment
        self.folder_grid, self.folder_image_size = folder_grid, folder_image_size
        self.class_mapping = subset_mapping(self._available_classes(), classes)
        self.real = real
        if real is not None:
            _attach_real(real, self.class_mapping)
        self.synthetic_set: SyntheticSet | None = None
        self.picks: Picks | None = None

    def _available_classes(self) -> ClassMapping:
        if self.synthetic_dir is not None:
            return synthetic_classes(self.synthetic_dir)
        store = ScoreStore.open(self.store_dir)
        check_settings(store, self.expect_settings)
        return ClassMapping.from_json(store.manifest.classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_mapping)

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic_set is None:
            self.synthetic_set = self._build()
        save_class_mapping(self.trainer, self.class_mapping)

    def _build(self) -> SyntheticSet:
        if self.synthetic_dir is not None:
            folders = list(self.class_mapping.folders)
            if (Path(self.synthetic_dir) / INFO_FILE).is_file():
                return read_synthetic_folder(self.synthetic_dir, folders)
            return read_image_folder(self.synthetic_dir, self.folder_grid, self.folder_image_size, folders)
        store = ScoreStore.open(self.store_dir)
        index = StoreIndex(store)
        images = OriginalImages.from_data_spec(store.manifest.data, self.images_root)
        selector = make_selector(self.selector, index, images, clustering=self.clustering, rded=self.rded,
                                 seed=self.seed, output_size=self.layout.output_size, cache_dir=self.cache_dir)
        synthetic, self.picks = build_synthetic(index, images, self.class_mapping, self.ipc, selector, self.layout)
        return synthetic

    def train_dataloader(self) -> DataLoader:
        if self.synthetic_set is None:
            raise RuntimeError("call setup() before train_dataloader()")
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.augment_in_workers:
            dataset = AugmentedImages(self.synthetic_set, per_sample_transform(self.synthetic_set.grid, self.augment))
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, **workers)
        return DataLoader(SyntheticBatches(self.synthetic_set), batch_size=self.batch_size, shuffle=True,
                          collate_fn=already_batched, **workers)

    def val_dataloader(self):
        return self.real.val_dataloader() if self.real is not None else []

    def test_dataloader(self):
        return self.real.test_dataloader() if self.real is not None else []


class SyntheticBatches(Dataset):
    """uint8 images and labels for on-device augmentation, fetched a whole batch at once (one gather per batch
    instead of stacking images one by one); works with any sampler, Lightning's distributed one included."""

    def __init__(self, synthetic: SyntheticSet) -> None:
        self.images, self.labels = synthetic.images, synthetic.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def already_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`SyntheticBatches`, whose fetch already returns a batch."""
    return batch


class AugmentedImages(Dataset):
    """A synthetic set whose images pass through a per-sample transform (in the loader workers)."""

    def __init__(self, synthetic: SyntheticSet, transform) -> None:
        self.synthetic = synthetic
        self.transform = transform

    def __len__(self) -> int:
        return len(self.synthetic)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.synthetic.images[i]), self.synthetic.labels[i]


def _attach_real(real: RealDataModule, classes: ClassMapping) -> None:
    """Give the real module the synthetic class subset and check that its labels agree."""
    real.classes = list(classes.folders)
    if real.class_mapping.folders != classes.folders:
        raise DataError(f"the real data module's classes {real.class_mapping.folders[:5]}... do not match the "
                        f"synthetic classes {classes.folders[:5]}... (was its class mapping read before?)")


def distill(
    store: str,
    out: str,
    ipc: Sequence[int] = (1, 10, 50),
    classes: str | None = "all",
    selector: SelectorName = "diffusion",
    layout: LayoutOptions = LayoutOptions(),
    clustering: ClusterOptions = ClusterOptions(),
    rded: RDEDOptions = RDEDOptions(),
    seed: int = 0,
    images_root: str | None = None,
    cache_dir: str | None = None,
    expect_settings: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Distil a score store into synthetic ImageFolders (PNG), one per IPC, with manifests and contact sheets.

    Args:
        store: score store directory (written by the scoring pass).
        out: output directory; gets ``ipc{N}/`` per IPC and ``contact_sheets/ipc{N}/``.
        ipc: images per class, one or several (``--ipc 1 10 50``); the clustering is computed once.
        classes: ``all``, a preset (imagenette, imagewoof, imagenet100) or comma-separated wnids / names.
        selector: ``diffusion`` (the paper), ``random`` or ``rded`` (baselines).
        layout: output size and the tiled layout at low IPC.
        clustering: k-means and cluster-ranking settings of the diffusion selector.
        rded: settings and teacher of the RDED selector.
        seed: seed of the random and RDED selectors.
        images_root: where the store's images are now, if they moved (replaces the data module's ``root``).
        cache_dir: clustering cache (default ``STORE/clusters``).
        expect_settings: scoring settings the store must have been made with, e.g. ``{"patch_size": 224}``.
        overwrite: replace existing ``ipc{N}`` folders.
        progress: show a progress bar over classes.
    """
    index_store = ScoreStore.open(store)
    check_settings(index_store, expect_settings)
    index = StoreIndex(index_store)
    mapping = subset_mapping(index.classes, classes)
    targets = {n: Path(out) / f"ipc{n}" for n in ipc}
    existing = [str(p) for p in targets.values() if p.exists() and any(p.iterdir())]
    if existing and not overwrite:
        raise FileExistsError(f"output folders exist: {existing} (pass overwrite=true to replace them)")
    images = OriginalImages.from_data_spec(index_store.manifest.data, images_root)
    chooser = make_selector(selector, index, images, clustering=clustering, rded=rded, seed=seed,
                            output_size=layout.output_size, cache_dir=cache_dir)
    for n in targets:  # every IPC checked before the first is written
        check_capacity(index, chooser, mapping.folders, patch_count(n, layout), n)
    for n, target in targets.items():
        sheets = Path(out) / "contact_sheets" / f"ipc{n}"
        for stale in (target, sheets):
            shutil.rmtree(stale, ignore_errors=True)
        grid = layout_for(n, layout).grid
        writer = SyntheticFolderWriter(target, mapping, grid, sheets, title=f"IPC {n}, {selector}")
        for label, class_images, picks in synthesize_classes(index, images, mapping, n, chooser, layout, progress):
            writer.add(label, class_images, picks)
        writer.close({"ipc": n, "selector": selector, "store": str(Path(store).resolve()),
                      "store_hash": index.content_hash, "layout": asdict(layout),
                      "options": selector_options(selector, clustering, rded, seed)})
        print(f"wrote {target}: {writer.count} images ({len(mapping)} classes x {n}), "
              f"{grid}x{grid} patches per {layout.output_size} px image")
    return list(targets.values())

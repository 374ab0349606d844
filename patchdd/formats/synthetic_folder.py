"""Synthetic sets on disk: a PNG ImageFolder, ``synthetic.json`` to reload it exactly, a table tracing every
image to where it came from, and a contact sheet per class.

Layout of one exported set (``OUT/ipc{N}``)::

    <class folder>/img_000.png ...   the synthetic images (lossless), label order = sorted class folders
    synthetic.json                   format (v2), kind (patches | generated), classes, ipc, grid, image_size, and
                                     the method's description (selector, store hash, options; or method, prior,
                                     prior hash, options)
    tiles.parquet                    patch sets (distill): one row per tile (see tile_columns)
    provenance.parquet               generated sets (generate): one row per image (see plan.provenance_columns)

Version 1 (patch sets written before generated sets existed, no ``kind``) stays readable.

Contact sheets go to a separate folder (``OUT/contact_sheets/ipc{N}/<class>.png``) so that the set stays a
plain ImageFolder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from patchdd.data.sources import ClassMapping, list_class_folders, open_rgb, scan_class_folders
from patchdd.errors import DataError
from patchdd.formats.outputs import BackgroundWrites, writing
from patchdd.formats.synthetic_set import SyntheticSet
from patchdd.methods.selection import Picks

FORMAT_NAME = "patchdd-synthetic"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INFO_FILE = "synthetic.json"
TILES_FILE = "tiles.parquet"
PROVENANCE_FILE = "provenance.parquet"


def image_name(index: int, count: int) -> str:
    return f"img_{index:0{max(3, len(str(count - 1)))}d}.png"


def tile_columns(folder: str, images_in_class: int, grid: int, picks: Picks) -> dict[str, list]:
    """``tiles.parquet`` columns for the picks of one class (``grid**2`` consecutive picks per image)."""
    per_image = grid * grid
    if len(picks) != images_in_class * per_image:
        raise ValueError(f"{len(picks)} picks for {images_in_class} images of {per_image} tiles")
    image = np.repeat(np.arange(images_in_class), per_image)
    tile = np.tile(np.arange(per_image), images_in_class)
    return {
        "file": [f"{folder}/{image_name(i, images_in_class)}" for i in image],
        "class": [folder] * len(picks),
        "label": picks.labels.tolist(),
        "image": image.tolist(),
        "tile": tile.tolist(),
        "tile_row": (tile // grid).tolist(),
        "tile_col": (tile % grid).tolist(),
        "source_image": [str(i) for i in picks.image_ids],
        "box": picks.boxes.tolist(),
        "score": picks.scores.tolist(),
        "cluster": picks.clusters.tolist(),
        "cluster_rank": picks.cluster_ranks.tolist(),
        "member_rank": picks.member_ranks.tolist(),
        "filled": picks.filled.tolist(),
        "store_row": picks.store_rows.tolist(),
    }


class SyntheticFolderWriter:
    """Write an exported set class by class (memory bounded by one class), then its two description files.

    As a context manager, a failure inside stops its background writes (the queued ones dropped, the running ones
    waited for) before the error leaves, so that nothing is written into a building folder being removed."""

    def __init__(self, directory: str | Path, classes: ClassMapping, grid: int,
                 contact_sheet_dir: str | Path | None = None, title: str = "") -> None:
        self.directory = Path(directory)
        self.classes, self.grid = classes, grid
        self.contact_sheet_dir, self.title = contact_sheet_dir, title
        self.columns: dict[str, list] = {}
        self.image_size = 0
        self.count = 0
        self.writes = BackgroundWrites(depth=4 * (os.cpu_count() or 1), workers=os.cpu_count() or 1)

    def add(self, label: int, images: torch.Tensor, picks: Picks) -> None:
        """The images (uint8 (N, 3, H, W)) of class ``label`` and the picks they were made from; the PNGs and the
        contact sheet are encoded on background threads (one per core)."""
        folder = self.classes.folders[label]
        (self.directory / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            self.writes.submit(save_png, image, self.directory / folder / image_name(i, len(images)))
        for name, values in tile_columns(folder, len(images), self.grid, picks).items():
            self.columns.setdefault(name, []).extend(values)
        self.image_size, self.count = int(images.shape[-1]), self.count + len(images)
        if self.contact_sheet_dir is not None:
            Path(self.contact_sheet_dir).mkdir(parents=True, exist_ok=True)
            self.writes.submit(save_contact_sheet, images, f"{self.classes.names[label]} ({folder}) - {self.title}",
                               Path(self.contact_sheet_dir) / f"{folder}.png")

    def __enter__(self) -> "SyntheticFolderWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.writes.abort()

    def close(self, info: dict) -> Path:
        """Wait for the images, then write ``tiles.parquet`` and ``synthetic.json`` (``info`` + format, classes,
        grid, image size, count)."""
        self.writes.drain()
        table = pa.table(self.columns)
        table = table.set_column(table.schema.get_field_index("box"), "box",
                                 table.column("box").cast(pa.list_(pa.int64(), 4)))
        pq.write_table(table, self.directory / TILES_FILE)
        write_set_info(self.directory, self.classes, "patches", self.grid, self.image_size, self.count, info)
        return self.directory


def save_png(image: torch.Tensor, path: Path) -> None:
    """A uint8 (3, H, W) image as a PNG."""
    with writing(path):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def save_contact_sheet(images: torch.Tensor, title: str, path: Path) -> None:
    contact_sheet(images, title).save(path)


def write_set_info(directory: Path, classes: ClassMapping, kind: str, grid: int, image_size: int, count: int,
                   info: dict) -> None:
    """``synthetic.json``: format, kind, classes, grid, image size, image count, and ``info``."""
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "classes": classes.to_json(),
            "grid": grid, "image_size": image_size, "images": count, **info}
    (directory / INFO_FILE).write_text(json.dumps(meta, indent=1))


def finish_generated_set(directory: str | Path, classes: ClassMapping, provenance: dict[str, list], info: dict,
                         contact_sheet_dir: str | Path | None = None, title: str = "") -> Path:
    """Describe a generated set whose PNGs are all written: ``provenance.parquet``, ``synthetic.json`` (kind
    ``generated``, grid 1) and a contact sheet per class."""
    directory = Path(directory)
    pq.write_table(pa.table(provenance), directory / PROVENANCE_FILE)
    image_size, count = 0, 0
    for folder, name in zip(classes.folders, classes.names):
        images = torch.stack([image_tensor(f) for f in sorted((directory / folder).glob("img_*.png"))])
        image_size, count = int(images.shape[-1]), count + len(images)
        if contact_sheet_dir is not None:
            Path(contact_sheet_dir).mkdir(parents=True, exist_ok=True)
            save_contact_sheet(images, f"{name} ({folder}) - {title}", Path(contact_sheet_dir) / f"{folder}.png")
    write_set_info(directory, classes, "generated", 1, image_size, count, info)
    return directory


def image_tensor(path: Path) -> torch.Tensor:
    """An image file as uint8 (3, H, W)."""
    return torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1)


def read_synthetic_info(directory: str | Path) -> dict:
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise DataError(f"no exported synthetic set at {directory} (missing {INFO_FILE})")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT_NAME or info.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{path} is not a {FORMAT_NAME} description of version {READABLE_VERSIONS}")
    return info


def read_synthetic_folder(directory: str | Path, folders: list[str] | None = None) -> SyntheticSet:
    """Reload an exported set exactly (optionally a subset of its classes, relabelled in the given order)."""
    directory = Path(directory)
    info = read_synthetic_info(directory)
    classes = ClassMapping.from_json(info["classes"])
    folders = list(classes.folders) if folders is None else folders
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted((directory / folder).glob("img_*.png"))
        if len(files) != info["ipc"]:
            raise DataError(f"{directory / folder} holds {len(files)} images, synthetic.json says {info['ipc']}")
        images += [image_tensor(file) for file in files]
        labels += [label] * len(files)
    subset = ClassMapping(tuple(folders), tuple(classes.names[classes.index(f)] for f in folders))
    return SyntheticSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), subset, info["grid"])


def read_image_folder(directory: str | Path, grid: int, image_size: int,
                      folders: list[str] | None = None) -> SyntheticSet:
    """A synthetic set from another method (RDED, SRe2L, D4M, ...): a plain ImageFolder ``<class>/*.png|jpg``.

    Every image is resized to ``image_size`` x ``image_size``; ``grid`` (tiles per side: 2 for RDED-style 2x2
    compositions, 1 for single images) drives the student's patch shuffle.
    """
    directory = Path(directory)
    folders = list_class_folders(directory) if folders is None else folders
    source = scan_class_folders(directory, folders)
    images = [torch.from_numpy(np.array(source.load(i).resize((image_size, image_size), Image.Resampling.BICUBIC)))
              .permute(2, 0, 1) for i in range(len(source))]
    return SyntheticSet(torch.stack(images), torch.tensor(source.labels, dtype=torch.int64),
                        ClassMapping.for_folders(folders), grid)


def synthetic_classes(directory: str | Path) -> ClassMapping:
    """The classes of a synthetic folder: from ``synthetic.json``, or the class folders of a plain ImageFolder."""
    if (Path(directory) / INFO_FILE).is_file():
        return ClassMapping.from_json(read_synthetic_info(directory)["classes"])
    return ClassMapping.for_folders(list_class_folders(Path(directory)))


def contact_sheet(images: torch.Tensor, title: str, columns: int = 10, cell: int = 112, margin: int = 4,
                  header: int = 18) -> Image.Image:
    """One class's images (uint8 (N, 3, H, W)) as a grid under a title line (the paper's Fig. 11 style)."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (cell + margin) + margin, header + rows * (cell + margin) + margin), "white")
    ImageDraw.Draw(sheet).text((margin, 3), title, fill="black")
    for i, image in enumerate(images):
        thumb = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.BICUBIC)
        row, column = divmod(i, columns)
        sheet.paste(thumb, (margin + column * (cell + margin), header + margin + row * (cell + margin)))
    return sheet

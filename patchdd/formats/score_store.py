"""The score store: what Stage I writes once per dataset and Stage II reads for every IPC and class subset.

Layout of a store directory::

    manifest.json            format name + version, the scoring settings, data description, class mapping
    shards/rank{R}-{S}.parquet   one row per (image, kept patch), written atomically, S counts up per rank
    index/rows-{hash}.parquet    Stage II's cached row index (metadata + where each row lives), per content hash

Row columns (Parquet, readable with ``pyarrow.parquet.read_table`` alone):

    image_id   string   id of the image in its split (path relative to the split folder, or "cifar10/train/7")
    label      int32    class index in the manifest's class mapping
    width, height int32 original image size in pixels
    file_bytes int64   size of the original image file in bytes (-1: not a file, e.g. a CIFAR array); ``distill``
                       checks it and the pixel size of every image it opens, so a replaced image is never cut
    patch      int16    rank of the patch inside its image (0 = best)
    box        int32[4] x0, y0, x1, y1 of the patch in ORIGINAL image pixels (x1, y1 exclusive)
    score      float32  pooled score of the patch; score = -R(p|c): HIGHER = more class-relevant
    map_height, map_width int32, score_map list<float16>: the full per-location score map (-R) at latent
               resolution, row-major, so that another patch size needs no rescoring
    feature    list<float16>  DIFT vector of the patch (L2-normalised)

A store is versioned (``FORMAT_VERSION``); opening one written with other settings than requested is an
error (:class:`StoreMismatchError`), never a silent mix.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from patchdd.errors import StoreError
from patchdd.formats.outputs import writing
from patchdd.formats.stores import MANIFEST_FILE, Manifest, ManifestStore  # noqa: F401 (Manifest, MANIFEST_FILE re-exported)

FORMAT_NAME = "patchdd-score-store"
FORMAT_VERSION = 2  # 2: file_bytes per row, a completion record
INDEX_DIR = "index"  # the cached row index of Stage II (rows-<content hash>.parquet)

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("label", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("file_bytes", pa.int64()),
    ("patch", pa.int16()),
    ("box", pa.list_(pa.int32(), 4)),
    ("score", pa.float32()),
    ("map_height", pa.int32()),
    ("map_width", pa.int32()),
    ("score_map", pa.list_(pa.float16())),
    ("feature", pa.list_(pa.float16())),
])




@dataclass
class PatchTable:
    """Rows of a store as arrays: one row per (image, kept patch)."""

    image_ids: np.ndarray  # (N,) object (str)
    labels: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N, 2) int64: width, height
    patch_index: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) int64: x0, y0, x1, y1 in original pixels
    scores: np.ndarray  # (N,) float32, higher = more class-relevant
    features: np.ndarray  # (N, D) float32
    score_maps: list[np.ndarray] = field(default_factory=list)  # N maps (h, w) float32, empty if not loaded
    file_bytes: np.ndarray | None = None  # (N,) int64: the original file's size (-1 or None: not recorded)

    def __post_init__(self) -> None:
        if self.file_bytes is None:
            self.file_bytes = np.full(len(self.image_ids), -1, np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, rows: np.ndarray) -> "PatchTable":
        """The rows at the given positions (or boolean mask), in that order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        maps = [self.score_maps[i] for i in rows] if self.score_maps else []
        return PatchTable(
            self.image_ids[rows], self.labels[rows], self.sizes[rows], self.patch_index[rows],
            self.boxes[rows], self.scores[rows], self.features[rows], maps, self.file_bytes[rows],
        )

    def to_arrow(self) -> pa.Table:
        """The rows as an Arrow table, built column-wise from flat arrays (no per-row Python objects)."""
        if self.score_maps and len(self.score_maps) != len(self):
            raise ValueError("score_maps must hold one map per row")
        maps = self.score_maps or [np.zeros((0, 0), np.float32)] * len(self)
        shapes = np.asarray([m.shape for m in maps], np.int32).reshape(-1, 2)
        map_values = np.concatenate([m.ravel() for m in maps]) if maps else np.zeros(0, np.float32)
        features = np.asarray(self.features, np.float16).reshape(len(self), -1)
        return pa.table({
            "image_id": pa.array([str(i) for i in self.image_ids], pa.string()),
            "label": pa.array(self.labels, pa.int32()),
            "width": pa.array(self.sizes[:, 0], pa.int32()),
            "height": pa.array(self.sizes[:, 1], pa.int32()),
            "file_bytes": pa.array(np.asarray(self.file_bytes, np.int64), pa.int64()),
            "patch": pa.array(self.patch_index, pa.int16()),
            "box": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(self.boxes, np.int32).ravel()), 4),
            "score": pa.array(self.scores, pa.float32()),
            "map_height": pa.array(shapes[:, 0], pa.int32()),
            "map_width": pa.array(shapes[:, 1], pa.int32()),
            "score_map": list_array(map_values.astype(np.float16), shapes.prod(axis=1)),
            "feature": list_array(features.ravel(), np.full(len(self), features.shape[1])),
        }, schema=SCHEMA)

    @classmethod
    def from_arrow(cls, table: pa.Table, with_maps: bool = False) -> "PatchTable":
        n = table.num_rows
        features = _list_column(table, "feature", n)
        maps: list[np.ndarray] = []
        if with_maps:
            flat = _list_column(table, "score_map", n)
            heights = table.column("map_height").to_numpy()
            widths = table.column("map_width").to_numpy()
            maps = [np.asarray(m, np.float32).reshape(h, w) for m, h, w in zip(flat, heights, widths)]
        return cls(
            image_ids=np.asarray(table.column("image_id").to_pylist(), dtype=object),
            labels=table.column("label").to_numpy().astype(np.int64),
            sizes=np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], 1).astype(np.int64),
            patch_index=table.column("patch").to_numpy().astype(np.int64),
            boxes=np.asarray(table.column("box").to_pylist(), dtype=np.int64).reshape(n, 4),
            scores=table.column("score").to_numpy().astype(np.float32),
            features=features,
            score_maps=maps,
            file_bytes=table.column("file_bytes").to_numpy().astype(np.int64),
        )

    @classmethod
    def concat(cls, tables: list["PatchTable"]) -> "PatchTable":
        names = [f.name for f in fields(cls) if f.name != "score_maps"]
        joined = {name: np.concatenate([getattr(t, name) for t in tables]) for name in names}
        return cls(**joined, score_maps=[m for t in tables for m in t.score_maps])


def list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """An Arrow list column from its flat values and the length of each row."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _list_column(table: pa.Table, name: str, n: int) -> np.ndarray | list[np.ndarray]:
    """A list column as a 2-D float32 array when its rows have equal length, else a list of arrays."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32)
    lengths = np.diff(offsets)
    if n and np.all(lengths == lengths[0]):
        return values[offsets[0]:offsets[-1]].reshape(n, int(lengths[0]))
    if n == 0:
        return np.zeros((0, 0), np.float32)
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


class ScoreStore(ManifestStore):
    """A score store directory: create or check its manifest, append shards, read rows back."""

    FORMAT_NAME, FORMAT_VERSION, KIND = FORMAT_NAME, FORMAT_VERSION, "score store"

    def append(self, rows: PatchTable, rank: int = 0) -> Path:
        """Write ``rows`` as a new shard of ``rank``, atomically (a crash leaves no partial shard)."""
        path = self.new_shard_path(rank)
        tmp = path.with_suffix(".tmp")
        with writing(path):
            pq.write_table(rows.to_arrow(), tmp, use_dictionary=False)  # ids and floats: dictionaries only cost time
            os.replace(tmp, path)
        return path

    def read_arrow(self, columns: list[str] | None = None) -> pa.Table:
        """All rows, one per (image_id, patch) even if a shard was written twice, sorted by label, image, patch."""
        paths = self.shard_paths()
        if not paths:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        needed = None if columns is None else sorted(set(columns) | set(KEY_COLUMNS))
        table = unique_sorted_rows(read_shards(paths, needed))
        return table.drop_columns(["shard", "shard_row"]).select(columns or SCHEMA.names)

    def row_index(self, content_hash: str | None = None, cache_dir: str | Path | None = None) -> pa.Table:
        """The metadata of every row (``INDEX_COLUMNS``) with the shard and the row in it that holds the rest,
        sorted like :meth:`read_arrow`. Built once per store content and cached in ``index/`` of the store, or of
        ``cache_dir`` (a read-only store), so that Stage II reads the store's 20,000 shards once, not on every
        distillation; ``content_hash``: the store's, when the caller has it already (it takes a stat of every
        shard)."""
        paths = self.shard_paths()
        cached = Path(cache_dir or self.directory) / INDEX_DIR / f"rows-{content_hash or self.content_hash()}.parquet"
        if cached.is_file():
            return pq.read_table(cached)
        if not paths:
            return with_position(SCHEMA.empty_table().select(INDEX_COLUMNS), 0)
        table = unique_sorted_rows(read_shards(paths, INDEX_COLUMNS))
        tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, tmp)
        except OSError as err:
            raise StoreError(f"cannot write the score store's row index into {cached.parent} ({err.strerror or err}); "
                             "pass --synthesis.cache_dir DIR, a writable folder for the index and the clusters") from err
        os.replace(tmp, cached)
        for stale in cached.parent.glob("rows-*.parquet"):
            if stale != cached:
                stale.unlink(missing_ok=True)
        return table

    def read_rows(self, shards: np.ndarray, shard_rows: np.ndarray, column: str) -> pa.Array:
        """``column`` of the rows at (``shards[i]``, ``shard_rows[i]``), in that order; only those shards are read."""
        paths = self.shard_paths()
        order = np.argsort(shards, kind="stable")  # the rows grouped by shard
        wanted, starts = np.unique(shards[order], return_index=True)
        tables = read_shards([paths[i] for i in wanted], [column], add_position=False)
        ends = [*starts[1:], len(order)]
        pieces = [table.column(column).take(pa.array(shard_rows[order[start:end]])).combine_chunks()
                  for table, start, end in zip(tables, starts, ends)]
        values = pa.concat_arrays(pieces) if pieces else pa.array([], SCHEMA.field(column).type)
        return values.take(pa.array(np.argsort(order)))  # back to the order asked

    def read(self, with_maps: bool = False) -> PatchTable:
        """All rows as arrays; the score maps (the bulk of a store) only when asked for."""
        map_columns = ("map_height", "map_width", "score_map")
        columns = [c for c in SCHEMA.names if with_maps or c not in map_columns]
        return PatchTable.from_arrow(self.read_arrow(columns), with_maps=with_maps)

    def done_ids(self) -> set[str]:
        """Ids of the images that already have rows (used to resume an interrupted pass)."""
        return set(self.read_arrow(["image_id"]).column("image_id").to_pylist())

    def stored_counts(self) -> dict[str, int]:
        """Images scored per class folder."""
        table = self.read_arrow(["image_id", "label"])
        _, first = np.unique(table.column("image_id").to_numpy(zero_copy_only=False), return_index=True)
        labels = table.column("label").to_numpy()[first]
        folders = self.manifest.classes["folders"]
        return {folders[label]: int(count) for label, count in zip(*np.unique(labels, return_counts=True))}


KEY_COLUMNS = ("image_id", "patch", "label")
INDEX_COLUMNS = ["image_id", "label", "width", "height", "file_bytes", "patch", "box", "score"]
READ_THREADS = 8


def read_shards(paths: list[Path], columns: list[str] | None, add_position: bool = True) -> list[pa.Table]:
    """The shards' ``columns``, read on ``READ_THREADS`` threads (many small files: the reads wait on the disk);
    with ``add_position`` each table gains ``shard`` (its position in ``paths``) and ``shard_row``."""

    def read(position: int) -> pa.Table:
        table = pq.read_table(paths[position], columns=columns)
        return with_position(table, position) if add_position else table

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, range(len(paths))))


def with_position(table: pa.Table, shard: int) -> pa.Table:
    """``table`` (the rows of shard number ``shard``) with its ``shard`` and ``shard_row`` columns."""
    return table.append_column("shard", pa.array(np.full(table.num_rows, shard, np.int32))).append_column(
        "shard_row", pa.array(np.arange(table.num_rows, dtype=np.int32)))


def unique_sorted_rows(tables: list[pa.Table]) -> pa.Table:
    """The rows (with their shard positions) sorted by label, image, patch, one per (image, patch): a row written
    twice (a shard rewritten after a crash) is kept from its first shard."""
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    table = table.sort_by([("label", "ascending"), ("image_id", "ascending"), ("patch", "ascending"),
                           ("shard", "ascending"), ("shard_row", "ascending")])
    if table.num_rows < 2:
        return table
    ids, patches = table.column("image_id"), table.column("patch")
    repeated = pc.and_(pc.equal(ids.slice(1), ids.slice(0, table.num_rows - 1)),
                       pc.equal(patches.slice(1), patches.slice(0, table.num_rows - 1)))
    keep = np.concatenate([[True], ~repeated.to_numpy(zero_copy_only=False)])
    return table if keep.all() else table.filter(pa.array(keep))

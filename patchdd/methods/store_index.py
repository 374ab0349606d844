"""A score store's rows as arrays, for Stage II: metadata in memory, DIFT vectors read per class when needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchdd.data.sources import ClassMapping
from patchdd.errors import StoreError, StoreMismatchError
from patchdd.formats.score_store import ScoreStore
from patchdd.formats.stores import settings_difference
from patchdd.methods.composition import ImageRecord


class StoreIndex:
    """A store's rows without score maps: metadata as arrays (from the store's cached row index), DIFT vectors read
    per class from the shards that hold them."""

    def __init__(self, store: ScoreStore, cache_dir: str | Path | None = None) -> None:
        self.store = store
        self.classes = ClassMapping.from_json(store.manifest.classes)
        self.content_hash = store.content_hash()
        table = store.row_index(self.content_hash, cache_dir)
        self.image_ids = table.column("image_id").to_numpy(zero_copy_only=False).astype(object)
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self.sizes = np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], 1).astype(np.int64)
        self.file_bytes = table.column("file_bytes").to_numpy().astype(np.int64)
        self.patch_index = table.column("patch").to_numpy().astype(np.int64)
        self.boxes = table.column("box").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(-1, 4)
        self.scores = table.column("score").to_numpy().astype(np.float32)
        self.shards = table.column("shard").to_numpy()
        self.shard_rows = table.column("shard_row").to_numpy()
        self._first_row: dict[str, int] | None = None

    def setting(self, name: str):
        if name not in self.store.manifest.settings:
            raise StoreError(f"score store {self.store.directory} has no setting {name!r}")
        return self.store.manifest.settings[name]

    def image_record(self, image_id: str) -> ImageRecord:
        """What the store recorded of the original image ``image_id`` (file size, pixel size)."""
        if self._first_row is None:  # built on first use: only distillations that open images need it
            self._first_row = {image_id: row for row, image_id in reversed(list(enumerate(self.image_ids)))}
        row = self._first_row[image_id]
        return ImageRecord(int(self.file_bytes[row]), int(self.sizes[row, 0]), int(self.sizes[row, 1]))

    def rows_of(self, folder: str) -> np.ndarray:
        """The rows of a class (rows are sorted by label: one contiguous range)."""
        label = self.classes.index(folder)
        start, stop = np.searchsorted(self.labels, [label, label + 1])
        return np.arange(start, stop)

    def row_ids(self, rows: np.ndarray) -> list[str]:
        return [f"{self.image_ids[r]}#{self.patch_index[r]}" for r in rows]

    def features(self, rows: np.ndarray) -> np.ndarray:
        """DIFT vectors (float32) of ``rows``, read from the shards that hold them (a class's rows: a few dozen
        shards, never the whole store)."""
        picked = self.store.read_rows(self.shards[rows], self.shard_rows[rows], "feature")
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

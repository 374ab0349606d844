"""Stage II's reading at scale: the cached row index, per-class feature reads, lazy originals, O(1) shard names."""

from __future__ import annotations

import numpy as np
import pytest

import patchdd.formats.score_store as score_store
from patchdd.data.sources import ClassMapping
from patchdd.errors import DataError
from patchdd.formats.score_store import PatchTable, ScoreStore
from patchdd.formats.stores import Manifest
from patchdd.methods.composition import OriginalImages
from patchdd.methods.store_index import StoreIndex
from conftest import write_image_folder

FOLDERS = ["cls_a", "cls_b", "cls_c"]


def shard(labels: list[int], start: int, features: np.ndarray, patch: int = 0) -> PatchTable:
    n = len(labels)
    return PatchTable(image_ids=np.array([f"{FOLDERS[c]}/img_{start + i}.png" for i, c in enumerate(labels)],
                                         dtype=object),
                      labels=np.array(labels), sizes=np.tile([40, 32], (n, 1)), patch_index=np.full(n, patch),
                      boxes=np.tile([0, 0, 16, 16], (n, 1)), scores=np.arange(n, dtype=np.float32) + start,
                      features=features)


@pytest.fixture
def store(tmp_path) -> ScoreStore:
    """Nine shards of two rows: class c's rows live in shards 3c .. 3c + 2 (as a class-ordered scoring pass writes)."""
    manifest = Manifest({"patch_size": 16}, ClassMapping.for_folders(FOLDERS).to_json(), {})
    store = ScoreStore.create_or_check(tmp_path / "store", manifest)
    rng = np.random.default_rng(0)
    for c in range(3):
        for s in range(3):
            store.append(shard([c, c], 2 * s, rng.standard_normal((2, 8)).astype(np.float32)))
    store.append(shard([1], 0, np.full((1, 8), 9.0, np.float32)))  # a row written twice (a rewritten shard)
    return store


def test_row_index_is_built_once_and_reads_only_the_classes_shards(store, monkeypatch):
    whole = store.read()  # the reference: every shard read, duplicates dropped, sorted
    index = StoreIndex(store)
    assert len(index.labels) == 18 and list(index.image_ids) == list(whole.image_ids)
    assert len(list((store.directory / score_store.INDEX_DIR).glob("rows-*.parquet"))) == 1
    read = []
    original = score_store.read_shards

    def counting(paths, columns, add_position=True):
        read.extend(paths)
        return original(paths, columns, add_position)

    monkeypatch.setattr(score_store, "read_shards", counting)
    again = StoreIndex(store)  # from the cached index: no shard opened
    assert read == [] and np.array_equal(again.scores, index.scores)
    rows = again.rows_of("cls_b")
    features = again.features(rows)
    assert {p.name for p in read} == {p.name for p in store.shard_paths()[3:6]} and len(read) == 3
    np.testing.assert_allclose(features, whole.features[rows], atol=1e-3)  # float16 in the store
    assert not np.any(features == 9.0)  # the later copy of a row written twice is not the one read


def test_a_new_shard_invalidates_the_row_index(store):
    assert len(StoreIndex(store).labels) == 18
    store.append(shard([2], 100, np.zeros((1, 8), np.float32)))
    assert len(StoreIndex(store).labels) == 19
    assert len(list((store.directory / score_store.INDEX_DIR).glob("rows-*.parquet"))) == 1  # the old one removed


def test_shard_names_count_up_without_listing_the_folder_each_time(tmp_path, monkeypatch):
    manifest = Manifest({}, ClassMapping.for_folders(FOLDERS).to_json(), {})
    store = ScoreStore.create_or_check(tmp_path / "s", manifest)
    listings = []
    original = type(tmp_path).glob

    def counting(self, pattern):
        listings.append(pattern)
        return original(self, pattern)

    monkeypatch.setattr(type(tmp_path), "glob", counting)
    names = [store.new_shard_path(0).name[:12] for _ in range(5)]
    assert names == [f"rank0-{i:06d}" for i in range(5)] and len(listings) == 1
    assert ScoreStore.open(tmp_path / "s").new_shard_path(1).name.startswith("rank1-000000")


def test_originals_open_straight_from_their_folder(tmp_path):
    root = write_image_folder(tmp_path / "data" / "train", FOLDERS, 2, (40, 32)).parent
    spec = {"class_path": "patchdd.datamodules.real.ImageFolderDataModule", "init_args": {"root": str(root)},
            "split": "train"}
    images = OriginalImages.from_data_spec(spec)
    assert images.folder == root / "train" and images.position == {}  # nothing listed
    assert images.load("cls_b/img_1.png").size == (40, 32)
    with pytest.raises(DataError, match="not in the data source"):
        images.load("cls_b/img_7.png")
    with pytest.raises(DataError, match="does not exist"):
        OriginalImages.from_data_spec(spec, root=str(tmp_path / "moved"))


def test_parallel_clustering_equals_one_class_at_a_time(tmp_path):
    from patchdd.methods.diffusion import DiffusionSelector
    from patchdd.methods.selection import ClusterOptions, cluster_features

    manifest = Manifest({"patch_size": 16}, ClassMapping.for_folders(FOLDERS).to_json(), {})
    store = ScoreStore.create_or_check(tmp_path / "store", manifest)
    rng = np.random.default_rng(1)
    for c in range(3):
        store.append(shard([c] * 40, 0, rng.standard_normal((40, 8)).astype(np.float32)))
    index = StoreIndex(store)
    options = ClusterOptions(num_clusters=4)
    selector = DiffusionSelector(index, options, tmp_path / "cache")
    selector.prepare({folder: index.rows_of(folder) for folder in FOLDERS})
    assert selector.cache.computed == 3
    for folder in FOLDERS:
        alone = cluster_features(index.features(index.rows_of(folder)), options)
        parallel = selector.clustering_of(folder, index.rows_of(folder))
        assert np.array_equal(alone.assignment, parallel.assignment)
    assert selector.cache.computed == 3  # served from the cache

from pathlib import Path

import numpy as np
import pytest
import torch

from patchdd.data.sources import ClassMapping, collate_readable, read_ground_truth, seeded_subset
from patchdd.datamodules.real import CIFARDataModule, ImageFolderDataModule
from patchdd.errors import DataError
from patchdd.data.subsets import IMAGENET100, IMAGENETTE, IMAGEWOOF, imagenet_wnids, resolve_classes
from tests.conftest import write_image_folder


def test_presets_are_imagenet_wnids_of_the_right_size() -> None:
    wnids = set(imagenet_wnids())
    assert len(wnids) == 1000
    for preset, size in ((IMAGENETTE, 10), (IMAGEWOOF, 10), (IMAGENET100, 100)):
        assert len(set(preset)) == size and set(preset) <= wnids


def test_subset_by_preset_names_and_wnids_is_sorted() -> None:
    available = imagenet_wnids()
    assert resolve_classes("imagewoof", available) == sorted(IMAGEWOOF)
    assert resolve_classes(["golden retriever", "n01440764"], available) == ["n01440764", "n02099601"]
    assert resolve_classes("tench,beagle", available) == ["n01440764", "n02088364"]


@pytest.mark.parametrize("spec", ["imagefruit", ["n99999999"], "not a class name"])
def test_unknown_classes_are_named(spec) -> None:
    with pytest.raises(ValueError, match="unknown class"):
        resolve_classes(spec, imagenet_wnids())


def test_subset_remaps_labels_in_sorted_order(imagefolder_root: Path) -> None:
    dm = ImageFolderDataModule(str(imagefolder_root), classes=["cassette player", "n01440764"], num_workers=0)
    assert dm.class_mapping.folders == ("n01440764", "n02979186")
    assert dm.class_mapping.names == ("tench", "cassette player")
    train = dm.source("train")
    assert sorted(set(train.labels)) == [0, 1]
    assert all(train.ids[i].startswith(dm.class_mapping.folders[label]) for i, label in enumerate(train.labels))


def test_loaders_yield_normalised_batches(imagefolder_root: Path) -> None:
    dm = ImageFolderDataModule(str(imagefolder_root), image_size=24, batch_size=5, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (5, 3, 24, 24) and batch.labels.dtype == torch.long
    val = next(iter(dm.val_dataloader()))
    assert val.images.shape[1:] == (3, 24, 24) and val.skipped == 0


def test_class_mapping_round_trip(tmp_path: Path) -> None:
    mapping = ClassMapping(("a", "b"), ("apple", "banana"))
    mapping.save(tmp_path / "m.json")
    assert ClassMapping.load(tmp_path / "m.json") == mapping


def test_names_file_overrides_display_names(imagefolder_root: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.json"
    names.write_text('{"n01440764": "fish"}')
    dm = ImageFolderDataModule(str(imagefolder_root), class_names=str(names))
    assert dm.class_mapping.names[0] == "fish"


def test_flat_val_folder_with_ground_truth_file(tmp_path: Path) -> None:
    wnids = ["n01440764", "n02102040"]
    write_image_folder(tmp_path / "train", wnids, per_class=2)
    flat = tmp_path / "val"
    write_image_folder(flat / "tmp", ["x"], per_class=4)
    lines = []
    for i, image in enumerate(sorted((flat / "tmp" / "x").iterdir())):
        target = flat / f"ILSVRC2012_val_{i + 1:08d}.png"
        image.rename(target)
        lines.append(f"{target.name} {wnids[i % 2]}")
    (flat / "tmp" / "x").rmdir()
    (flat / "tmp").rmdir()
    truth = tmp_path / "val_truth.txt"
    truth.write_text("\n".join(lines))
    dm = ImageFolderDataModule(str(tmp_path), val_labels=str(truth), classes=["n02102040"])
    val = dm.source("val")
    assert len(val) == 2 and val.labels == [0, 0]
    assert val.ids == ["ILSVRC2012_val_00000002.png", "ILSVRC2012_val_00000004.png"]


def test_kaggle_csv_ground_truth(tmp_path: Path) -> None:
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4 n01751748 5 6 7 8\n")
    assert read_ground_truth(csv) == {"ILSVRC2012_val_00000001": "n01751748"}


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    for wnid in ("n01443537", "n01629819"):
        write_image_folder(tmp_path / "train" / wnid, ["images"], per_class=2, size=(64, 64))
    write_image_folder(tmp_path / "val", ["images"], per_class=2, size=(64, 64))
    files = sorted((tmp_path / "val" / "images").iterdir())
    (tmp_path / "val" / "val_annotations.txt").write_text(
        f"{files[0].name}\tn01443537\t0\t0\t10\t10\n{files[1].name}\tn01629819\t0\t0\t10\t10\n")
    dm = ImageFolderDataModule(str(tmp_path))
    assert len(dm.source("train")) == 4
    assert dm.source("val").labels == [0, 1]


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        dm.setup("fit")


def test_empty_class_folder_is_an_error(imagefolder_root: Path) -> None:
    (imagefolder_root / "train" / "n09999999").mkdir()
    dm = ImageFolderDataModule(str(imagefolder_root))
    with pytest.raises(DataError, match="holds no images"):
        dm.source("train")


def test_class_list_that_does_not_match_the_data(imagefolder_root: Path) -> None:
    with pytest.raises(ValueError, match="unknown class"):
        _ = ImageFolderDataModule(str(imagefolder_root), classes="imagewoof").class_mapping


def test_val_split_missing_a_class_is_an_error(imagefolder_root: Path) -> None:
    import shutil

    shutil.rmtree(imagefolder_root / "val" / "n02102040")
    with pytest.raises(DataError, match="n02102040"):
        ImageFolderDataModule(str(imagefolder_root)).source("val")


def test_unreadable_image_is_skipped_with_a_warning_and_counted(imagefolder_root: Path) -> None:
    bad = imagefolder_root / "train" / "n01440764" / "img_0.png"
    bad.write_bytes(b"not a png at all")
    dm = ImageFolderDataModule(str(imagefolder_root), image_size=16, num_workers=0)
    dataset = dm.train_dataset()
    with pytest.warns(UserWarning, match="unreadable image"):
        items = [dataset[i] for i in range(len(dataset))]
    batch = collate_readable(items)
    assert batch.skipped == 1 and len(batch.labels) == len(dataset) - 1


def test_cifar_from_local_pickles(tmp_path: Path) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": names}, fh)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with (folder / name).open("wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         "labels": list(range(10)) * 2}, fh)
    dm = CIFARDataModule(str(tmp_path), classes="cat,dog", num_workers=0, batch_size=4)
    assert dm.class_mapping.folders == ("cat", "dog")
    train = dm.source("train")
    assert len(train) == 20 and set(train.labels) == {0, 1}
    assert train.load(0).size == (32, 32)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).images.shape == (4, 3, 32, 32)


def test_missing_cifar_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-100-python"):
        _ = CIFARDataModule(str(tmp_path), variant="cifar100").class_mapping


def test_seeded_subset_is_deterministic_and_capped() -> None:
    labels = [0] * 10 + [1] * 3
    chosen = seeded_subset(labels, 4, seed=0)
    assert chosen == seeded_subset(labels, 4, seed=0)
    assert sum(labels[i] == 0 for i in chosen) == 4 and sum(labels[i] == 1 for i in chosen) == 3

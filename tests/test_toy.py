import hashlib
import json
from pathlib import Path

import numpy as np

from patchdd.datamodules.real import ImageFolderDataModule
from patchdd.data.toy import SHAPES, box_overlap, draw_toy_image, load_boxes, write_toy_dataset


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    a = write_toy_dataset(str(tmp_path / "a"), num_classes=3, image_size=48, train_per_class=3, val_per_class=1)
    b = write_toy_dataset(str(tmp_path / "b"), num_classes=3, image_size=48, train_per_class=3, val_per_class=1)
    c = write_toy_dataset(str(tmp_path / "c"), num_classes=3, image_size=48, train_per_class=3, val_per_class=1,
                          seed=1)
    assert _digest(a) == _digest(b) != _digest(c)


def test_layout_is_an_imagefolder_with_boxes(toy_root: Path) -> None:
    dm = ImageFolderDataModule(str(toy_root))
    assert dm.class_mapping.folders == tuple(sorted(list(SHAPES)[:4]))
    assert len(dm.source("train")) == 4 * 6 and len(dm.source("val")) == 4 * 3
    boxes = load_boxes(toy_root)
    assert set(boxes) == {f"train/{i}" for i in dm.source("train").ids} | {f"val/{i}" for i in dm.source("val").ids}


def test_box_covers_the_object_and_object_is_about_a_quarter_of_the_side() -> None:
    size = 128
    for k, shape in enumerate(SHAPES):
        rng = np.random.default_rng(k)
        image, box = draw_toy_image(shape, (255, 0, 0), rng, size, (0.22, 0.32))
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert 0.12 * size <= max(x1 - x0, y1 - y0) <= 0.36 * size, shape
        # the object's colour is uniform inside its box centre region and differs from the rest of the image
        pixels = np.asarray(image, np.float32)
        centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
        assert np.abs(pixels[y0:y1, x0:x1] - centre).sum(-1).min() == 0


def test_box_overlap() -> None:
    assert box_overlap([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_overlap([0, 0, 5, 10], [0, 0, 10, 10]) == 0.5
    assert box_overlap([20, 20, 30, 30], [0, 0, 10, 10]) == 0.0


def test_boxes_file_is_json_of_int_quads(toy_root: Path) -> None:
    data = json.loads((toy_root / "boxes.json").read_text())
    assert all(len(b) == 4 and all(isinstance(v, int) for v in b) for b in data.values())

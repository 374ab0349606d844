"""Shared fixtures: small generated image folders and toy data, CPU only, no network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def write_image_folder(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (40, 32),
                       seed: int = 0) -> Path:
    """``root/<class>/img_<i>.png`` with random pixels; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img_{i}.png")
    return root


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """An ImageNet-style tree with three wnid classes: ``train/<wnid>/`` and ``val/<wnid>/``."""
    wnids = ["n01440764", "n02102040", "n02979186"]  # tench, English springer, cassette player
    write_image_folder(tmp_path / "train", wnids, per_class=4)
    write_image_folder(tmp_path / "val", wnids, per_class=2, seed=1)
    return tmp_path


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A small toy dataset (4 classes, 64 px) shared by the whole session."""
    from patchdd.data.toy import write_toy_dataset

    return write_toy_dataset(str(tmp_path_factory.mktemp("toy")), num_classes=4, image_size=64,
                             train_per_class=6, val_per_class=3)


@pytest.fixture(scope="session")
def prior_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion prior in the SD folder layout (tests/tiny_sd.py)."""
    from tiny_sd import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("prior") / "tiny-sd")

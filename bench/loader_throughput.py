"""Images/s of Stage I's loader (decode + resize + bucket, ``ScoringDataModule``) per worker count, warm and cold.

    python bench/loader_throughput.py                          # 512 JPEGs of 500 x 375 (ImageNet's typical size)
    python bench/loader_throughput.py --root /data/imagenet --classes imagewoof   # real files

Warm: the files are in the page cache (read once before). Cold: every file is dropped from the page cache first
(``posix_fadvise(DONTNEED)``, no root needed), so each image is read from the disk as in a first ImageNet pass.
The loader's output is what the scorer receives (uint8 buckets at 256 px plus the originals); nothing else runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from patchdd.datamodules.real import ImageFolderDataModule
from patchdd.datamodules.scoring_data import ScoringDataModule


def write_jpegs(root: Path, count: int) -> None:
    """``count`` 500 x 375 JPEGs (quality 90, smooth noise: about ImageNet's file size) in 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.JPEG",
                                                                                   quality=90)


def drop_from_page_cache(root: Path) -> None:
    for path in root.rglob("*.JPEG"):
        with path.open("rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def images_per_second(root: Path, classes: str | None, workers: int, batch_size: int) -> tuple[float, int]:
    data = ScoringDataModule(ImageFolderDataModule(str(root), classes=classes), image_size=256, batch_size=batch_size,
                             num_workers=workers)
    loader = data.predict_dataloader()
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch)
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="an ImageNet-style root (default: generated JPEGs)")
    parser.add_argument("--classes", default=None)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if args.root is None:
            write_jpegs(root, args.images)
        print(f"\nStage I loader (decode + resize to 256 + buckets), {root if args.root else 'generated JPEGs'}, "
              f"{os.cpu_count()} CPU cores\n")
        print("| workers | cache | images | images/s | images/s per worker |\n| --- | --- | --- | --- | --- |")
        for workers in args.workers:
            for cache in ("warm", "cold"):
                if cache == "warm":
                    images_per_second(root, args.classes, workers, args.batch_size)  # fills the page cache
                else:
                    drop_from_page_cache(root)
                rate, count = images_per_second(root, args.classes, workers, args.batch_size)
                print(f"| {workers} | {cache} | {count} | {rate:.0f} | {rate / max(1, workers):.0f} |", flush=True)


if __name__ == "__main__":
    main()

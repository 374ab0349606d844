"""Stage II at ImageNet scale on the CPU: a synthetic score store in the real format, then ``distill`` of 10, 100 and
1000 classes, cold (no row index, no k-means cache) and cached, each in its own process, with its peak RSS.

    python bench/distill_scale.py --store /tmp/scale/store        # 1000 classes x 1300 images (about 7 GB)
    python bench/distill_scale.py --store /tmp/s --classes 20 --images 200 --subsets 10 20   # a quick check

The store: one row per image (top-k 1), 500 x 375 originals, a 224 px box, a 32 x 40 score map (float16) and a
1280-d unit DIFT vector (float16): about 5.4 KB per row, in shards of 64 rows like the scoring pass writes them.
Its originals are generated from their ids on demand (``GeneratedImages``: 1.3 M image files do not fit the
bench), so folder listing is not measured here. ``distill`` runs the paper's settings (diffusion selector, IPC 10,
2x2 compositions of 112 px tiles, 32 clusters, top 10) with the PNG export and contact sheets.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
WIDTH, HEIGHT, PATCH, MAP, FEATURE = 500, 375, 224, (32, 40), 1280


class GeneratedSource:
    """Image ids ``<folder>/<i>.JPEG`` whose pixels are made from the id (a flat colour with a gradient)."""

    def __init__(self, folders: list[str], images: int) -> None:
        self.ids = [f"{folder}/{i:05d}.JPEG" for folder in folders for i in range(images)]
        self.labels = [label for label in range(len(folders)) for _ in range(images)]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        rng = np.random.default_rng(i)
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        ramp = np.linspace(0, 60, WIDTH, dtype=np.float32)[None, :, None]
        pixels = np.clip(colour[None, None, :] + ramp + np.zeros((HEIGHT, 1, 1), np.float32), 0, 255)
        return Image.fromarray(pixels.astype(np.uint8))

    def identity(self, i: int) -> str:
        return self.ids[i]


class GeneratedImages:
    """The data module a synthetic store's manifest names (``distill_scale.GeneratedImages``)."""

    def __init__(self, classes: list[str], images: int) -> None:
        self.classes, self.images = classes, images

    def source(self, split: str) -> GeneratedSource:
        return GeneratedSource(self.classes, self.images)


def folders_of(count: int) -> list[str]:
    return [f"n{index:08d}" for index in range(count)]


def write_store(directory: Path, classes: int, images: int, shard_rows: int) -> None:
    """The synthetic store, written shard by shard as the scoring pass writes it."""
    from patchdd.data.sources import ClassMapping
    from patchdd.formats.score_store import PatchTable, ScoreStore
    from patchdd.formats.stores import Manifest

    folders = folders_of(classes)
    manifest = Manifest(settings={"image_size": 256, "patch_size": PATCH, "top_k": 1, "model": "synthetic"},
                        classes=ClassMapping.for_folders(folders).to_json(),
                        data={"class_path": "distill_scale.GeneratedImages",
                              "init_args": {"classes": folders, "images": images}, "split": "train"})
    store = ScoreStore.create_or_check(directory, manifest)
    rng = np.random.default_rng(0)
    total = classes * images
    start = time.perf_counter()
    for first in range(0, total, shard_rows):
        rows = np.arange(first, min(total, first + shard_rows))
        labels = rows // images
        features = rng.standard_normal((len(rows), FEATURE)).astype(np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        x0 = rng.integers(0, WIDTH - PATCH, len(rows))
        y0 = rng.integers(0, HEIGHT - PATCH, len(rows))
        store.append(PatchTable(
            image_ids=np.array([f"{folders[label]}/{row % images:05d}.JPEG" for row, label in zip(rows, labels)],
                               dtype=object),
            labels=labels, sizes=np.tile([WIDTH, HEIGHT], (len(rows), 1)), patch_index=np.zeros(len(rows), np.int64),
            boxes=np.stack([x0, y0, x0 + PATCH, y0 + PATCH], 1), scores=rng.standard_normal(len(rows)).astype(
                np.float32), features=features,
            score_maps=[rng.standard_normal(MAP).astype(np.float32) for _ in rows]))
    store.mark_complete()
    size = sum(p.stat().st_size for p in store.shard_paths())
    print(f"wrote {total:,} rows in {len(store.shard_paths()):,} shards, {size / 1e9:.2f} GB "
          f"({size / total:,.0f} bytes per row) in {time.perf_counter() - start:.0f} s", flush=True)


def run_distill(store: Path, out: Path, classes: int) -> dict:
    """One ``distill`` in this process: its seconds and peak RSS."""
    from patchdd.methods.composition import LayoutOptions
    from patchdd.methods.registry import SynthesisOptions
    from patchdd.workflows.distill import distill

    folders = ",".join(folders_of(classes))
    start = time.perf_counter()
    distill(str(store), str(out), ipc=[10], classes=folders, overwrite=True, progress=False,
            synthesis=SynthesisOptions(layout=LayoutOptions(output_size=PATCH, compose_max_ipc=10)))
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(store: Path, out: Path, classes: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--store", str(store), "--run", str(classes), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"seconds": float("nan"), "peak_rss_gb": float("nan"),
                "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="where the synthetic store is (written when missing)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=1300)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--subsets", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--out", default=None, help="distill output (default: beside the store)")
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)  # one distill, in a child process
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    store = Path(args.store)
    out = Path(args.out or store.parent / "distilled")
    if args.run is not None:
        print(json.dumps(run_distill(store, out, args.run)))
        return
    if not (store / "manifest.json").is_file():
        write_store(store, args.classes, args.images, args.shard_rows)
    import os

    print(f"\nStage II at scale: {args.classes} classes x {args.images} images, IPC 10, 2x2 of 112 px, "
          f"{os.cpu_count()} CPU cores\n")
    print("| classes distilled | run | seconds | peak RSS (GB) |\n| --- | --- | --- | --- |")
    for classes in args.subsets:
        for cache in ("index", "clusters"):  # cold: no row index, no clustering cache
            for path in (store / cache).glob("*"):
                path.unlink()
        for run in ("cold", "cached"):
            result = measure(store, out / f"c{classes}", classes)
            note = f" ({result['error']})" if "error" in result else ""
            print(f"| {classes} | {run} | {result['seconds']:.1f}{note} | {result['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

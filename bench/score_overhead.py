"""The work of one Stage I batch outside the UNet and the VAE, on SD-shaped tensors, step by step (CPU).

    python bench/score_overhead.py                       # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/score_overhead.py    # another version, for before / after

A batch of 64 images scored at 256 x 320 (latents 4 x 32 x 40, N = 8 draws), originals 500 x 375, one 224 px patch
kept per image, 1280-d DIFT vectors: the noise draws, pooling and top-k, the patch crops, the rows' conversion to
Arrow and the shard write (into a store already holding 2,000 shards, as late in an ImageNet pass). Each step is
timed on its own (median of ``--repeats``); the model time it is compared with is the H100 target's: 64 images at
150 images/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchdd.data.scoring_images import plan_resize
from patchdd.data.sources import ClassMapping
from patchdd.formats.score_store import Manifest, PatchTable, ScoreStore
from patchdd.scoring.relevance import (KeptPatch, crop_and_resize, draw_image_noise, keep_patches, patch_window,
                                       pool_scores)

BATCH, DRAWS, LATENT, ORIGINAL, PATCH, FEATURE = 64, 8, (4, 32, 40), (500, 375), 224, 1280
TARGET_BATCH_SECONDS = BATCH / 150


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def rows_of(kept: list[KeptPatch], maps: np.ndarray, features: np.ndarray, ids: list[str]) -> PatchTable:
    """The batch's store rows, as the scorer makes them."""
    return PatchTable(image_ids=np.asarray([ids[p.image] for p in kept], dtype=object),
                      labels=np.zeros(len(kept), np.int64), sizes=np.tile(ORIGINAL, (len(kept), 1)),
                      patch_index=np.asarray([p.rank for p in kept]), boxes=np.asarray([p.box for p in kept]),
                      scores=np.asarray([p.score for p in kept], np.float32), features=features,
                      score_maps=[maps[p.image] for p in kept])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prior-shards", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = [f"n0000/{i:05d}.JPEG" for i in range(BATCH)]
    geometry = [plan_resize(*ORIGINAL, 256)] * BATCH
    maps = torch.randn(BATCH, *LATENT[1:])
    window = patch_window(PATCH, 8, maps.shape[-2:])
    originals = [torch.randint(0, 256, (3, ORIGINAL[1], ORIGINAL[0]), dtype=torch.uint8) for _ in range(BATCH)]
    kept = keep_patches(pool_scores(maps, window), window, 1, geometry, 8)
    features = np.random.default_rng(0).standard_normal((len(kept), FEATURE)).astype(np.float32)
    rows = rows_of(kept, maps.numpy(), features, ids)
    steps = {
        "noise draws (per-image generators, CPU)": lambda: draw_image_noise(ids, 0, DRAWS, LATENT, (0.1, 0.7), 1000),
        "pooling + top-k + boxes": lambda: keep_patches(pool_scores(maps, window), window, 1, geometry, 8),
        "patch crops to 224 px (CPU)": lambda: [crop_and_resize(originals[p.image], p.box, PATCH) for p in kept],
        "rows to Arrow": lambda: rows.to_arrow(),
    }
    timings = {name: median_ms(step, args.repeats) for name, step in steps.items()}
    with tempfile.TemporaryDirectory() as tmp:
        store = ScoreStore.create_or_check(Path(tmp), Manifest({}, ClassMapping(("n0000",), ("x",)).to_json(), {}))
        small = rows_of(kept[:1], maps.numpy(), features[:1], ids)
        for _ in range(args.prior_shards):
            store.append(small)
        timings[f"shard write (store of {args.prior_shards} shards)"] = median_ms(lambda: store.append(rows),
                                                                                  args.repeats)
    total = sum(timings.values())
    print(f"\nStage I non-model work per batch of {BATCH} (CPU, {torch.get_num_threads()} threads), against the "
          f"{1000 * TARGET_BATCH_SECONDS:.0f} ms of a batch at the 150 images/s target\n")
    print("| step | ms per batch | share of a 150 images/s batch |\n| --- | --- | --- |")
    for name, ms in timings.items():
        print(f"| {name} | {ms:.1f} | {ms / (10 * TARGET_BATCH_SECONDS):.1f} % |")
    print(f"| total | {total:.1f} | {total / (10 * TARGET_BATCH_SECONDS):.1f} % |")


if __name__ == "__main__":
    main()

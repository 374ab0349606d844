"""Train the toy diffusion prior, time it, and measure how well the scoring pass finds the toy objects with it.

    python bench/prior_toy.py --data data/toy --out runs/prior/toy            # trains with configs/prior/toy.yaml
    python bench/prior_toy.py --data data/toy --out /tmp/p --trainer.max_steps 600   # other options go to `fit`
    python bench/prior_toy.py --data data/toy --out assets/toy_prior --skip-training   # measures a saved prior

The measurement runs the real Stage I pass (``patchdd predict -c configs/score/toy.yaml``) on one split and reads
the kept patch of every image from the store. A *hit* is a patch that holds at least half of the ground-truth
box (``box_overlap``); chance is the hit rate of a uniformly random patch position of the same size, computed
exactly over all positions. Prints a Markdown table with the device.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from patchdd import cli
from patchdd.formats.score_store import ScoreStore
from patchdd.data.toy import box_overlap, load_boxes
from patchdd.lightning_modules.diffusion_prior import folder_size_mb

HIT_OVERLAP = 0.5


def chance_hit_rate(truth: list[int], image_side: int, patch_side: int) -> float:
    """Hit rate of a uniformly random patch position (integer pixels) for one ground-truth box."""
    positions = range(image_side - patch_side + 1)
    hits = [box_overlap([x, y, x + patch_side, y + patch_side], truth) >= HIT_OVERLAP
            for y in positions for x in positions]
    return sum(hits) / len(hits)


def localisation(store_dir: Path, data: Path, split: str) -> tuple[float, float, int]:
    """(hit rate, chance hit rate, number of images) of the best patch per image in a toy score store."""
    rows = ScoreStore.open(store_dir).read()
    boxes = load_boxes(data)
    best = rows.patch_index == 0
    hits, chance = [], []
    for image_id, box, size in zip(rows.image_ids[best], rows.boxes[best], rows.sizes[best]):
        truth = boxes[f"{split}/{image_id}"]
        hits.append(box_overlap(list(box), truth) >= HIT_OVERLAP)
        chance.append(chance_hit_rate(truth, int(size[0]), int(box[2] - box[0])))
    return sum(hits) / len(hits), sum(chance) / len(chance), len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/prior/toy.yaml")
    parser.add_argument("--score-config", default="configs/score/toy.yaml")
    parser.add_argument("--data", default="data/toy")
    parser.add_argument("--out", default="runs/prior/toy")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--split", default="val")
    args, fit_args = parser.parse_known_args()  # the rest goes to `patchdd fit`
    out, data = Path(args.out), Path(args.data)
    train_seconds = float("nan")
    if not args.skip_training:  # the training run goes through the same command line as `make toy-prior`
        start = time.perf_counter()
        cli.main(["fit", "-c", args.config, "--data.root", str(data), "--model.export_dir", str(out), *fit_args])
        train_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as store_dir:
        cli.main(["predict", "-c", args.score_config, "--data.root", str(data), "--data.split", args.split,
                  "--model.prior", str(out), "--store.dir", store_dir, "--trainer.enable_progress_bar", "false"])
        rate, chance, count = localisation(Path(store_dir), data, args.split)
    device = (f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"\n| device | torch threads | train s | prior MB | split | images | score config "
          f"| hit rate (>= {HIT_OVERLAP:.0%} of box) | chance |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {device} | {torch.get_num_threads()} | {train_seconds:.0f} | {folder_size_mb(out):.1f} | {args.split} "
          f"| {count} | {args.score_config} | {rate:.3f} | {chance:.3f} |")


if __name__ == "__main__":
    main()

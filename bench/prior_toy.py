"""Train the toy diffusion prior, time it, and measure how well its (cond - null) error map finds the toy objects.

    python bench/prior_toy.py --data data/toy --out runs/prior/toy            # trains with configs/prior/toy.yaml
    python bench/prior_toy.py --data data/toy --out /tmp/p --trainer.max_steps 600   # other options go to `fit`
    python bench/prior_toy.py --data data/toy --out runs/prior/toy --skip-training   # measures an exported prior

For every toy image: N draws of (t, eps), t in evenly spaced strata of the t range (x T), the map
R = mean(L_cond - L_null) per latent cell, average-pooled with the patch window; the lowest pooled R is the
prior's best window. A *hit* is a window that holds at least half of the ground-truth box (``box_overlap``).
Chance is the hit rate of a uniformly random window position, computed exactly over all positions.
Prints a Markdown table with the device.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor, resize

from datamodules.real import ImageFolderDataModule
from datamodules.toy import box_overlap, load_boxes
from lightning_modules.diffusion import StableDiffusionPrior, load_prior
from lightning_modules.diffusion_prior import class_prompts, error_gap_map, folder_size_mb

HIT_OVERLAP = 0.5


def window_boxes(score_map: torch.Tensor, window: int, pixels_per_cell: float) -> list[list[int]]:
    """Box (original pixels) of the window with the lowest mean of ``score_map`` (B, h, w), per image."""
    pooled = F.avg_pool2d(score_map[:, None], window, stride=1)[:, 0]
    width = pooled.shape[-1]
    best = pooled.flatten(1).argmin(dim=1)
    boxes = []
    for index in best.tolist():
        y, x = divmod(index, width)
        boxes.append([round(v * pixels_per_cell) for v in (x, y, x + window, y + window)])
    return boxes


def chance_hit_rate(box: list[int], map_side: int, window: int, pixels_per_cell: float) -> float:
    """Hit rate of a uniformly random window position for one ground-truth box."""
    positions = range(map_side - window + 1)
    hits = [box_overlap([round(v * pixels_per_cell) for v in (x, y, x + window, y + window)], box) >= HIT_OVERLAP
            for y in positions for x in positions]
    return sum(hits) / len(hits)


@torch.no_grad()
def localisation(prior: StableDiffusionPrior, data: Path, split: str, image_size: int, patch: int, draws: int,
                 batch_size: int, t_range: tuple[float, float], seed: int) -> tuple[float, float, int]:
    """(hit rate, chance hit rate, number of images) of the prior's best windows on the toy ``split``."""
    module = ImageFolderDataModule(root=str(data))
    source = module.source(split)
    mapping = module.class_mapping
    boxes = load_boxes(data)
    window = patch // prior.downsample_factor
    prompts = class_prompts(mapping.names, "An image of {name}", "An image of .")
    embeddings = prior.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(seed)
    steps = prior.num_train_timesteps
    hits, chance = [], []
    for start in range(0, len(source), batch_size):
        indices = range(start, min(start + batch_size, len(source)))
        originals = [source.load(i) for i in indices]
        pixels = torch.stack([resize(pil_to_tensor(im), [image_size, image_size], antialias=True) for im in originals])
        latents = prior.encode_images(pixels.float() / 127.5 - 1)
        labels = torch.tensor([source.labels[i] for i in indices])
        cond, null = embeddings[labels], embeddings[-1:].expand(len(labels), -1, -1)
        total = torch.zeros(latents.shape[0], *latents.shape[2:])
        for k in range(draws):
            stratum = (k + torch.rand(len(labels), generator=generator)) / draws
            fraction = t_range[0] + (t_range[1] - t_range[0]) * stratum
            timesteps = (fraction * steps).long()
            noise = torch.randn(latents.shape, generator=generator)
            total += error_gap_map(prior.unet, prior.scheduler, latents, cond, null, noise, timesteps)
        pixels_per_cell = originals[0].width / latents.shape[-1]
        for i, found in zip(indices, window_boxes(total / draws, window, pixels_per_cell)):
            truth = boxes[f"{split}/{source.ids[i]}"]
            hits.append(box_overlap(found, truth) >= HIT_OVERLAP)
            chance.append(chance_hit_rate(truth, latents.shape[-1], window, pixels_per_cell))
    return sum(hits) / len(hits), sum(chance) / len(chance), len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/prior/toy.yaml")
    parser.add_argument("--data", default="data/toy")
    parser.add_argument("--out", default="runs/prior/toy")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--image-size", type=int, default=64, help="scoring resolution (the prior's training one)")
    parser.add_argument("--patch", type=int, default=32, help="patch side at the scoring resolution")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--split", default="val")
    parser.add_argument("--t-range", type=float, nargs=2, default=(0.1, 0.7), help="fractions of T")
    args, fit_args = parser.parse_known_args()  # the rest goes to `cli.py fit`
    out, data = Path(args.out), Path(args.data)
    train_seconds = float("nan")
    if not args.skip_training:
        import cli  # the training run goes through the same command line as `make toy-prior`

        start = time.perf_counter()
        cli.main(["fit", "-c", args.config, "--data.root", str(data), "--model.export_dir", str(out),
                  *fit_args])
        train_seconds = time.perf_counter() - start
    rate, chance, count = localisation(load_prior(str(out)), data, args.split, args.image_size, args.patch, args.draws,
                                       batch_size=50, t_range=tuple(args.t_range), seed=0)
    device = (f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"\n| device | torch threads | train s | prior MB | split | images | patch | t range "
          f"| hit rate (>= {HIT_OVERLAP:.0%} of box) | chance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device} | {torch.get_num_threads()} | {train_seconds:.0f} | {folder_size_mb(out):.1f} | {args.split} | "
          f"{count} | {args.patch}/{args.image_size} px | {args.t_range[0]}-{args.t_range[1]} | {rate:.3f} "
          f"| {chance:.3f} |")


if __name__ == "__main__":
    main()

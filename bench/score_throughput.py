"""Throughput of Stage I (the scoring pass) against a naive batch-1 loop, with a random-weight SD v1.5.

    python bench/score_throughput.py                  # GPU: SD v1.5 architecture, 256 px, N = 8, bf16
    python bench/score_throughput.py --compile        # adds a row with torch.compile on the scoring UNet
    python bench/score_throughput.py --tiny           # CPU-sized check: the test prior, 64 px images
    python bench/score_throughput.py --flops          # FLOPs per image and bucket shape (meta device, instant)

Both passes are measured end to end on the same folder of generated JPEGs: decode, resize, VAE encode,
2N UNet evaluations, pooling, top-k, DIFT of the kept patch, writing the score store.

* ``batched``: ``trainer.predict`` with :class:`DiffusionScorer`, :class:`ScoringDataModule` (shape buckets,
  loader workers) and :class:`ScoreStoreWriter`, as ``patchdd predict`` runs it; an untimed warm-up pass over the
  same images (into another store) comes first, so that autotuning and compilation see every bucket shape.
* ``naive``: one image at a time, the conditional and the null UNet calls separate, batch 1, and DIFT as one
  full UNet pass per noise draw; the same functions otherwise, rows appended to a store per image.

Random weights: throughput does not depend on weight values. Prints a Markdown table with the device.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import functional as TF

from patchdd.datamodules.real import ImageFolderDataModule
from patchdd.formats.score_store import Manifest, PatchTable, ScoreStore
from patchdd.datamodules.score_writer import ScoreStoreWriter
from patchdd.data.scoring_images import plan_resize, resize_for_scoring
from patchdd.datamodules.scoring_data import ScoringDataModule
from patchdd.priors.sd import StableDiffusionPrior, random_prior, up_block_features
from patchdd.lightning_modules.scoring import DiffusionScorer
from patchdd.scoring.relevance import (
    crop_and_resize,
    draw_image_noise,
    patch_window,
    pool_scores,
    pooled_unit_vectors,
    predict_noise,
    squared_error_map,
    top_k_windows,
    window_box,
)

ARCHITECTURES = Path(__file__).parents[1] / "configs" / "bench" / "sd15_random.yaml"
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (400, 400), (500, 281), (640, 480)]
TINY_SIZES = [(96, 72), (72, 96), (80, 80), (120, 64)]


def write_images(folder: Path, count: int, sizes: list[tuple[int, int]], classes: int = 4, seed: int = 0) -> None:
    """``count`` JPEGs (smooth random content, so they compress like photos) in ``classes`` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        target = folder / f"class{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{i:06d}.jpg", quality=90)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB (process RSS)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def batched_pass(prior: StableDiffusionPrior, root: Path, store: Path, args, compile: bool) -> float:
    """Seconds of one ``trainer.predict`` over the images in ``root``."""
    scorer = DiffusionScorer(prior=prior.name, patch_size=args.patch_size, num_draws=args.num_draws,
                             compile=compile, dift_batch_size=args.dift_batch_size)
    scorer.prior = prior
    data = ScoringDataModule(ImageFolderDataModule(root=str(root)), image_size=args.image_size,
                             batch_size=args.batch_size, num_workers=args.num_workers)
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ScoreStoreWriter(str(store))])
    start = time.perf_counter()
    trainer.predict(scorer, datamodule=data, return_predictions=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def naive_pass(prior: StableDiffusionPrior, root: Path, store_dir: Path, args, count: int) -> float:
    """Seconds of the batch-1 reference loop over the first ``count`` images."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    source = ImageFolderDataModule(root=str(root)).source("train")
    names = [f"class{i}" for i in range(4)]
    store = ScoreStore.create_or_check(store_dir, Manifest({"naive": True}, {}, {}))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        start = time.perf_counter()
        embeddings = prior.encode_prompts([f"An image of {n}" for n in names] + ["An image of ."])
        for position in range(count):
            image = source.load(position)
            geometry = plan_resize(*image.size, args.image_size)
            scored = resize_for_scoring(image, geometry).to(device)
            latent = prior.encode_images(scored[None].float() / 127.5 - 1)
            label = source.labels[position]
            ts, noise = draw_image_noise([source.ids[position]], 0, args.num_draws, latent.shape[1:], (0.1, 0.7), 1000)
            total = torch.zeros(latent.shape[-2:], device=device)
            for i in range(args.num_draws):
                t, eps = ts[:, i].to(device), noise[:, i].to(device)
                noisy = prior.add_noise(latent, eps, t)
                cond = predict_noise(prior.unet, noisy, t, embeddings[label:label + 1])
                null = predict_noise(prior.unet, noisy, t, embeddings[-1:])
                total += (squared_error_map(cond, eps) - squared_error_map(null, eps))[0]
            score_map = -total / args.num_draws
            window = patch_window(args.patch_size, prior.downsample_factor, score_map.shape)
            row, col, score = top_k_windows(pool_scores(score_map[None], window)[0], window, 1)[0]
            box = geometry.box_to_original(window_box(row, col, window, prior.downsample_factor))
            original = TF.pil_to_tensor(image).to(device)
            patch_latent = prior.encode_images(crop_and_resize(original, box, args.patch_size)[None])
            t_dift = torch.tensor([160], device=device)
            features = []
            for _ in range(8):  # DIFT ensemble: a full UNet pass per draw
                noisy = prior.add_noise(patch_latent, torch.randn_like(patch_latent), t_dift)
                captured = {}
                handle = prior.unet.up_blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
                predict_noise(prior.unet, noisy, t_dift, embeddings[label:label + 1])
                handle.remove()
                features.append(captured["f"].float())
            vector = pooled_unit_vectors(torch.stack(features).mean(0)).cpu().numpy()
            store.append(PatchTable(np.asarray([source.ids[position]], object), np.asarray([label]),
                                    np.asarray([image.size]), np.zeros(1, np.int64), np.asarray([box]),
                                    np.asarray([score], np.float32), vector, [score_map.cpu().numpy()]))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test prior and 64 px images (CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    parser.add_argument("--images", type=int, default=None, help="images in the timed batched pass")
    parser.add_argument("--naive-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (the UNet sees twice this)")
    parser.add_argument("--dift-batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--num-draws", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile on")
    parser.add_argument("--flops", action="store_true", help="only print FLOPs per image (meta device, no timing)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    defaults = {"precision": "bf16-mixed" if gpu else "32-true", "images": 2048 if gpu else 32,
                "naive_images": 16 if gpu else 4, "batch_size": 64 if gpu else 8, "num_workers": 8 if gpu else 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.image_size, args.patch_size = (64, 48) if args.tiny else (256, 224)
    return args


def gflops(function) -> float:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops() / 1e9


def print_flop_table(spec: dict, args) -> None:
    """FLOPs of one image's pass per scored shape, counted on the meta device (no weights, no compute)."""
    with torch.device("meta"):
        prior = random_prior(**spec)
        factor, side = prior.downsample_factor, args.patch_size // prior.downsample_factor
        text = torch.zeros(1, spec["text_encoder"]["max_position_embeddings"], spec["text_encoder"]["hidden_size"])
        t = torch.tensor([160])
        unet_full = gflops(lambda: prior.unet(torch.zeros(1, 4, side, side), t, encoder_hidden_states=text))
        dift = gflops(lambda: up_block_features(prior.unet, torch.zeros(1, 4, side, side), t, text, 1))
        vae_patch = gflops(lambda: prior.vae.encode(torch.zeros(1, 3, args.patch_size, args.patch_size)))
        print(f"\nDIFT pass to up_blocks[1] at {args.patch_size} px: {dift:.0f} GFLOP = "
              f"{dift / unet_full:.0%} of a full UNet evaluation ({unet_full:.0f} GFLOP)\n")
        print("| scored shape (w x h) | VAE | 2N UNet | DIFT (VAE + ensemble 8) | total per image |")
        print("| --- | --- | --- | --- | --- |")
        for long_side in range(args.image_size, 2 * args.image_size + 1, 64):
            h, w = args.image_size // factor, long_side // factor
            vae = gflops(lambda: prior.vae.encode(torch.zeros(1, 3, args.image_size, long_side)))
            unet = gflops(lambda: prior.unet(torch.zeros(1, 4, h, w), t, encoder_hidden_states=text))
            scoring, patch = 2 * args.num_draws * unet, vae_patch + 8 * dift
            print(f"| {long_side} x {args.image_size} | {vae / 1e3:.2f} TFLOP | {scoring / 1e3:.2f} TFLOP "
                  f"| {patch / 1e3:.2f} TFLOP | {(vae + scoring + patch) / 1e3:.2f} TFLOP |")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    spec = yaml.safe_load(ARCHITECTURES.read_text())["tiny" if args.tiny else "sd15"]
    if args.flops:
        print_flop_table(spec, args)
        return
    prior = random_prior(**spec, name="tiny" if args.tiny else "sd15-random").to(device)
    sizes = TINY_SIZES if args.tiny else IMAGENET_SIZES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images" / "train", args.images, sizes)
        reset_peak(device)
        naive_pass(prior, tmp / "images", tmp / "store-naive-warmup", args, 1)
        reset_peak(device)
        count = min(args.naive_images, args.images)
        seconds = naive_pass(prior, tmp / "images", tmp / "store-naive", args, count)
        naive_rate = count / seconds
        rows.append(("naive (batch 1, separate cond/null)", "off", count, seconds, naive_rate, peak_memory(device)))
        for compile in [False, True] if args.compile else [False]:
            tag = "compile" if compile else "eager"
            batched_pass(prior, tmp / "images", tmp / f"store-warmup-{tag}", args, compile)
            reset_peak(device)
            seconds = batched_pass(prior, tmp / "images", tmp / f"store-{tag}", args, compile)
            rows.append((f"batched (bs {args.batch_size}, buckets, DIFT early stop)", "on" if compile else "off",
                         args.images, seconds, args.images / seconds, peak_memory(device)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nStage I throughput: {'tiny test prior, 64 px' if args.tiny else 'SD v1.5 (random weights), 256 px'}, "
          f"N = {args.num_draws}, DIFT ensemble 8, device {name}, precision {args.precision}\n")
    print("| pass | device | compile | images | seconds | images/s | speed-up | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, compile, count, seconds, rate, memory in rows:
        print(f"| {label} | {name} | {compile} | {count} | {seconds:.1f} | {rate:.2f} | {rate / naive_rate:.1f}x "
              f"| {memory} |")


if __name__ == "__main__":
    main()

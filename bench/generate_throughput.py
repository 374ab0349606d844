"""FLOPs per image and images/s of the generative methods' batched passes, with random weights (nothing downloaded).

Two tables:

* FLOPs (2 per multiply-add, counted by ``torch.utils.flop_counter`` on the meta device): one DiT forward, the VAE
  encode and decode, and per image: plain DiT generation (50 DDIM steps with CFG + decode), D3HR's inversion
  (encode + 31 CFG steps to t = 600) and D3HR's generation (31 CFG steps from t = 600 + decode);
* images/s of the same passes run through the suite's modules (``LatentGenerator.predict_step`` and
  ``LatentInverter.predict_step``), batched, autocast to ``--dtype`` on a GPU (bf16), with peak GPU memory;
  then the Minimax / seed-001 fine-tune step (``DiTDiffusionPrior.training_step``: DiffFit on the first half of the
  blocks, the learned-variance hybrid loss, memory banks of 64, AdamW and the EMA, at Minimax's batch 8 and at 32)
  and D4M's img2img (``PromptedImg2Img.predict_step``: SD v1.5's architecture at 512 px, PNDM 50 steps at strength
  0.7, CFG 8).

    python bench/generate_throughput.py                 # GPU: DiT-XL/2 at 256 px + SD's VAE, batch 32, bf16
    python bench/generate_throughput.py --tiny          # CPU check with the tests' tiny DiT (32 px)
    python bench/generate_throughput.py --flops         # the FLOP table only (meta device, instant)
    python bench/generate_throughput.py --dtype float32 # the references' precision: Minimax / Li et al. (fp32)
    python bench/generate_throughput.py --dtype float16 # D3HR's and D4M's (fp16 autocast)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from patchdd.lightning_modules.dit_prior import DiTDiffusionPrior, MemoryOptions
from patchdd.lightning_modules.generation import LatentGenerator, PromptedImg2Img
from patchdd.lightning_modules.inversion import LatentInverter
from torch.utils.flop_counter import FlopCounterMode

from patchdd.data.scoring_images import ScoringBatch
from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD, ClassMapping, ImageBatch
from patchdd.generation.plan import D4MOptions, SamplingOptions, collate_items, noise_items, prototype_items
from patchdd.generation.sampling import ddim_schedulers
from patchdd.priors.dit import build_dit_prior, save_dit_prior
from patchdd.priors.sd import random_prior, save_prior

ARCHITECTURES = Path(__file__).resolve().parents[1] / "configs" / "bench" / "sd15_random.yaml"
DIT_XL_2 = {"num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28, "sample_size": 32,
            "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 1000}
DIT_TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": 8, "patch_size": 2,
            "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 1000}
DTYPES = ("bfloat16", "float16", "float32")
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "clip_sample": False}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny DiT and VAE on the CPU")
    parser.add_argument("--flops", action="store_true", help="print the FLOP table only")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="the DDIM grid")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per pass (after one warm-up)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="autocast dtype on a GPU (float32: none, the Minimax / Li et al. reference; float16: "
                             "D3HR's and D4M's)")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.batches = 8, 2
    return args


def architectures(tiny: bool) -> tuple[dict, dict]:
    vae = yaml.safe_load(ARCHITECTURES.read_text())["tiny" if tiny else "sd15"]["vae"]
    return (DIT_TINY if tiny else DIT_XL_2), vae


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_table(transformer: dict, vae: dict, steps: int) -> list[tuple[str, float]]:
    """GFLOP of one DiT forward (batch 1), the VAE passes, and each method's passes per image."""
    with torch.device("meta"):
        prior = build_dit_prior(None, transformer, vae, SCHEDULE, frozen=True)
        channels, side, _ = prior.latent_shape
        latents = torch.zeros(1, channels, side, side)
        images = torch.zeros(1, 3, prior.image_size, prior.image_size)
        forward = flops_of(lambda: prior.transformer(latents, torch.zeros(1, dtype=torch.long),
                                                     torch.zeros(1, dtype=torch.long)))
        encode = flops_of(lambda: prior.vae.encode(images))
        decode = flops_of(lambda: prior.vae.decode(latents))
    forward_scheduler = ddim_schedulers(SCHEDULE, steps)[0]
    restart = int((forward_scheduler.timesteps <= 600).sum())  # grid steps from t = 600 down to 0 (and back up)
    cfg = 2 * forward
    return [("DiT forward (batch 1)", forward), ("VAE encode", encode), ("VAE decode", decode),
            (f"dit: {steps} CFG steps + decode", steps * cfg + decode),
            (f"d3hr inversion: encode + {restart} CFG steps", encode + restart * cfg),
            (f"d3hr generation: {restart} CFG steps + decode", restart * cfg + decode)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batches: int, batch: int, device: torch.device) -> float:
    """Images/s of ``fn()`` over ``batches`` calls of ``batch`` images, after one untimed call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    synchronize(device)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    transformer, vae = architectures(args.tiny)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    print(f"device: {name}; {'tiny DiT' if args.tiny else 'DiT-XL/2 + SD VAE'}, random weights, batch {args.batch}, "
          f"{dtype}")
    print("\n| pass | GFLOP per image |\n|---|---|")
    for label, flops in flop_table(transformer, vae, args.steps):
        print(f"| {label} | {flops / 1e9:,.3f} |")
    if args.flops:
        return

    torch.manual_seed(0)
    prior = build_dit_prior(None, transformer, vae, SCHEDULE, frozen=True)
    folders = [f"c{i:04d}" for i in range(transformer["num_embeds_ada_norm"])]
    prior.class_mapping = ClassMapping.for_folders(folders)
    with tempfile.TemporaryDirectory() as folder:
        save_dit_prior(folder, prior)
        sampling = SamplingOptions(steps=args.steps)
        generator = LatentGenerator(folder, sampling).to(device).eval()
        d3hr = LatentGenerator(folder, sampling, start_timestep=600).to(device).eval()
        inverter = LatentInverter(folder, steps=args.steps).to(device).eval()
    inverter.use_classes(folders)
    items = collate_items(noise_items(prior.class_mapping, list(range(len(folders))), 1, 0)[: args.batch])
    side = prior.image_size
    scoring_batch = ScoringBatch(torch.randint(0, 256, (args.batch, 3, side, side), dtype=torch.uint8), [],
                                 torch.arange(args.batch) % len(folders), [str(i) for i in range(args.batch)], [])
    starts = torch.randn(args.batch, *prior.latent_shape)
    d3hr_items = replace(items, inits=starts)
    passes = {
        f"dit generation ({args.steps} DDIM steps, CFG 4)": lambda: generator.predict_step(items),
        "d3hr inversion (to t = 600, CFG 4)": lambda: inverter.predict_step(scoring_batch),
        "d3hr generation (from t = 600, CFG 4)": lambda: d3hr.predict_step(d3hr_items),
    }
    print("\n| pass | images/s | peak GPU memory (GiB) |\n|---|---|---|")
    for label, run in passes.items():
        reset_peak(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            rate = timed(run, args.batches, args.batch, device)
        print(f"| {label} | {rate:,.1f} | {peak_gib(device):.1f} |", flush=True)
    del generator, d3hr, inverter
    finetune_table(prior, transformer, args, device, dtype)
    img2img_table(args, device, dtype)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    """Free the cached blocks of the pass before and start the peak-memory count afresh."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def finetune_table(prior, transformer: dict, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> None:
    """Images/s and ms per step of the Minimax / seed-001 fine-tune (DiffFit, hybrid loss, both memory-bank
    kinds, AdamW, EMA) at Minimax's batch 8 and at 4x that."""
    print("\n| fine-tune step (DiffFit, memory banks 64) | batch | ms per step | images/s | peak GPU memory (GiB) |"
          "\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        save_dit_prior(folder, prior)
        for eviction in ("fifo", "max_similarity"):
            module = DiTDiffusionPrior(pretrained=folder, finetune="difffit",
                                       gamma_blocks=transformer["num_layers"] // 2,
                                       memory=MemoryOptions(eviction=eviction), ema_decay=0.9999).to(device)
            module.label_rows = torch.arange(10, device=device)
            module.normalisation = (IMAGENET_MEAN, IMAGENET_STD)
            optimizer = torch.optim.AdamW(list(module.trained_parameters().values()), lr=1e-3, weight_decay=0.0)
            for batch in (8,) if args.tiny else (8, 32):
                images = torch.randn(batch, 3, prior.image_size, prior.image_size, device=device)
                labels = torch.arange(batch, device=device) % 10

                def step() -> None:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        loss = module.training_step(ImageBatch(images, labels, 0), 0)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    module.on_train_batch_end(None, None, 0)

                reset_peak(device)
                for _ in range(8):  # fill the banks past their capacity: every step evicts from then on
                    step()
                rate = timed(step, args.batches * 2, batch, device)
                print(f"| Minimax-style, {eviction} eviction | {batch} | {1000 * batch / rate:,.0f} | {rate:,.1f} | "
                      f"{peak_gib(device):.1f} |", flush=True)
            del module, optimizer


def img2img_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Images/s of D4M's img2img from prototypes with SD v1.5's architecture (random weights) at its resolution."""
    configs = yaml.safe_load(ARCHITECTURES.read_text())["tiny" if args.tiny else "sd15"]
    sd = random_prior(configs["unet"], configs["vae"], configs["text_encoder"])
    folders = [f"c{i:04d}" for i in range(10)]
    classes = ClassMapping.for_folders(folders)
    options = D4MOptions(image_size=sd.unet.config.sample_size * sd.downsample_factor, steps=args.steps)
    batch = min(args.batch, 8)
    with tempfile.TemporaryDirectory() as folder:
        save_prior(folder, sd)
        module = PromptedImg2Img(folder, options).to(device).eval()
    module.use_classes(classes)
    del sd
    channels, side = module.prior.unet.config.in_channels, module.prior.unet.config.sample_size
    prototypes = {f: torch.randn(batch, channels, side, side) for f in folders}
    items = collate_items(prototype_items(classes, batch, 0, prototypes)[:batch])
    if device.type == "cuda":
        module.prior.unet.to(dtype)
        module.prior.vae.to(dtype)
        module.prior.text_encoder.to(dtype)
        items = replace(items, inits=items.inits.to(dtype))
    reset_peak(device)
    rate = timed(lambda: module.predict_step(items), args.batches, batch, device)
    print(f"\n| d4m img2img ({sd_label(args.tiny)}, {options.image_size} px, PNDM {options.steps} steps, strength "
          f"{options.strength}, CFG {options.cfg_scale:g}) | batch | images/s | peak GPU memory (GiB) |"
          f"\n|---|---|---|---|\n| | {batch} | {rate:,.2f} | {peak_gib(device):.1f} |", flush=True)


def sd_label(tiny: bool) -> str:
    return "tiny SD" if tiny else "SD v1.5 architecture"


if __name__ == "__main__":
    main()

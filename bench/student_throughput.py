"""Images/s of FKDStudent's training step: device augmentation + CutMix + teacher forward + student forward/backward.

Three ways to feed the same step (CutMix, teacher, student, AdamW):

* ``device set``: the synthetic set held on the device as uint8 (1,000 images, 2x2 compositions); a batch is one
  gather there, then :func:`patchdd.training.augment.augment_batch` (what the student does with uint8 batches);
* ``CPU loader``: the set on the CPU behind a ``DataLoader(TensorDataset)`` with default collation and a copy to
  the device per batch (what a plain in-memory loader costs), then the same device augmentation;
* ``pre-made``: already augmented, normalised float batches on the device: the ceiling.

    python bench/student_throughput.py      # GPU: R18 -> R18 / R50 / MBv2 / EffNet-B0 / Swin-T / ViT-B, 224 px, bs 256
    python bench/student_throughput.py --tiny               # CPU check with tiny ConvNets
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from patchdd.training.augment import AugmentOptions, augment_batch
from patchdd.lightning_modules.student import FKDStudent

STUDENTS = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:efficientnet_b0", "tv:swin_t", "tv:vit_b_16"]
GPU_PAIRS = [("tv:resnet18", student) for student in STUDENTS]
TINY_PAIRS = [("convnet_d3", "convnet_d3"), ("convnet_d3", "convnet_d4")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny ConvNets at 32 px, batch 16, on the CPU")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000, help="synthetic images held on the device")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.size, args.steps, args.warmup, args.images, args.precision = 16, 32, 10, 3, 64, "fp32"
    return args


def build(teacher: str, student: str, size: int, channels_last: bool, device: torch.device) -> FKDStudent:
    kwargs = {"width": 32} if teacher.startswith("convnet") else {}
    model = FKDStudent(teacher=teacher, student=student, num_classes=1000, random_teacher=True, lr=1e-3,
                       teacher_kwargs=kwargs, student_kwargs=kwargs, model_image_size=size,
                       augment=AugmentOptions(image_size=size), channels_last=channels_last)
    return model.to(device).train()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: FKDStudent, make_batch, args, device: torch.device) -> float:
    """Images/s of ``make_batch()`` + ``training_step`` + backward + AdamW step (bf16 autocast or fp32)."""
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        batch = make_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model.training_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    pairs = TINY_PAIRS if args.tiny else GPU_PAIRS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the step logs to a trainer that is absent here
    synthetic = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (args.images,), device=device)
    premade = torch.randn(args.batch, 3, args.size, args.size, device=device)
    premade_labels = labels[: args.batch]
    options = AugmentOptions(image_size=args.size)

    def device_set_batch():
        index = torch.randint(0, args.images, (args.batch,), device=device)
        return augment_batch(synthetic[index], 2, options), labels[index]

    loader = DataLoader(TensorDataset(synthetic.cpu(), labels.cpu()), batch_size=args.batch, shuffle=True,
                        drop_last=True)
    batches = iter(())

    def cpu_loader_batch():
        nonlocal batches
        images, targets = next(batches, (None, None))
        if images is None:
            batches = iter(loader)
            images, targets = next(batches)
        return augment_batch(images.to(device), 2, options), targets.to(device)

    print(f"device: {name}; batch {args.batch}, {args.size} px, {args.precision}, channels_last={args.channels_last}")
    print("| teacher -> student | device set (img/s) | CPU loader (img/s) | pre-made (img/s) | device set / pre-made |")
    print("|---|---|---|---|---|")
    for teacher, student in pairs:
        model = build(teacher, student, args.size, args.channels_last, device)
        full = throughput(model, device_set_batch, args, device)
        cpu_fed = throughput(model, cpu_loader_batch, args, device)
        ceiling = throughput(model, lambda: (premade, premade_labels), args, device)
        print(f"| {teacher} -> {student} | {full:,.0f} | {cpu_fed:,.0f} | {ceiling:,.0f} | {full / ceiling:.0%} |",
              flush=True)


if __name__ == "__main__":
    main()

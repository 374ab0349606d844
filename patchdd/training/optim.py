"""Optimisers, schedules and metrics shared by the teacher (cross-entropy) and the student (KD) loops."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 and top-5 accuracy (top-k capped at the class count), synced across processes under DDP."""
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        },
        prefix=prefix,
    )


def build_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float,
                    betas: tuple[float, float]) -> torch.optim.Optimizer:
    """SGD (Nesterov-free, with momentum) or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """RDED's parameter groups: decay on weight matrices / kernels only, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if "weight" in name and param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ExponentialAverage:
    """An exponential moving average of named parameters (DiT's EMA, decay 0.9999): ``update`` after each
    optimiser step, ``swapped`` to use the averages in place (to export them), ``state`` / ``load`` for checkpoints."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self, parameters: dict[str, nn.Parameter]) -> None:
        for name, p in parameters.items():
            shadow = self.shadow[name]
            if shadow.device != p.device:
                self.shadow[name] = shadow = shadow.to(p.device)
            shadow.lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def swapped(self, parameters: dict[str, nn.Parameter]) -> Iterator[None]:
        """Inside the context the parameters hold their averages; afterwards their own values again."""
        saved = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(saved[name])

    def state(self) -> dict[str, torch.Tensor]:
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {name: t.clone() for name, t in state.items()}

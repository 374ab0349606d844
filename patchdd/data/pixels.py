"""Pixel normalisation, one pair of functions for the whole suite (students, RDED's teacher, the prior trainer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _channels(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=torch.float32).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8-range pixels (0..255, any dtype) of a batch (B, C, H, W) -> ``(x / 255 - mean) / std`` per channel."""
    return (images.float() - _channels(mean, images) * 255) / (_channels(std, images) * 255)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)``: normalised images -> pixels in ``[0, 1]`` (in the images' dtype)."""
    return images * _channels(std, images).to(images.dtype) + _channels(mean, images).to(images.dtype)

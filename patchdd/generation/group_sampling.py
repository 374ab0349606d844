"""D3HR's group sampling: among many candidate groups of IPC latents drawn from a class's Gaussian, keep the
group whose moments match it best. Plain functions on tensors.

Candidates are drawn in canonical blocks of ``block_size`` groups, each block from its own generator; a processing
batch is a whole number of blocks, so the winner does not depend on the batch size (only on the device: CPU and
CUDA generators draw different numbers). Block ``i``'s seed (:data:`SEEDINGS`) is D3HR's code's ``i * 12345`` (plus
``seed``; the same blocks for every class, as its ``torch.manual_seed(i * 12345)`` before blocks of 10^4 groups) or
a hash of (seed, class, block).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

SCORE_VARIANTS = ("paper", "d3hr_code")
DEFAULT_WEIGHTS = {"paper": (1.0, 1.0, 0.5), "d3hr_code": (1.0, 1.0, 0.1)}
SEEDINGS = ("d3hr_code", "hashed")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (strings, ints): stable across runs, machines and Python versions."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def block_seed(seeding: str, seed: int, class_key: str, block: int) -> int:
    """The seed of candidate block ``block``: ``seed + block * 12345`` (``d3hr_code``: D3HR's code at seed 0, the
    same for every class) or a hash of (seed, class, block) (``hashed``: every class its own candidates)."""
    if seeding == "d3hr_code":
        return seed + block * 12345
    if seeding == "hashed":
        return derive_seed(seed, class_key, block)
    raise ValueError(f"seeding must be one of {SEEDINGS}, got {seeding!r}")


def per_dimension_skewness(groups: torch.Tensor) -> torch.Tensor:
    """Sample skewness of every dimension over each group's members: (G, n, D) -> (G, D) (biased moments)."""
    centred = groups - groups.mean(dim=1, keepdim=True)
    variance = centred.pow(2).mean(dim=1)
    return centred.pow(3).mean(dim=1) / variance.clamp_min(1e-12).pow(1.5)


def d3hr_code_skewness(groups: torch.Tensor) -> torch.Tensor:
    """The skewness of D3HR's code: each member standardised per dimension by its group's mean and (unbiased)
    std, cubes summed over the D feature dimensions with the bias factor D / ((D - 1)(D - 2)): (G, n, D) -> (G, n)."""
    dims = groups.shape[-1]
    standard = (groups - groups.mean(dim=1, keepdim=True)) / groups.std(dim=1, keepdim=True).clamp_min(1e-12)
    return dims / ((dims - 1) * (dims - 2)) * standard.pow(3).sum(dim=-1)


def group_scores(groups: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 weights: tuple[float, float, float] | None = None, variant: str = "paper") -> torch.Tensor:
    """Score of each candidate group (G, n, D) against the class Gaussian (mean, std of shape (D,)); lower is
    better: ``w_mu ||mean_g - mean|| + w_sigma ||std_g - std|| + w_skew ||skew_g||``.

    ``variant="paper"`` takes the per-dimension skewness against the Gaussian's 0 with weights (1, 1, 0.5);
    ``"d3hr_code"`` the code's per-member skewness (:func:`d3hr_code_skewness`) with (1, 1, 0.1). A group of one
    latent has no spread: only its distance to the mean counts.
    """
    if variant not in SCORE_VARIANTS:
        raise ValueError(f"score variant must be one of {SCORE_VARIANTS}, got {variant!r}")
    w_mean, w_std, w_skew = weights or DEFAULT_WEIGHTS[variant]
    score = w_mean * (groups.mean(dim=1) - mean).norm(dim=-1)
    if groups.shape[1] < 2:
        return score
    score = score + w_std * (groups.std(dim=1) - std).norm(dim=-1)
    skew = per_dimension_skewness(groups) if variant == "paper" else d3hr_code_skewness(groups)
    return score + w_skew * skew.norm(dim=-1)


def candidate_block(mean: torch.Tensor, std: torch.Tensor, ipc: int, block_size: int, seed: int) -> torch.Tensor:
    """``block_size`` groups of ``ipc`` latents drawn from N(mean, diag(std^2)) with one seeded generator, by
    ``torch.normal`` on the expanded moments as D3HR's code draws them (the same numbers on the same device)."""
    generator = torch.Generator(device=mean.device).manual_seed(seed)
    shape = (block_size, ipc, mean.numel())
    return torch.normal(mean.expand(shape), std.expand(shape), generator=generator)


# Float32 tensors of the candidate batch's size alive at once while it is scored: the candidates, their centred
# copy and one power of it (peak RSS growth / batch size measured on the CPU: 3.05, either score variant).
WORKING_COPIES = 4


def group_sampling_bytes(ipc: int, dims: int, block_size: int, blocks_per_batch: int) -> int:
    """Memory that scoring one batch of candidate groups takes (float32)."""
    return WORKING_COPIES * 4 * blocks_per_batch * block_size * ipc * dims


class ChosenGroup(NamedTuple):
    latents: torch.Tensor  # (ipc, D)
    score: float
    index: int  # the candidate's position among all drawn groups


def group_sample(mean: torch.Tensor, std: torch.Tensor, ipc: int, candidates: int, seed: int, class_key: str,
                 block_size: int = 1024, blocks_per_batch: int = 8,
                 weights: tuple[float, float, float] | None = None, variant: str = "paper",
                 seeding: str = "hashed") -> ChosenGroup:
    """The best of ``candidates`` groups (rounded up to whole blocks) for one class, scored ``blocks_per_batch``
    blocks at a time on ``mean``'s device; the first of equal scores wins, as in D3HR's code. Deterministic given
    (seed, class_key, block_size, seeding, device)."""
    if candidates < 1 or block_size < 1 or blocks_per_batch < 1:
        raise ValueError("candidates, block_size and blocks_per_batch must be positive")
    blocks = -(-candidates // block_size)
    best = ChosenGroup(torch.empty(0), float("inf"), -1)
    for first in range(0, blocks, blocks_per_batch):
        batch = torch.cat([candidate_block(mean, std, ipc, block_size, block_seed(seeding, seed, class_key, b))
                           for b in range(first, min(blocks, first + blocks_per_batch))])
        scores = group_scores(batch, mean, std, weights, variant)
        position = int(scores.argmin())
        if float(scores[position]) < best.score:
            best = ChosenGroup(batch[position].clone(), float(scores[position]), first * block_size + position)
    return best

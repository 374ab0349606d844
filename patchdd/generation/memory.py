"""Minimax diffusion's memory regularisers and the self-adaptive memory of Li et al., as plain functions on tensors.

Per class, a bank of real latents and a bank of generated ones (x0 predictions) hold flattened vectors. The fine-tune
adds a representativeness term ``L_real = lambda_r (1 - min cos(x0, real bank))`` and a diversity term
``L_gen = lambda_g max cos(x0, generated bank)`` per class present in the batch, averaged over those classes.
Banks keep at most ``capacity`` vectors: ``fifo`` drops the oldest (Minimax); ``max_similarity`` drops, one at a
time, the vector with the largest summed cosine similarity to the whole bank, itself included (Li et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EVICTIONS = ("fifo", "max_similarity")


def max_similarity_keep(vectors: torch.Tensor, capacity: int) -> torch.Tensor:
    """Positions (ascending) of the ``capacity`` vectors kept when the most redundant one is removed until
    ``capacity`` remain: each time the one whose row of the cosine matrix (self-similarity included) sums highest."""
    unit = F.normalize(vectors.float(), dim=1)
    similarity = unit @ unit.T
    sums = similarity.sum(dim=1)
    alive = torch.ones(len(vectors), dtype=torch.bool, device=vectors.device)
    for _ in range(len(vectors) - capacity):
        position = int(torch.where(alive, sums, torch.tensor(float("-inf"), device=sums.device)).argmax())
        alive[position] = False
        sums = sums - similarity[:, position]
    return alive.nonzero().flatten()


class MemoryBank:
    """Per-class banks of detached, flattened vectors with a capacity and an eviction rule.

    Args:
        capacity: most vectors a class keeps.
        eviction: ``fifo`` (Minimax) or ``max_similarity`` (Li et al.).
    """

    def __init__(self, capacity: int = 64, eviction: str = "fifo") -> None:
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity, self.eviction = capacity, eviction
        self.banks: dict[int, torch.Tensor] = {}

    def get(self, label: int) -> torch.Tensor | None:
        return self.banks.get(int(label))

    def add(self, label: int, vectors: torch.Tensor, trim: bool = True) -> None:
        """Append (detached, flattened) ``vectors`` to the bank of ``label``; ``trim`` evicts down to capacity now
        (Li et al.'s code does it every step), otherwise :meth:`trim` does it later (its paper: every epoch)."""
        flat = vectors.detach().flatten(1)
        old = self.banks.get(int(label))
        self.banks[int(label)] = flat if old is None else torch.cat([old, flat.to(old)])
        if trim:
            self.trim(label)

    def trim(self, label: int | None = None) -> None:
        """Evict down to capacity: one class, or every class (``None``)."""
        for key in [int(label)] if label is not None else list(self.banks):
            bank = self.banks[key]
            if len(bank) <= self.capacity:
                continue
            if self.eviction == "fifo":
                self.banks[key] = bank[len(bank) - self.capacity:]
            else:
                self.banks[key] = bank[max_similarity_keep(bank, self.capacity)]

    def mean_similarity(self, label: int) -> float:
        """Mean off-diagonal cosine similarity of a bank (its redundancy; lower = more diverse)."""
        unit = F.normalize(self.banks[int(label)].float(), dim=1)
        n = len(unit)
        return float(((unit @ unit.T).sum() - n) / max(1, n * (n - 1)))


def memory_losses(x0: torch.Tensor, labels: torch.Tensor, real: MemoryBank, generated: MemoryBank,
                  lambda_real: float = 0.002, lambda_gen: float = 0.008,
                  legacy_accumulation: bool = False) -> torch.Tensor:
    """``sum_c [lambda_r (1 - min cos(x0_c, real_c)) + lambda_g max cos(x0_c, gen_c)] / n_c`` over the classes c
    in the batch whose generated bank is not empty (Minimax's condition; ``n_c`` counts every class in the batch);
    0 otherwise. Only ``x0`` carries gradient.

    ``legacy_accumulation`` reproduces Li et al.'s code exactly: it visits the batch's classes in the order of a
    Python ``set`` of the labels and adds its running sums to the loss at every class it visits, an empty-bank
    class included, so the k-th class's terms count n - k + 1 times."""
    flat = F.normalize(x0.flatten(1).float(), dim=1)
    order = list(set(labels.tolist())) if legacy_accumulation else labels.unique().tolist()
    zero = flat.sum() * 0.0
    total, running = zero, zero
    for c in order:
        gen = generated.get(c)
        if gen is not None and len(gen):
            own = flat[labels == c]
            term = lambda_gen * (own @ F.normalize(gen.float().to(own.device), dim=1).T).max()
            bank = real.get(c)
            if bank is not None and len(bank):
                term = term + lambda_real * (1 - (own @ F.normalize(bank.float().to(own.device), dim=1).T).min())
            running = running + term / len(order)
        if legacy_accumulation:
            total = total + running
    return total if legacy_accumulation else running

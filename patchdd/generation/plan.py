"""What ``generate`` makes, planned on the CPU before any model runs: one work item per synthetic image.

A work item carries everything its image depends on: the class, its row in the DiT's label table, its index, a
seed derived from (seed, class folder, index), and the latent it starts from (``None``: Gaussian noise drawn from
its seed; D3HR: a latent of the group chosen for its class). Items are cut into canonical batches (the same for
any world size and on resume), so an image's bytes depend on the plan only, never on how the run was split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from patchdd.data.sources import ClassMapping
from patchdd.formats.latent_stats import ClassSums
from patchdd.formats.synthetic_folder import image_name
from patchdd.generation.group_sampling import derive_seed, group_sample, group_sampling_bytes


@dataclass
class SamplingOptions:
    """How latents become images.

    Args:
        sampler: ``ddim`` (deterministic, eta 0) or ``ancestral`` (DDPM with a learned variance, DiT's sampler).
        steps: sampling grid steps (50).
        cfg_scale: classifier-free guidance scale (1: none).
        cfg_channels: guided latent channels (``None``: all, as ``DiTPipeline`` and D3HR; 3: Meta's DiT, Minimax).
        set_alpha_to_one: DDIM's last step ends at abar = 1 (the clean latent); false ends at abar[0] (D3HR's
            code ends at abar[1], a 1e-4 difference).
    """

    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = None
    set_alpha_to_one: bool = True


@dataclass
class D3HROptions:
    """D3HR's choices, by default as its public code runs them (``profile: reference``); ``--profile paper`` reads
    the paper instead (:data:`PROFILES`).

    Args:
        timestep: the inverted latents' timestep, where generation restarts (600).
        restart_offset: 1 restarts one grid step earlier than ``timestep``, as D3HR's code does (the t = 600
            latent enters at t = 620); 0 restarts at it (the paper).
        candidates: candidate groups per class: the code's ``m // 10`` blocks of 10^4 with its scripts' m = 10^5
            (10^8); the paper's m = 10^6.
        block_size: groups per seeded block (the code: 10^4).
        blocks_per_batch: blocks scored at once (memory: blocks x block_size x IPC x latent size floats).
        score_variant: ``d3hr_code`` (the code's per-member skewness, weights 1, 1, 0.1) or ``paper``
            (per-dimension skewness, 1, 1, 0.5).
        seeding: ``d3hr_code`` (block i seeded ``seed + i * 12345``, the same groups for every class) or ``hashed``
            (every class its own candidates).
        final_steps: ``d3hr_code`` (the code's last two steps both end at abar[1]) or ``scheduler`` (DDIM's own).
        weights: override of the (mean, std, skewness) weights.
        device: where candidates are drawn and scored (``auto``: the GPU when there is one; the code's groups are
            reproduced on the device it ran on, CUDA).
        memory_limit_gb: the most memory group sampling may take at once; an IPC whose candidate batch needs more
            is refused before any work, with the figure (lower ``block_size`` or ``blocks_per_batch``).
    """

    timestep: int = 600
    restart_offset: int = 1
    candidates: int = 100_000_000
    block_size: int = 10_000
    blocks_per_batch: int = 1
    score_variant: str = "d3hr_code"
    seeding: str = "d3hr_code"
    final_steps: str = "d3hr_code"
    weights: tuple[float, float, float] | None = None
    device: str = "auto"
    memory_limit_gb: float = 16.0

    def check_memory(self, ipc: int, dims: int) -> None:
        """Refuse, before any work, an IPC whose candidate batch would need more than ``memory_limit_gb``."""
        needed = group_sampling_bytes(ipc, dims, self.block_size, self.blocks_per_batch) / 2**30
        if needed > self.memory_limit_gb:
            raise ValueError(
                f"D3HR's group sampling at IPC {ipc} needs about {needed:,.1f} GiB at once ({self.blocks_per_batch} "
                f"block(s) of {self.block_size} groups x {ipc} latents x {dims} dims), over --d3hr.memory_limit_gb "
                f"{self.memory_limit_gb:g}; lower --d3hr.block_size or --d3hr.blocks_per_batch (the groups drawn depend "
                "on block_size), or raise the limit")


@dataclass
class D4MOptions:
    """D4M's choices, by default as its public code runs them (``profile: reference``; ``--profile suite``: the
    suite's earlier reading, :data:`PROFILES`).

    Args:
        image_size: the training images are squashed (not cropped) to this side before encoding (D4M: 512; it must
            be the prior's resolution).
        resize_filter: the squash's filter: ``bilinear`` (D4M's torchvision ``Resize((512, 512))`` on a PIL image)
            or ``bicubic``.
        latent_mode: ``sample`` the VAE posterior (D4M) or take its ``mean``.
        kmeans: ``minibatch`` (D4M's MiniBatchKMeans with partial_fit) or ``full``.
        km_expand: D4M's chunk size factor: partial_fit on chunks of ``km_expand x IPC`` latents (its script: 1).
        leftover: ``d4m_code`` fits full chunks only (with km_expand 1 the code never fits a leftover); ``all``
            fits each class's shorter leftover chunk too.
        order: ``shuffled`` streams each class's latents into k-means in a seeded random order (D4M's loader
            shuffles, unseeded); ``files`` in file order.
        strength: img2img strength (0.7: 35 of 50 steps, from timesteps[15]).
        cfg_scale: classifier-free guidance against the negative prompt (8).
        steps: the scheduler's steps (PNDM, 50).
        prompt_template: the class prompt: ``{d4m_label}`` is the class's line of D4M's ``imagenet_classes.txt``
            (the synset line, all synonyms), ``{synset}`` the standard synset line, ``{name}`` the display name.
        negative_prompt: D4M's "cartoon, anime, painting".
        encode_batch: images encoded at once (the latent cache's pass).
        encode_workers: loader processes of that pass (decode + squash).
    """

    image_size: int = 512
    resize_filter: str = "bilinear"
    latent_mode: str = "sample"
    kmeans: str = "minibatch"
    km_expand: int = 1
    leftover: str = "d4m_code"
    order: str = "shuffled"
    strength: float = 0.7
    cfg_scale: float = 8.0
    steps: int = 50
    prompt_template: str = "{d4m_label}"
    negative_prompt: str = "cartoon, anime, painting"
    encode_batch: int = 32
    encode_workers: int = 4


@dataclass
class WorkItem:
    """One synthetic image to make."""

    label: int  # position in the output classes
    folder: str
    model_label: int  # row of the DiT's label table
    index: int  # image index within its class
    ipc: int  # images of its class in the set
    seed: int
    init: torch.Tensor | None = field(default=None, repr=False)  # starting latent; None: noise from the seed
    group_score: float | None = None
    group_candidate: int | None = None

    @property
    def file(self) -> str:
        return f"{self.folder}/{image_name(self.index, self.ipc)}"


@dataclass
class WorkBatch:
    """A batch of work items as the generator reads it."""

    items: list[WorkItem]
    model_labels: torch.Tensor  # (B,) int64
    inits: torch.Tensor | None  # (B, C, H, W) starting latents, or None: noise from the items' seeds

    def __len__(self) -> int:
        return len(self.items)


def collate_items(items: list[WorkItem]) -> WorkBatch:
    """Stack a batch of items; their starting latents are all given or all absent."""
    given = [item.init is not None for item in items]
    if any(given) and not all(given):
        raise ValueError("a batch mixes items with and without starting latents")
    inits = torch.stack([item.init for item in items]) if all(given) and items else None
    return WorkBatch(list(items), torch.tensor([item.model_label for item in items], dtype=torch.long), inits)


def item_seed(seed: int, folder: str, index: int) -> int:
    return derive_seed("generate", seed, folder, index)


def noise_items(classes: ClassMapping, model_labels: Sequence[int], ipc: int, seed: int) -> list[WorkItem]:
    """Items that start from Gaussian noise (plain DiT generation)."""
    return [WorkItem(label, folder, model_labels[label], i, ipc, item_seed(seed, folder, i))
            for label, folder in enumerate(classes.folders) for i in range(ipc)]


def group_items(classes: ClassMapping, model_labels: Sequence[int], ipc: int, seed: int, sums: ClassSums,
                store_folders: Sequence[str], latent_shape: tuple[int, ...], options: D3HROptions,
                device: torch.device | str = "cpu") -> list[WorkItem]:
    """Items that start from the latents of the group chosen for each class (D3HR's group sampling)."""
    items = []
    for label, folder in enumerate(classes.folders):
        mean, variance = sums.gaussian(list(store_folders).index(folder))
        mean, std = mean.float().to(device), variance.float().sqrt().to(device)
        chosen = group_sample(mean, std, ipc, options.candidates, seed, folder, options.block_size,
                              options.blocks_per_batch, options.weights, options.score_variant, options.seeding)
        latents = chosen.latents.cpu().view(ipc, *latent_shape)
        items += [WorkItem(label, folder, model_labels[label], i, ipc, item_seed(seed, folder, i), latents[i],
                           chosen.score, chosen.index) for i in range(ipc)]
    return items


def prototype_items(classes: ClassMapping, ipc: int, seed: int, prototypes: dict[str, torch.Tensor]) -> list[WorkItem]:
    """Items that start from each class's prototypes (D4M), one per prototype."""
    return [WorkItem(label, folder, 0, i, ipc, item_seed(seed, folder, i), prototypes[folder][i])
            for label, folder in enumerate(classes.folders) for i in range(ipc)]


def canonical_batches(items: Sequence[WorkItem], batch_size: int) -> list[list[int]]:
    """Positions of ``items`` cut into consecutive batches of ``batch_size`` (the last one shorter)."""
    return [list(range(start, min(len(items), start + batch_size))) for start in range(0, len(items), batch_size)]


def provenance_columns(items: Sequence[WorkItem], common: dict) -> dict[str, list]:
    """``provenance.parquet`` columns: one row per image (its file, class, seed, start, group) + ``common``."""
    columns = {
        "file": [item.file for item in items],
        "class": [item.folder for item in items],
        "label": [item.label for item in items],
        "model_label": [item.model_label for item in items],
        "index": [item.index for item in items],
        "seed": [item.seed for item in items],
        "init": ["noise" if item.init is None else "group" if item.group_score is not None else "prototype"
                 for item in items],
        "group_score": [item.group_score for item in items],
        "group_candidate": [item.group_candidate for item in items],
    }
    return columns | {name: [value] * len(items) for name, value in common.items()}

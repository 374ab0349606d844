"""A tiny class-conditional DiT prior (random weights, no download) for CPU tests.

The transformer is the unit-test configuration of ``shared/research/generative_methods.md`` section 3.1 (2 blocks of
width 16 on 8 x 8 x 4 latents, 52 k parameters); the VAE is the ``tiny`` one of ``configs/bench/sd15_random.yaml``
(downsampling 4, so 32 px images); the schedule is DiT's linear DDPM. ``save_tiny_dit`` writes it in the
``DiTPipeline`` layout with the suite's ``save_dit_prior``, so that ``load_dit_prior`` reads it like
``facebook/DiT-XL-2-256``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from patchdd.data.sources import ClassMapping
from patchdd.priors.dit import DiTPrior, build_dit_prior, save_dit_prior

ARCHITECTURES = Path(__file__).parents[1] / "configs" / "bench" / "sd15_random.yaml"
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "clip_sample": False}


def tiny_dit(folders: Sequence[str], learn_sigma: bool = True, sample_size: int = 8, seed: int = 0) -> DiTPrior:
    torch.manual_seed(seed)
    transformer = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "sample_size": sample_size,
                   "patch_size": 2, "in_channels": 4, "out_channels": 8 if learn_sigma else 4,
                   "num_embeds_ada_norm": len(folders)}
    vae = yaml.safe_load(ARCHITECTURES.read_text())["tiny"]["vae"]
    prior = build_dit_prior(None, transformer, vae, SCHEDULE, frozen=True, name="tiny-dit")
    prior.class_mapping = ClassMapping.for_folders(list(folders))
    return prior


def save_tiny_dit(folder: str | Path, folders: Sequence[str], **kwargs) -> Path:
    """Write a tiny DiT prior in the DiTPipeline layout and return the folder."""
    return save_dit_prior(folder, tiny_dit(folders, **kwargs))

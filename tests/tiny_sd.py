"""A tiny Stable-Diffusion-v1-layout prior (random weights, no download) for CPU tests.

Its architecture is the ``tiny`` entry of ``configs/bench/sd15_random.yaml``: the VAE downsamples by 4 (3 blocks),
the UNet has two resolutions (up_blocks[0] at 1/2, up_blocks[1] at full latent resolution), the text encoder is
2 layers of width 32, the tokenizer the offline character-level one. ``save_tiny_sd(folder)`` writes
``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` with the suite's ``save_prior``, so that
:func:`patchdd.priors.sd.load_prior` reads it exactly like a real SD v1.5 folder.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from patchdd.priors.sd import StableDiffusionPrior, random_prior, save_prior

ARCHITECTURES = Path(__file__).parents[1] / "configs" / "bench" / "sd15_random.yaml"


def tiny_prior(seed: int = 0) -> StableDiffusionPrior:
    return random_prior(**yaml.safe_load(ARCHITECTURES.read_text())["tiny"], seed=seed, name="tiny")


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny prior in the SD folder layout and return the folder."""
    return save_prior(folder, tiny_prior(seed))

"""Stage I as a Lightning predict loop: :class:`DiffusionScorer` (``python cli.py predict -c configs/score/...``).

The math lives in :mod:`patchdd.scoring.relevance` (plain functions that the tests call directly); this module
loads the prior once per process, encodes the C + 1 prompts once, and turns each batch into score-store rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch

from patchdd.data.scoring_images import ScoringBatch
from patchdd.formats.score_store import PatchTable
from patchdd.priors.sd import DEFAULT_PRIOR, StableDiffusionPrior, load_prior, up_block_features
from patchdd.scoring.relevance import (NoisePredictor, crop_and_resize, dift_vectors, draw_image_noise, empty_rows,
                                       keep_patches, patch_rows, patch_window, pool_scores, predict_noise,
                                       relevance_score_map, stable_seed)


class DiffusionScorer(L.LightningModule):
    """Stage I as a predict loop: per image, the score map (-R, higher = more class-relevant), the top-k
    non-overlapping patches with boxes in original pixels, and the DIFT vector of each kept patch.

    Args:
        prior: hub id or local folder of an SD-v1-format model (loaded in ``setup``, once per process).
        revision: hub revision of the prior.
        patch_size: patch side in scored pixels (the paper: 224); ``null`` = the whole image (CIFAR, TinyImageNet).
        num_draws: N, the (t, eps) draws averaged per image (the paper: 8 assumed; Alg. 1's N).
        t_range: t ~ U(lo, hi) x T (the paper: 0.1-0.7, supplement 2).
        stratified_t: one draw in each of N equal strata of the range instead of i.i.d. draws.
        prompt_template: the class prompt, ``{}`` = class name (the paper: "An image of {}").
        null_prompt: the prompt without a class (the paper: "An image of .").
        top_k: non-overlapping patches kept per image (the paper: 1).
        seed: seed of all noise; each image's draws depend only on (seed, image id).
        dift_timestep: DIFT noise level (our reading of the paper's "t = 1.60": 160; DIFT's own default: 261).
        dift_up_block: UNet up-block whose output is the DIFT feature (1: 1280 channels at 1/16 of the patch).
        dift_ensemble: noise draws averaged per DIFT feature (DIFT's default: 8).
        dift_prompt: ``class`` (the class prompt) or ``null`` for the DIFT pass.
        dift_batch_size: UNet rows per DIFT call (patches x ensemble are chunked by this).
        compile: ``torch.compile`` the scoring UNet calls and the truncated DIFT pass.
        channels_last: run the UNet in channels-last memory format (measured slower for SD's UNet on H100).
    """

    output_store = "scores"  # what ScoreStoreWriter (--store.dir) writes

    def __init__(self, prior: str = DEFAULT_PRIOR, revision: str | None = None, patch_size: int | None = 224,
                 num_draws: int = 8, t_range: tuple[float, float] = (0.1, 0.7), stratified_t: bool = False,
                 prompt_template: str = "An image of {}", null_prompt: str = "An image of .", top_k: int = 1,
                 seed: int = 0, dift_timestep: int = 160, dift_up_block: int = 1, dift_ensemble: int = 8,
                 dift_prompt: Literal["class", "null"] = "class", dift_batch_size: int = 128,
                 compile: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        lo, hi = t_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {t_range}")
        if num_draws < 1 or top_k < 1 or dift_ensemble < 1:
            raise ValueError("num_draws, top_k and dift_ensemble must be at least 1")
        self.save_hyperparameters()
        # A resume with fewer pending images than ranks leaves some ranks without a batch: they finish cleanly.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.prior_name, self.revision = prior, revision
        self.patch_size, self.num_draws, self.t_range = patch_size, num_draws, (float(lo), float(hi))
        self.stratified_t, self.top_k, self.seed = stratified_t, top_k, seed
        self.prompt_template, self.null_prompt = prompt_template, null_prompt
        self.dift_timestep, self.dift_up_block, self.dift_ensemble = dift_timestep, dift_up_block, dift_ensemble
        self.dift_prompt, self.dift_batch_size = dift_prompt, dift_batch_size
        self.compile, self.channels_last = compile, channels_last
        self.prior: StableDiffusionPrior | None = None
        self.prompt_embeddings: torch.Tensor | None = None  # (C + 1, L, D): class prompts, then the null prompt
        self._predict_noise: NoisePredictor | None = None
        self._dift_features = up_block_features
        self._noise_unet_id: int | None = None  # id of the UNet _predict_noise calls

    def settings(self) -> dict:
        """The scoring settings a store records and checks on resume."""
        return {"prior": self.prior_name, "revision": self.revision, "patch_size": self.patch_size,
                "num_draws": self.num_draws, "t_range": list(self.t_range), "stratified_t": self.stratified_t,
                "prompt_template": self.prompt_template, "null_prompt": self.null_prompt, "top_k": self.top_k,
                "seed": self.seed, "dift_timestep": self.dift_timestep, "dift_up_block": self.dift_up_block,
                "dift_ensemble": self.dift_ensemble, "dift_prompt": self.dift_prompt}

    def setup(self, stage: str) -> None:
        if self.prior is None:
            self.prior = load_prior(self.prior_name, self.revision)
        if self.channels_last:
            self.prior.unet.to(memory_format=torch.channels_last)

    def prompts(self, class_names: Sequence[str]) -> list[str]:
        """The C class prompts followed by the null prompt."""
        return [self.prompt_template.format(name) for name in class_names] + [self.null_prompt]

    def prepare(self, class_names: Sequence[str]) -> None:
        """Encode the C + 1 distinct prompts once, and set up the (optionally compiled) scoring UNet call."""
        self.prompt_embeddings = self.prior.encode_prompts(self.prompts(class_names))
        unet = self.prior.unet
        if self._predict_noise is not None and self._noise_unet_id == id(unet):
            return  # keep a compiled call across predict runs

        def forward(sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            return predict_noise(unet, sample, timesteps, embeddings)

        self._predict_noise = torch.compile(forward) if self.compile else forward
        self._dift_features = torch.compile(up_block_features) if self.compile else up_block_features
        self._noise_unet_id = id(unet)

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "class_mapping"):
            raise RuntimeError("DiffusionScorer needs a data module with a class_mapping (ScoringDataModule)")
        self.prepare(datamodule.class_mapping.names)

    def score_maps(self, latents: torch.Tensor, labels: torch.Tensor, image_ids: Sequence[str]) -> torch.Tensor:
        """Score maps (B, h, w) of a batch of latents (higher = more class-relevant)."""
        timesteps, noise = draw_image_noise(image_ids, self.seed, self.num_draws, latents.shape[1:], self.t_range,
                                            self.prior.num_train_timesteps, self.stratified_t, latents.device)
        cond = self.prompt_embeddings[labels]
        null = self.prompt_embeddings[-1:].expand_as(cond)
        return relevance_score_map(self._predict_noise, self.prior.add_noise, latents, cond, null, timesteps,
                                   noise.to(latents.dtype))

    def patch_features(self, patches: torch.Tensor, labels: torch.Tensor,
                       keys: Sequence[tuple[str, int]]) -> torch.Tensor:
        """DIFT vectors of the kept patches; each patch's noise is seeded by (seed, image id, patch rank)."""
        seeds = [stable_seed(self.seed, "dift", *key) for key in keys]
        index = labels if self.dift_prompt == "class" else torch.full_like(labels, len(self.prompt_embeddings) - 1)
        return dift_vectors(self.prior, patches, self.prompt_embeddings[index], seeds, self.dift_timestep,
                            self.dift_up_block, self.dift_ensemble, self.dift_batch_size, self._dift_features)

    def predict_step(self, batch: ScoringBatch, batch_idx: int = 0) -> PatchTable:
        """Rows of the score store for one batch: one per (image, kept patch)."""
        if len(batch) == 0:
            return empty_rows()
        prior = self.prior
        latents = prior.encode_images(batch.images.float() / 127.5 - 1)
        maps = self.score_maps(latents, batch.labels, batch.image_ids)
        window = patch_window(self.patch_size, prior.downsample_factor, maps.shape[-2:])
        kept = keep_patches(pool_scores(maps, window).cpu(), window, self.top_k, batch.geometry,
                            prior.downsample_factor)
        patch_size = self.patch_size or batch.images.shape[-1]
        patches = torch.stack([crop_and_resize(batch.originals[p.image].to(self.device, non_blocking=True), p.box,
                                               patch_size) for p in kept])  # on the accelerator: no CPU resampling
        labels = batch.labels[torch.tensor([p.image for p in kept], device=batch.labels.device)]
        features = self.patch_features(patches, labels, [(batch.image_ids[p.image], p.rank) for p in kept])
        return patch_rows(batch, kept, maps.cpu().numpy(), features.cpu().numpy())

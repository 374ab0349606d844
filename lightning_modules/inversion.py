"""D3HR's step 1 as a predict loop: every real image encoded by the DiT prior's VAE, DDIM-inverted with
classifier-free guidance to one timestep, and summed per class into the latent statistics store
(``--stats.dir``, :class:`patchdd.datamodules.score_writer.LatentStatsWriter`).

Run it with ``ScoringDataModule`` and ``max_aspect: 1.0`` (resize the short side, centre-crop a square: D3HR's
``Resize -> CenterCrop``), e.g. ``patchdd predict -c configs/invert/toy_d3hr.yaml``. The posterior sample of each
image is drawn from a generator seeded by (seed, image id), so the statistics do not depend on batching, rank or
resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from patchdd.data.scoring_images import ScoringBatch
from patchdd.formats.latent_stats import ClassSums
from patchdd.generation.group_sampling import derive_seed
from patchdd.generation.sampling import ddim_invert, ddim_schedulers, guided_model
from patchdd.priors.dit import DEFAULT_DIT, LATENT_MODES, DiTPrior, load_dit_prior, weights_hash


class LatentInverter(L.LightningModule):
    """Per-class statistics of DDIM-inverted latents (D3HR).

    Args:
        prior: DiT prior folder (``DiTPipeline`` layout) or hub id (``facebook/DiT-XL-2-256``).
        revision: hub revision of the prior.
        steps: the DDIM grid (50: timesteps 0, 20, ..., 980).
        timestep: invert up to this grid timestep (D3HR: 600, the latent its generation restarts from).
        cfg_scale: classifier-free guidance of the inversion's noise predictions (D3HR: 4).
        cfg_channels: guided latent channels (``None``: all, as D3HR; 3: Meta's DiT).
        skip_first: leave out the t = 0 inversion step, as D3HR's code does (the reference); ``False`` starts from
            abar = 1 (the paper's 31 steps to t = 600).
        latent_mode: ``sample`` the VAE posterior (D3HR) or take its ``mean``.
        seed: seed of the per-image posterior samples.
        meta_dit: compute Meta's DiT (timestep frequencies / 128, LayerNorm eps 1e-6), as D3HR runs
            ``facebook/DiT-XL-2-256``; ``False``: diffusers' variant.
    """

    output_store = "latent_stats"  # what LatentStatsWriter (--stats.dir) writes

    def __init__(self, prior: str = DEFAULT_DIT, revision: str | None = None, steps: int = 50, timestep: int = 600,
                 cfg_scale: float = 4.0, cfg_channels: int | None = None, skip_first: bool = True,
                 latent_mode: str = "sample", seed: int = 0, meta_dit: bool = True) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may get no batch: it finishes cleanly
        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
        self.steps, self.timestep, self.cfg_scale, self.cfg_channels = steps, timestep, cfg_scale, cfg_channels
        self.skip_first, self.latent_mode, self.seed, self.meta_dit = skip_first, latent_mode, seed, meta_dit
        self.dit: DiTPrior = load_dit_prior(prior, revision, meta_dit=meta_dit)
        self.prior_hash = weights_hash(self.dit.transformer)
        self.inverse_scheduler = ddim_schedulers(self.dit.scheduler.config, steps)[1]
        self.model_labels: torch.Tensor | None = None

    def settings(self) -> dict:
        """The inversion settings a statistics store records and checks on resume."""
        return {"prior_hash": self.prior_hash, "steps": self.steps, "timestep": self.timestep,
                "cfg_scale": self.cfg_scale, "cfg_channels": self.cfg_channels, "skip_first": self.skip_first,
                "latent_mode": self.latent_mode, "seed": self.seed, "meta_dit": self.meta_dit}

    def setup(self, stage: str) -> None:
        self.use_classes(self.trainer.datamodule.class_mapping.folders)

    def use_classes(self, folders: Sequence[str]) -> None:
        """Map the data's labels (positions in ``folders``) to the prior's label rows; an unknown class fails."""
        self.model_labels = torch.tensor(self.dit.label_ids(folders))

    def posterior_noise(self, image_ids: list[str]) -> torch.Tensor:
        """Standard normal noise per image, from (seed, image id) alone."""
        shape = self.dit.latent_shape
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(self.seed, i)))
                            for i in image_ids])

    @torch.no_grad()
    def predict_step(self, batch: ScoringBatch, batch_idx: int = 0) -> tuple[ClassSums, list[str]]:
        if len(batch) == 0:
            return ClassSums.empty(), []
        images = batch.images.to(self.device).float() / 127.5 - 1
        noise = self.posterior_noise(batch.image_ids).to(self.device) if self.latent_mode == "sample" else None
        latents = self.dit.encode(images, self.latent_mode, noise)
        labels = self.model_labels.to(self.device)[batch.labels.to(self.device)]
        model_fn = guided_model(self.dit, labels, self.cfg_scale, self.cfg_channels)
        inverted = ddim_invert(model_fn, latents, self.inverse_scheduler, self.timestep, self.skip_first)
        return ClassSums.of(inverted.float(), batch.labels), list(batch.image_ids)

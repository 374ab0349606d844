"""Generation as a predict loop: batches of planned work items (:mod:`patchdd.generation.plan`) -> uint8 images:
DiT sampling (:class:`LatentGenerator`: dit, d3hr, Minimax / self-adaptive-memory priors) and D4M's img2img
(:class:`PromptedImg2Img`); and D4M's encode pass (:class:`PrototypeEncoder`): training images -> the latent cache.

:class:`LatentGenerator` samples each item's latent with a DiT prior under classifier-free guidance, from Gaussian
noise drawn from the item's own seed or from the item's starting latent at a restart timestep (D3HR), and decodes
it. ``patchdd generate`` runs it through ``Trainer.predict`` (bf16 on a GPU, DDP over canonical batches) with
:class:`patchdd.datamodules.generation_data.SyntheticImageWriter` writing the images.
"""

from __future__ import annotations

import lightning as L
import torch
from diffusers import PNDMScheduler

from patchdd.data.scoring_images import ScoringBatch
from patchdd.data.sources import ClassMapping
from patchdd.data.subsets import d4m_label, synset_line
from patchdd.generation.group_sampling import derive_seed
from patchdd.generation.plan import D4MOptions, SamplingOptions, WorkBatch
from patchdd.generation.sampling import (FINAL_STEPS, ancestral_sample, ancestral_scheduler, ddim_sample,
                                         ddim_schedulers, guided_model, restart_index)
from patchdd.priors.dit import DEFAULT_DIT, DiTPrior, encode_scaled, load_dit_prior, load_vae, weights_hash
from patchdd.priors.sd import DEFAULT_PRIOR, load_prior, vae_downsample_factor

SAMPLERS = ("ddim", "ancestral")


class LatentGenerator(L.LightningModule):
    """Class-conditional DiT sampling of planned work items.

    Args:
        prior: DiT prior folder (``DiTPipeline`` layout) or hub id (``facebook/DiT-XL-2-256``).
        sampling: sampler, steps, guidance scale and channels, final alpha (``SamplingOptions``).
        start_timestep: items with a starting latent restart at this grid timestep (D3HR: 600); ``None``: every
            item starts from noise at the first grid timestep.
        restart_offset: restart this many grid steps earlier than ``start_timestep`` (D3HR's code: 1).
        final_steps: DDIM's last steps: ``scheduler`` or ``d3hr_code`` (both end at abar[1], as D3HR's code).
        revision: hub revision of the prior.
        vae: the VAE that decodes the latents: a hub id or folder (``stabilityai/sd-vae-ft-mse``, which Minimax's
            and Li et al.'s ``sample.py`` decode with); ``None``: the prior's own.
        meta_dit: compute Meta's DiT (timestep frequencies / 128, LayerNorm eps 1e-6), as the references run
            ``facebook/DiT-XL-2-256``; ``False``: diffusers' variant.
    """

    def __init__(self, prior: str = DEFAULT_DIT, sampling: SamplingOptions = SamplingOptions(),
                 start_timestep: int | None = None, restart_offset: int = 0, final_steps: str = "scheduler",
                 revision: str | None = None, vae: str | None = None, meta_dit: bool = True) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may get no batch: it finishes cleanly
        if sampling.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampling.sampler!r}")
        if sampling.sampler == "ancestral" and start_timestep is not None:
            raise ValueError("the ancestral sampler starts from noise only (start_timestep must be None)")
        if final_steps not in FINAL_STEPS:
            raise ValueError(f"final_steps must be one of {FINAL_STEPS}, got {final_steps!r}")
        self.sampling, self.final_steps = sampling, final_steps
        self.dit: DiTPrior = load_dit_prior(prior, revision, meta_dit=meta_dit)
        if vae is not None:
            self.dit.vae = load_vae(vae)
        if sampling.sampler == "ancestral" and not self.dit.learns_sigma:
            raise ValueError(f"the ancestral sampler needs a DiT with a learned variance; {prior!r} predicts "
                             "epsilon only (use sampler: ddim)")
        self.scheduler = self.make_scheduler()
        self.start_index = 0 if start_timestep is None else restart_index(self.scheduler, start_timestep,
                                                                          restart_offset)

    def make_scheduler(self):
        config = self.dit.scheduler.config
        if self.sampling.sampler == "ancestral":
            return ancestral_scheduler(config, self.sampling.steps)
        return ddim_schedulers(config, self.sampling.steps, self.sampling.set_alpha_to_one)[0]

    @property
    def start_timestep_used(self) -> int:
        """The timestep sampling starts from (noise: the first of the grid)."""
        return int(self.scheduler.timesteps[self.start_index])

    @torch.no_grad()
    def predict_step(self, batch: WorkBatch, batch_idx: int = 0) -> tuple[torch.Tensor, list]:
        """uint8 images (B, 3, H, W) on the CPU, and the batch's items."""
        generators = [torch.Generator().manual_seed(item.seed) for item in batch.items]
        latents = batch.inits if batch.inits is not None else torch.stack(
            [torch.randn(self.dit.latent_shape, generator=g) for g in generators])
        latents = latents.to(self.device)
        model_fn = guided_model(self.dit, batch.model_labels.to(self.device), self.sampling.cfg_scale,
                                self.sampling.cfg_channels)
        if self.sampling.sampler == "ancestral":  # the items' generators go on drawing the step noise
            latents = ancestral_sample(model_fn, latents, self.scheduler, generators)
        else:
            latents = ddim_sample(model_fn, latents, self.scheduler, self.start_index, self.final_steps)
        return self.dit.decode(latents.float()).cpu(), batch.items


class PrototypeEncoder(L.LightningModule):
    """D4M's encode pass: each training image (squashed by the data module) -> its scaled VAE latent, a posterior
    sample whose noise is seeded by (seed, image id), so a latent depends on its image alone, never on the batch,
    the rank or a resume; written to the latent cache by :class:`patchdd.datamodules.score_writer.LatentCacheWriter`.

    Args:
        vae: the SD-layout prior's VAE.
        latent_mode: ``sample`` the posterior (D4M) or take its ``mean``.
        seed: seed of the posterior samples.
    """

    output_store = "latent_cache"  # what LatentCacheWriter writes

    def __init__(self, vae: torch.nn.Module, latent_mode: str = "sample", seed: int = 0) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may get no batch: it finishes cleanly
        self.vae, self.latent_mode, self.seed = vae, latent_mode, seed

    def settings(self) -> dict:
        """What a cached latent depends on besides its image (compared when a cache is reused)."""
        return {"vae_hash": weights_hash(self.vae), "latent_mode": self.latent_mode, "seed": self.seed}

    @torch.no_grad()
    def predict_step(self, batch: ScoringBatch, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Latents (B, C, h, w) on the CPU in the VAE's dtype (scaled, then rounded: an fp16 VAE gives D4M's fp16
        latents), the labels and the image ids of a batch."""
        if len(batch) == 0:
            return torch.empty(0), torch.empty(0, dtype=torch.long), []
        images = batch.images.to(self.device).float() / 127.5 - 1
        noise = None
        if self.latent_mode == "sample":
            side = batch.images.shape[-1] // vae_downsample_factor(self.vae)
            shape = (int(self.vae.config.latent_channels), side, side)
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "d4m", image_id))) for image_id in batch.image_ids]).to(self.device)
        latents = encode_scaled(self.vae, images, self.latent_mode, noise).to(self.vae.dtype)  # fp16 VAE: as D4M's
        return latents.cpu(), batch.labels, list(batch.image_ids)


class PromptedImg2Img(L.LightningModule):
    """D4M's generation: text-conditioned img2img from each item's starting latent (its class's k-means prototype)
    with an SD-layout prior, through diffusers' ``StableDiffusionImg2ImgPipeline`` (a 4-channel ``image`` is taken as
    latents: nothing is re-encoded), PNDM, classifier-free guidance against a negative prompt.

    Args:
        prior: SD-layout folder or hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``; the toy prior offline).
        options: strength, guidance, steps, prompts (``D4MOptions``).
        revision: hub revision of the prior.
    """

    def __init__(self, prior: str = DEFAULT_PRIOR, options: D4MOptions = D4MOptions(),
                 revision: str | None = None) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may get no batch: it finishes cleanly
        self.options = options
        self.prior = load_prior(prior, revision)
        self.scheduler = PNDMScheduler.from_config(self.prior.scheduler.config, skip_prk_steps=True)
        self.prompts: dict[str, str] = {}
        self._pipeline = None

    def use_classes(self, classes: ClassMapping) -> None:
        """Each class's prompt (``options.prompt_template`` filled with its display name, synset line and D4M
        label line), by class folder."""
        self.prompts = {folder: self.options.prompt_template.format(name=name, synset=synset_line(folder),
                                                                    d4m_label=d4m_label(folder))
                        for folder, name in zip(classes.folders, classes.names)}

    @property
    def start_timestep_used(self) -> int:
        """The timestep img2img starts from, by the pipeline's own rule (strength 0.7 of 50 steps: timesteps[15])."""
        self.scheduler.set_timesteps(self.options.steps)
        timesteps, _ = self.pipeline().get_timesteps(self.options.steps, self.options.strength, "cpu")
        return int(timesteps[0])

    def pipeline(self):
        if self._pipeline is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            prior = self.prior
            self._pipeline = StableDiffusionImg2ImgPipeline(
                vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer, unet=prior.unet,
                scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    @torch.no_grad()
    def predict_step(self, batch: WorkBatch, batch_idx: int = 0) -> tuple[torch.Tensor, list]:
        """uint8 images (B, 3, H, W) on the CPU, and the batch's items."""
        options = self.options
        prompts = [self.prompts[item.folder] for item in batch.items]
        images = self.pipeline()(prompt=prompts, negative_prompt=[options.negative_prompt] * len(prompts),
                                 image=batch.inits.to(self.device), strength=options.strength,
                                 guidance_scale=options.cfg_scale, num_inference_steps=options.steps,
                                 generator=[torch.Generator().manual_seed(item.seed) for item in batch.items],
                                 output_type="pt").images
        return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu(), batch.items

"""Training or fine-tuning the text-conditioned latent diffusion prior that the scoring pass reads.

:class:`DiffusionPrior` trains a ``UNet2DConditionModel`` with the DDPM epsilon-prediction loss on VAE latents
of an ImageFolder data module, conditioned on the class prompts ``"An image of {name}"``; a configurable fraction
of the prompts is replaced by the null prompt ``"An image of ."`` (classifier-free-guidance dropout), so the same
network predicts both the conditional and the unconditional noise, which is what the scoring pass compares.

Each of the five Stable Diffusion components is either loaded from ``pretrained`` (an SD-layout folder or a hub
id: to fine-tune SD v1.5 on a user's data; the VAE and text encoder stay frozen) or built small from a config
(the embedded toy prior, ``configs/prior/toy.yaml``), by the suite's one SD stack (:mod:`patchdd.priors.sd`).
A built VAE is trained first, alone, for ``vae_steps`` steps (reconstruction + KL), then frozen; its latent scale
is then measured on a batch (``1 / std``), as SD's 0.18215 was. The losses are plain functions in
:mod:`patchdd.priors.objectives`.

At the end of ``fit`` the prior is written to ``export_dir`` in the SD layout (:func:`patchdd.priors.sd.save_prior`)
with the ``class_mapping.json`` it was trained on; :func:`export_checkpoint` does the same for any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from patchdd.data.sources import ClassMapping, ImageBatch
from patchdd.priors.objectives import (LOSS_WEIGHTINGS, candidate_prompts, class_prompts, drop_prompts,
                                       latent_scale_of, noise_prediction_loss, prompt_errors, timestep_loss_weights,
                                       to_vae_range, vae_loss)
from patchdd.priors.sd import StableDiffusionPrior, build_prior, encode_latents, encode_prompts, save_prior


class PriorExport:
    """Mixin of the prior trainers: the class mapping travels in checkpoints, and at the end of ``fit`` the prior is
    written to ``hparams.export_dir`` with the trainer's ``save_prior(out)``."""

    class_mapping: ClassMapping | None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["class_mapping"] = self.class_mapping.to_json() if self.class_mapping else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        mapping = checkpoint.get("class_mapping")
        self.class_mapping = ClassMapping.from_json(mapping) if mapping else None

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            out = self.save_prior(self.hparams.export_dir)
            print(f"saved the prior to {out} ({folder_size_mb(out):.1f} MB)")


class DiffusionPrior(PriorExport, L.LightningModule):
    """Text-conditioned latent diffusion prior: epsilon-prediction DDPM training on class prompts.

    Args:
        pretrained: SD-layout folder or hub id; the components without a config below are loaded from it.
        unet: config of the UNet to build (``UNet2DConditionModel`` keyword arguments); ``None`` loads it.
        vae: config of the VAE to build (``AutoencoderKL`` keyword arguments); ``None`` loads it.
        text_encoder: config of the text encoder to build (``CLIPTextConfig``); ``None`` loads it (and its
            tokenizer); a built one gets the offline character-level tokenizer.
        scheduler: config of the noise scheduler (``DDPMScheduler`` keyword arguments); ``None`` loads it.
        prompt_template: class prompt, ``{name}`` is the class's display name from the data module.
        null_prompt: the unconditional prompt.
        null_prompt_fraction: fraction of training prompts replaced by the null prompt.
        prompt_candidates: class prompts tried per validation image for ``val/prompt_accuracy`` (its own and
            others at random; capped at the class count), one UNet batch each.
        loss_weighting: ``"epsilon"`` (DDPM's simple loss) or ``"v"`` (weights ``1 / abar_t``, the v-prediction
            loss on the same epsilon-predicting network).
        max_loss_weight: cap of the ``v`` weights (None: no cap).
        vae_steps: the first steps train the VAE alone (reconstruction + KL); afterwards it is frozen.
        vae_learning_rate: learning rate of a built VAE (``None``: ``learning_rate``).
        kl_weight: weight of the VAE's KL term.
        chroma_weight: extra weight of the colour part of the VAE's reconstruction error.
        train_text_encoder: train a built text encoder with the UNet (a loaded one always stays frozen).
        latent_scale: latent scaling factor; ``None``: the loaded VAE's ``scaling_factor``, or measured as
            ``1 / std`` of the first diffusion batch's latents for a built VAE.
        learning_rate: AdamW learning rate of the UNet (and a trained text encoder).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps after the VAE phase.
        export_dir: where ``fit`` writes the SD-layout folder at its end (``None``: nowhere).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        unet: dict | None = None,
        vae: dict | None = None,
        text_encoder: dict | None = None,
        scheduler: dict | None = None,
        prompt_template: str = "An image of {name}",
        null_prompt: str = "An image of .",
        null_prompt_fraction: float = 0.1,
        prompt_candidates: int = 10,
        loss_weighting: str = "epsilon",
        max_loss_weight: float | None = None,
        vae_steps: int = 0,
        vae_learning_rate: float | None = None,
        kl_weight: float = 1e-6,
        chroma_weight: float = 0.0,
        train_text_encoder: bool = False,
        latent_scale: float | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if prompt_candidates < 1:
            raise ValueError(f"prompt_candidates must be at least 1, got {prompt_candidates}")
        if not 0.0 <= null_prompt_fraction <= 1.0:
            raise ValueError(f"null_prompt_fraction must lie in [0, 1], got {null_prompt_fraction}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if train_text_encoder and text_encoder is None:
            raise ValueError("train_text_encoder needs a built text encoder (a loaded one stays frozen)")
        parts = build_prior(pretrained, unet, vae, text_encoder, scheduler)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.scheduler
        self.text_encoder.requires_grad_(train_text_encoder)
        self.vae.requires_grad_(vae_steps > 0)
        initial_scale = latent_scale or (self.vae.config.scaling_factor if vae is None else 0.0)
        self.register_buffer("latent_scale", torch.tensor(float(initial_scale)))
        self.class_mapping: ClassMapping | None = None
        self.normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._frozen_embeddings: torch.Tensor | None = None

    # --- components and prompts

    @property
    def components(self) -> StableDiffusionPrior:
        """The five SD components (trainable, not copied), the VAE's ``scaling_factor`` set to the latent scale."""
        if self.latent_scale.item() > 0:
            self.vae.register_to_config(scaling_factor=float(self.latent_scale))
        return StableDiffusionPrior(self.unet, self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler,
                                    frozen=False)

    @property
    def prompts(self) -> list[str]:
        """The class prompts in label order, then the null prompt."""
        if self.class_mapping is None:
            raise RuntimeError("the prior has no classes yet: fit it with a data module or load a checkpoint")
        return class_prompts(self.class_mapping.names, self.hparams.prompt_template, self.hparams.null_prompt)

    def prompt_embeddings(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings of the prompts ``prompt_ids`` (indices into :attr:`prompts`, null last)."""
        if self.hparams.train_text_encoder:
            unique, inverse = prompt_ids.unique(return_inverse=True)
            prompts = self.prompts
            return encode_prompts(self.text_encoder, self.tokenizer, [prompts[i] for i in unique.tolist()])[inverse]
        if self._frozen_embeddings is None or self._frozen_embeddings.device != self.device:
            with torch.no_grad():
                self._frozen_embeddings = encode_prompts(self.text_encoder, self.tokenizer, self.prompts)
        return self._frozen_embeddings[prompt_ids]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents (the posterior mean) of data-module images."""
        with torch.no_grad():
            latents = encode_latents(self.vae, self._vae_input(images))
        if self.latent_scale.item() <= 0:
            self.latent_scale.fill_(latent_scale_of(latents))
        return latents * self.latent_scale

    def _vae_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalisation is None:
            raise RuntimeError("the prior needs the data module's mean / std: attach it with a data module")
        return to_vae_range(images, *self.normalisation)

    def in_vae_phase(self) -> bool:
        return self.global_step < self.hparams.vae_steps

    # --- Lightning hooks

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("DiffusionPrior needs a data module with `class_mapping`, `mean` and `std`")
        mapping = datamodule.class_mapping
        if self.class_mapping is not None and self.class_mapping != mapping:
            raise ValueError(f"the prior was trained on classes {self.class_mapping.names}, "
                             f"the data module has {mapping.names}")
        self.class_mapping = mapping
        self.normalisation = (tuple(datamodule.mean), tuple(datamodule.std))

    def training_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor | None:
        if batch.images.numel() == 0:
            return None
        if self.in_vae_phase():
            loss = vae_loss(self.vae, self._vae_input(batch.images), self.hparams.kl_weight,
                            self.hparams.chroma_weight)
            self.log("train/vae_loss", loss, prog_bar=True, batch_size=len(batch.labels))
            return loss
        self.vae.requires_grad_(False)
        latents = self.encode_images(batch.images)
        null_id = len(self.class_mapping)
        prompt_ids = drop_prompts(batch.labels, null_id, self.hparams.null_prompt_fraction)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=self.device)
        weights = timestep_loss_weights(self.noise_scheduler, timesteps, self.hparams.loss_weighting,
                                        self.hparams.max_loss_weight)
        loss = noise_prediction_loss(self.unet, self.noise_scheduler, latents, self.prompt_embeddings(prompt_ids),
                                     noise, timesteps, weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch.labels))
        return loss

    def validation_step(self, batch: ImageBatch, batch_idx: int) -> None:
        """VAE phase: reconstruction error. Then: conditional loss, text gain and prompt accuracy.

        ``val/text_gain`` is the null prompt's error minus the class prompt's (what the scoring pass measures);
        ``val/prompt_accuracy`` the fraction of images whose own class prompt gives a lower error than
        ``prompt_candidates - 1`` other class prompts drawn at random (the prior used as a classifier; chance is
        1 / prompt_candidates when it ignores the prompt).
        """
        if batch.images.numel() == 0:
            return
        size = len(batch.labels)
        if self.in_vae_phase():
            loss = vae_loss(self.vae, self._vae_input(batch.images), self.hparams.kl_weight,
                            self.hparams.chroma_weight)
            self.log("val/vae_loss", loss, batch_size=size)
            return
        latents = self.encode_images(batch.images)
        generator = torch.Generator(device="cpu").manual_seed(batch_idx)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,),
                                  generator=generator).to(self.device)
        count = min(self.hparams.prompt_candidates, len(self.class_mapping))
        candidates = candidate_prompts(batch.labels, len(self.class_mapping), count, generator)
        null = torch.full_like(batch.labels, len(self.class_mapping)).view(-1, 1)
        errors = prompt_errors(self.unet, self.noise_scheduler, latents,
                               self.prompt_embeddings(torch.cat([candidates, null], dim=1)), noise, timesteps)
        own, others, null_errors = errors[:, 0], errors[:, 1:-1], errors[:, -1]
        self.log("val/loss", own.mean(), prog_bar=True, batch_size=size)
        self.log("val/text_gain", (null_errors - own).mean(), prog_bar=True, batch_size=size)
        if count > 1:
            accuracy = (own < others.min(dim=1).values).float().mean()  # a tie (a prompt-blind UNet) counts as wrong
            self.log("val/prompt_accuracy", accuracy, prog_bar=True, batch_size=size)

    def configure_optimizers(self):
        """AdamW; the VAE group at a constant rate, the rest warmed up linearly from the end of the VAE phase."""
        vae_params = [p for p in self.vae.parameters() if p.requires_grad]
        vae_ids = {id(p) for p in vae_params}
        other_params = [p for p in self.parameters() if p.requires_grad and id(p) not in vae_ids]
        vae_rate = self.hparams.vae_learning_rate or self.hparams.learning_rate
        groups = [{"params": other_params}] + ([{"params": vae_params, "lr": vae_rate}] if vae_params else [])
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        start, warmup = self.hparams.vae_steps, max(1, self.hparams.warmup_steps)
        lambdas = [lambda step: min(1.0, max(0, step + 1 - start) / warmup), lambda step: 1.0][: len(groups)]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def save_prior(self, out: str | Path) -> Path:
        """Write the prior in the SD layout, with the class mapping it was trained on."""
        return save_prior(out, self.components, self.class_mapping)


def folder_size_mb(folder: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def export_checkpoint(checkpoint: str, out: str) -> Path:
    """Write the diffusion prior of a Lightning checkpoint as a Stable-Diffusion-layout folder."""
    prior = DiffusionPrior.load_from_checkpoint(checkpoint, map_location="cpu")
    return prior.save_prior(out)

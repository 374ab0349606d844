"""Training or fine-tuning the text-conditioned latent diffusion prior that the scoring pass reads.

:class:`DiffusionPrior` trains a ``UNet2DConditionModel`` with the DDPM epsilon-prediction loss on VAE latents
of an ImageFolder data module, conditioned on the class prompts ``"An image of {name}"``; a configurable fraction
of the prompts is replaced by the null prompt ``"An image of ."`` (classifier-free-guidance dropout), so the same
network predicts both the conditional and the unconditional noise, which is what the scoring pass compares.

Each of the five Stable Diffusion components is either loaded from ``pretrained`` (an SD-layout folder or a hub
id: to fine-tune SD v1.5 on a user's data; the VAE and text encoder stay frozen) or built small from a config
(the embedded toy prior, ``configs/prior/toy.yaml``). A built text encoder gets the character-level
CLIP tokenizer that needs no download (:func:`lightning_modules.diffusion.character_tokenizer`). A built VAE is trained
first, alone, for ``vae_steps`` steps (reconstruction + KL), then frozen; its latent scale is then measured on
a batch (``1 / std``), as SD's 0.18215 was.

Images: the data module normalises with its own ``mean`` / ``std``; the module undoes that and maps the pixels to
``[-1, 1]`` (the VAE's range, :func:`to_vae_range`), so any data-module setting works. Latents are the VAE's
``latent_dist.mean`` times the latent scale, as in the scoring pass.

At the end of ``fit`` the prior is written to ``export_dir`` in the SD layout (:func:`save_sd_folder`:
``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json`` plus the ``class_mapping.json`` it was
trained with); :func:`export_checkpoint` does the same for any saved checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from datamodules.real import CLASS_MAPPING_FILE, ClassMapping, ImageBatch
from lightning_modules.diffusion import character_tokenizer

PIPELINE_CLASS = "StableDiffusionPipeline"
MODEL_INDEX = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


class PriorLoadError(RuntimeError):
    """A Stable Diffusion component that can be neither built (no config) nor loaded (no local or hub copy)."""


@dataclass
class SDComponents:
    """The five parts of a Stable-Diffusion-format prior."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler


# ----------------------------------------------------------------------------------------------- conditioning


def class_prompts(names: list[str] | tuple[str, ...], template: str, null_prompt: str) -> list[str]:
    """The prompt of every class (``template`` formatted with ``name``), followed by the null prompt."""
    if "{name}" not in template:
        raise ValueError(f"prompt template must contain '{{name}}', got {template!r}")
    return [template.format(name=name) for name in names] + [null_prompt]


def drop_prompts(prompt_ids: torch.Tensor, null_id: int, fraction: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each prompt id by ``null_id`` with probability ``fraction`` (classifier-free-guidance dropout)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"null-prompt fraction must lie in [0, 1], got {fraction}")
    drop = torch.rand(prompt_ids.shape, generator=generator, device=prompt_ids.device) < fraction
    return torch.where(drop, torch.full_like(prompt_ids, null_id), prompt_ids)


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Per-token text embeddings ``(P, L, D)`` (the encoder's last hidden state), prompts padded to the max length."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0]


# --------------------------------------------------------------------------------------------------- losses


def to_vae_range(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo a data module's ``Normalize(mean, std)`` and map the pixels from ``[0, 1]`` to ``[-1, 1]``."""
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images * std_t + mean_t) * 2 - 1


LOSS_WEIGHTINGS = ("epsilon", "v")


def timestep_loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, weighting: str = "epsilon",
                          max_weight: float | None = None) -> torch.Tensor:
    """Per-sample weights of the epsilon loss at ``timesteps``.

    ``"epsilon"``: 1 (DDPM's simple loss). ``"v"``: ``1 / abar_t = 1 + 1 / SNR_t``, which makes the epsilon loss
    equal to the v-prediction loss; it weights the noisy end, where the prompt is the main source of information,
    up to ~200x. ``max_weight`` caps the weights.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if weighting == "epsilon":
        weights = torch.ones(timesteps.shape, device=timesteps.device)
    else:
        weights = 1.0 / scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return weights if max_weight is None else weights.clamp_max(max_weight)


def noise_prediction_loss(unet: nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                          text_embeddings: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM epsilon-prediction loss: mean of ``w_t (unet(add_noise(z, eps, t), t, text) - eps)^2`` (w = 1 if None)."""
    errors = noise_prediction_errors(unet, scheduler, latents, text_embeddings, noise, timesteps)
    per_sample = errors.flatten(1).mean(1)
    return per_sample.mean() if weights is None else (per_sample * weights).mean()


def noise_prediction_errors(unet: nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                            text_embeddings: torch.Tensor, noise: torch.Tensor,
                            timesteps: torch.Tensor) -> torch.Tensor:
    """Squared errors ``(B, C, h, w)`` of the UNet's noise prediction, in fp32."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"the prior predicts epsilon; scheduler says {scheduler.config.prediction_type!r}")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    predicted = unet(noisy, timesteps, encoder_hidden_states=text_embeddings).sample
    return (predicted.float() - noise.float()).square()


def candidate_prompts(labels: torch.Tensor, num_classes: int, count: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, count)`` class prompt ids per image: its own class first, then ``count - 1`` other classes at random."""
    if not 1 <= count <= num_classes:
        raise ValueError(f"prompt candidates must lie in [1, {num_classes}] (the class count), got {count}")
    draws = torch.rand((len(labels), num_classes), generator=generator).to(labels.device)
    draws.scatter_(1, labels.view(-1, 1), -1.0)  # the own class sorts first
    return draws.argsort(dim=1)[:, :count]


def prompt_errors(unet: nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, embeddings: torch.Tensor,
                  noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared noise-prediction error ``(B, P)`` of every image under each of its ``P`` prompts.

    ``embeddings`` is ``(B, P, L, D)``: prompt ``p`` of image ``b``. All prompts of an image see the same noisy
    latent (same t and eps); one UNet batch of B per prompt.
    """
    return torch.stack([noise_prediction_errors(unet, scheduler, latents, embeddings[:, p], noise, timesteps)
                        .flatten(1).mean(1) for p in range(embeddings.shape[1])], dim=1)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, chroma_weight: float = 0.0) -> torch.Tensor:
    """Pixel MSE plus ``chroma_weight`` times the MSE of the colour part of the error (its deviation from the
    per-pixel mean over RGB): small autoencoders learn brightness long before colour, which can carry the class."""
    error = reconstruction - images
    loss = error.square().mean()
    if chroma_weight:
        loss = loss + chroma_weight * (error - error.mean(dim=1, keepdim=True)).square().mean()
    return loss


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, chroma_weight: float = 0.0) -> torch.Tensor:
    """Reconstruction loss of a sampled latent plus ``kl_weight`` times the KL to the unit Gaussian (per element)."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    return (reconstruction_loss(reconstruction, images, chroma_weight)
            + kl_weight * posterior.kl().mean() / posterior.mean[0].numel())


def latent_scale_of(latents: torch.Tensor) -> float:
    """The factor that gives the latents unit standard deviation (SD's ``scaling_factor``)."""
    return 1.0 / latents.float().std().clamp_min(1e-6).item()


# ------------------------------------------------------------------------------------------ build / load / save


def build_or_load(pretrained: str | None, unet: dict | None, vae: dict | None, text_encoder: dict | None,
                  scheduler: dict | None) -> SDComponents:
    """Each component from its config when given, otherwise from ``pretrained`` (SD-layout folder or hub id)."""
    if text_encoder is not None:
        encoder = CLIPTextModel(CLIPTextConfig(**text_encoder))
        tokenizer = character_tokenizer(encoder.config.max_position_embeddings)
    else:
        encoder = load_component(CLIPTextModel, pretrained, "text_encoder")
        tokenizer = load_component(CLIPTokenizer, pretrained, "tokenizer")
    return SDComponents(
        unet=UNet2DConditionModel.from_config(unet) if unet is not None
        else load_component(UNet2DConditionModel, pretrained, "unet"),
        vae=AutoencoderKL.from_config(vae) if vae is not None else load_component(AutoencoderKL, pretrained, "vae"),
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_config(scheduler) if scheduler is not None
        else load_component(DDPMScheduler, pretrained, "scheduler"),
    )


def load_component(cls: Any, pretrained: str | None, subfolder: str) -> Any:
    """``cls.from_pretrained(pretrained, subfolder=...)`` with one clear error when it cannot be had."""
    if pretrained is None:
        raise PriorLoadError(f"no config for the {subfolder} and no `pretrained` folder / hub id to load it from")
    try:
        return cls.from_pretrained(pretrained, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise PriorLoadError(
            f"cannot load the {subfolder} of {pretrained!r}: not a local SD-layout folder and not in the hub cache "
            f"(offline?) ({err})") from err


def save_sd_folder(out: str | Path, parts: SDComponents, class_mapping: ClassMapping | None = None) -> Path:
    """Write ``parts`` in the Stable Diffusion layout (``save_pretrained`` per component + ``model_index.json``)."""
    import diffusers

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(parts, name).save_pretrained(root / name)
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__, **MODEL_INDEX,
             "requires_safety_checker": False}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    if class_mapping is not None:
        class_mapping.save(root / CLASS_MAPPING_FILE)
    return root


# ------------------------------------------------------------------------------------------- the Lightning module


class DiffusionPrior(L.LightningModule):
    """Text-conditioned latent diffusion prior: epsilon-prediction DDPM training on class prompts.

    Args:
        pretrained: SD-layout folder or hub id; the components without a config below are loaded from it.
        unet, vae, text_encoder, scheduler: configs of the components to build (``UNet2DConditionModel``,
            ``AutoencoderKL``, ``CLIPTextConfig`` and ``DDPMScheduler`` keyword arguments); ``None`` loads it.
        prompt_template: class prompt, ``{name}`` is the class's display name from the data module.
        null_prompt: the unconditional prompt.
        null_prompt_fraction: fraction of training prompts replaced by the null prompt.
        prompt_candidates: class prompts tried per validation image for ``val/prompt_accuracy`` (its own and
            others at random; capped at the class count), one UNet batch each.
        loss_weighting: ``"epsilon"`` (DDPM's simple loss) or ``"v"`` (weights ``1 / abar_t``, the v-prediction
            loss on the same epsilon-predicting network); ``max_loss_weight`` caps the weights.
        vae_steps: the first steps train the VAE alone (reconstruction + KL); afterwards it is frozen.
        vae_learning_rate: learning rate of a built VAE (``None``: ``learning_rate``).
        kl_weight: weight of the VAE's KL term.
        chroma_weight: extra weight of the colour part of the VAE's reconstruction error.
        train_text_encoder: train a built text encoder with the UNet (a loaded one always stays frozen).
        latent_scale: latent scaling factor; ``None``: the loaded VAE's ``scaling_factor``, or measured as
            ``1 / std`` of the first diffusion batch's latents for a built VAE.
        learning_rate, weight_decay, warmup_steps: AdamW with a linear warm-up.
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
        parts = build_or_load(pretrained, unet, vae, text_encoder, scheduler)
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
    def components(self) -> SDComponents:
        """The five SD components, the VAE's ``scaling_factor`` set to the latent scale in use."""
        if self.latent_scale.item() > 0:
            self.vae.register_to_config(scaling_factor=float(self.latent_scale))
        return SDComponents(self.unet, self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler)

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
            latents = self.vae.encode(self._vae_input(images)).latent_dist.mean
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["class_mapping"] = self.class_mapping.to_json() if self.class_mapping else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        mapping = checkpoint.get("class_mapping")
        self.class_mapping = ClassMapping.from_json(mapping) if mapping else None

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            out = self.save_sd_folder(self.hparams.export_dir)
            print(f"saved the diffusion prior to {out} ({folder_size_mb(out):.1f} MB)")

    def save_sd_folder(self, out: str | Path) -> Path:
        """Write the prior in the SD layout, with the class mapping it was trained on."""
        return save_sd_folder(out, self.components, self.class_mapping)


def folder_size_mb(folder: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def export_checkpoint(checkpoint: str, out: str) -> Path:
    """Write the diffusion prior of a Lightning checkpoint as a Stable-Diffusion-layout folder."""
    prior = DiffusionPrior.load_from_checkpoint(checkpoint, map_location="cpu")
    return prior.save_sd_folder(out)

"""The training objectives of the text-conditioned latent diffusion prior, as plain functions on tensors.

Prompts (class prompts, classifier-free-guidance dropout, candidate prompts for the prompt-accuracy metric),
the DDPM epsilon-prediction loss and its timestep weighting, the VAE's reconstruction + KL loss and the latent
scale. :class:`patchdd.lightning_modules.diffusion_prior.DiffusionPrior` wires them into a training loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from patchdd.data.pixels import denormalize

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler

LOSS_WEIGHTINGS = ("epsilon", "v")


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


def to_vae_range(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo a data module's ``Normalize(mean, std)`` and map the pixels from ``[0, 1]`` to ``[-1, 1]``."""
    return denormalize(images, mean, std) * 2 - 1


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

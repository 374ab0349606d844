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


# --------------------------------------------------------------------- the learned-variance (IDDPM hybrid) term


def normal_kl(mean_a: torch.Tensor, log_var_a: torch.Tensor, mean_b: torch.Tensor,
              log_var_b: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_a, exp(log_var_a)) || N(mean_b, exp(log_var_b))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var_b - log_var_a + torch.exp(log_var_a - log_var_b)
                  + (mean_a - mean_b) ** 2 * torch.exp(-log_var_b))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` (in [-1, 1], 256 bins) under a Gaussian discretised to those bins, elementwise
    (IDDPM's decoder term; DiT applies it to latents as they are)."""

    def cdf(value: torch.Tensor) -> torch.Tensor:  # the tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (value + 0.044715 * value**3)))

    centred, inverse_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inverse_std * (centred + 1.0 / 255)), cdf(inverse_std * (centred - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def variational_bound_terms(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noisy: torch.Tensor,
                            timesteps: torch.Tensor, eps: torch.Tensor, variance_values: torch.Tensor) -> torch.Tensor:
    """IDDPM's L_vlb per sample, in bits (the term that trains a learned-range variance, ``loss = mse + vb``).

    At t > 0 the KL between the true posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian; at t = 0 the
    discretised decoder's negative log-likelihood. The model's mean comes from ``eps``, which the caller detaches
    (the term trains only the variance), its log-variance interpolates log(beta_t) and the clipped posterior
    log-variance by ``(variance_values + 1) / 2``.
    """
    shape = (-1,) + (1,) * (latents.dim() - 1)
    abar = alphas_cumprod.to(latents.device).double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = 1 - abar / abar_prev
    posterior = beta * (1 - abar_prev) / (1 - abar)
    posterior_log_clipped = torch.log(torch.cat([posterior[1:2], posterior[1:]]))
    coef_x0 = beta * abar_prev.sqrt() / (1 - abar)
    coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)

    def at(values: torch.Tensor) -> torch.Tensor:
        return values[timesteps].view(shape).to(latents.dtype)

    true_mean = at(coef_x0) * latents + at(coef_xt) * noisy
    predicted_x0 = (noisy - at((1 - abar).sqrt()) * eps) / at(abar.sqrt())
    model_mean = at(coef_x0) * predicted_x0 + at(coef_xt) * noisy
    fraction = (variance_values + 1) / 2
    model_log_var = fraction * at(torch.log(beta)) + (1 - fraction) * at(posterior_log_clipped)
    kl = normal_kl(true_mean, at(posterior_log_clipped), model_mean, model_log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(latents, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
    return torch.where(timesteps == 0, nll, kl) / torch.log(torch.tensor(2.0))

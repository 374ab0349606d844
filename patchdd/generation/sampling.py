"""Sampling primitives of the generative methods: plain functions on tensors, built on diffusers' schedulers.

* :func:`guided_output`: classifier-free guidance with the conditional and null passes in one batch of 2B;
* :func:`ddim_sample`: deterministic DDIM (``DDIMScheduler``, eta 0) from any start index of its grid, or with
  D3HR's code's final steps (:data:`FINAL_STEPS`);
* :func:`ddim_invert`: DDIM inversion (``DDIMInverseScheduler``) up to a timestep, D3HR's step 1;
* :func:`restart_index`: where a latent inverted to ``t`` re-enters the sampling grid (D3HR's off-by-one option);
* :func:`ancestral_sample`: the learned-range DDPM sampler of DiT / Minimax (``DDPMScheduler``);
* :func:`predicted_x0`: the clean latent a noise prediction implies.

``model_fn(z, t)`` is any callable returning the model output for latents ``z`` at the integer timestep ``t``
(a tensor of shape (B,)): a :func:`guided_output` closure over a DiT, or an analytic model in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# How DDIM's last steps end: the scheduler's (t = 20 -> 0, then t = 0 -> abar = 1, or abar[0]), or D3HR's code's
# hand-written step, which aims every step at abar[max(1, t - stride)]: both its t = 20 and t = 0 steps end at abar[1].
FINAL_STEPS = ("scheduler", "d3hr_code")


def ddim_schedulers(config, steps: int, set_alpha_to_one: bool = True):
    """A ``DDIMScheduler`` (eta 0) and a ``DDIMInverseScheduler`` on the same ``steps``-step grid of a prior's
    noise schedule: "leading" spacing with no offset (50 steps: 980, 960, ..., 0), no clipping of x0 (latents are
    not bounded; diffusers' DDIM clips by default). ``set_alpha_to_one``: the last sampling step (and the first
    inversion step) ends (starts) at abar = 1, the clean latent."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    common = {"clip_sample": False, "steps_offset": 0, "timestep_spacing": "leading",
              "set_alpha_to_one": set_alpha_to_one}
    forward = DDIMScheduler.from_config(config, **common)
    inverse = DDIMInverseScheduler.from_config(config, **common)
    forward.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return forward, inverse


def ancestral_scheduler(config, steps: int):
    """DiT's ancestral sampler as a ``DDPMScheduler``: learned-range variance, ``steps`` timesteps spaced as
    IDDPM respaces them (linspace: 999, 979, ..., 0 at 50), no clipping."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(config, variance_type="learned_range", clip_sample=False,
                                          timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    return scheduler


def guided_output(transformer: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                  null_id: int, scale: float, channels: int | None = None) -> torch.Tensor:
    """The DiT's output under classifier-free guidance: ``uncond + scale * (cond - uncond)`` on the first
    ``channels`` output channels (``None``: all of the latent channels; Meta's DiT and Minimax guide 3), the
    conditional output elsewhere (the other latent channels, a learned variance). Scale 1 runs the conditional
    pass only. The transformer runs in its own dtype (fp16 under ``16-true``); the output is fp32."""
    dtype = next(transformer.parameters()).dtype
    if scale == 1.0:
        return transformer(latents.to(dtype), timesteps, labels, return_dict=False)[0].float()
    null = torch.full_like(labels, null_id)
    output = transformer(torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]),
                         torch.cat([labels, null]), return_dict=False)[0].float()
    conditional, unconditional = output.chunk(2)
    guided = channels if channels is not None else latents.shape[1]
    mixed = unconditional[:, :guided] + scale * (conditional[:, :guided] - unconditional[:, :guided])
    return torch.cat([mixed, conditional[:, guided:]], dim=1)


def guided_model(prior, labels: torch.Tensor, scale: float, channels: int | None = None) -> ModelFn:
    """``model_fn(z, t)`` of a DiT prior (transformer + null id) under guidance for fixed labels."""

    def model_fn(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return guided_output(prior.transformer, latents, timesteps, labels, prior.null_id, scale, channels)

    return model_fn


def epsilon_of(output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """The noise prediction of a model output (its first ``latent_channels``; the rest is a learned variance)."""
    return output[:, :latent_channels]


def _batch_timesteps(t: torch.Tensor | int, latents: torch.Tensor) -> torch.Tensor:
    return torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)


def ddim_step(latents: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor,
              abar_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from abar_t to abar_prev: sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
    x0 = (latents - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def ddim_sample(model_fn: ModelFn, latents: torch.Tensor, scheduler, start_index: int = 0,
                final_steps: str = "scheduler") -> torch.Tensor:
    """Run ``scheduler`` (a ``DDIMScheduler`` after ``set_timesteps``, eta 0) from ``timesteps[start_index]``
    to the end: noise (index 0) or a partly noised latent -> clean latent. ``final_steps="d3hr_code"`` takes
    every step by hand towards abar[max(1, t - stride)], as D3HR's code does (identical to the scheduler's steps
    down to t = 40; its t = 20 and t = 0 steps both end at abar[1])."""
    if final_steps not in FINAL_STEPS:
        raise ValueError(f"final_steps must be one of {FINAL_STEPS}, got {final_steps!r}")
    channels = latents.shape[1]
    abar = scheduler.alphas_cumprod.to(latents.device)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for t in scheduler.timesteps[start_index:]:
        eps = epsilon_of(model_fn(latents, _batch_timesteps(t, latents)), channels)
        if final_steps == "scheduler":
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        else:
            latents = ddim_step(latents, eps, abar[int(t)], abar[max(1, int(t) - stride)])
    return latents


def ddim_invert(model_fn: ModelFn, latents: torch.Tensor, inverse_scheduler, upto: int,
                skip_first: bool = False) -> torch.Tensor:
    """Invert clean latents to timestep ``upto`` with ``inverse_scheduler`` (a ``DDIMInverseScheduler`` after
    ``set_timesteps``): each step moves from abar[t - step] (1 before the first) to abar[t], with the noise
    predicted at ``t`` on the current latent. ``skip_first`` leaves out the t = 0 step (D3HR's code, which takes
    the clean latent as the abar[0] sample)."""
    timesteps = [int(t) for t in inverse_scheduler.timesteps if int(t) <= upto]
    if not timesteps or timesteps[-1] != upto:
        raise ValueError(f"timestep {upto} is not on the inversion grid {inverse_scheduler.timesteps.tolist()[:5]}...")
    channels = latents.shape[1]
    for t in timesteps[1:] if skip_first else timesteps:
        eps = epsilon_of(model_fn(latents, _batch_timesteps(t, latents)), channels)
        latents = inverse_scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


def restart_index(scheduler, t: int, offset: int = 0) -> int:
    """The index of timestep ``t`` in the sampling grid, minus ``offset``: 0 restarts a latent inverted to ``t``
    at ``t`` (aligned); 1 is D3HR's code, which treats it as the sample of the next-noisier grid timestep."""
    matches = (scheduler.timesteps == t).nonzero()
    if len(matches) == 0:
        raise ValueError(f"timestep {t} is not on the sampling grid {scheduler.timesteps.tolist()[:5]}...")
    index = int(matches[0]) - offset
    if index < 0:
        raise ValueError(f"restart offset {offset} runs past the start of the grid at timestep {t}")
    return index


def ancestral_sample(model_fn: ModelFn, latents: torch.Tensor, scheduler,
                     generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """DDPM ancestral sampling with ``scheduler`` (a ``DDPMScheduler`` after ``set_timesteps``; with
    ``variance_type="learned_range"`` the model's second half of channels sets the variance, as DiT samples).
    ``generators`` (one per latent) make each latent's noise independent of the batch it runs in."""
    for t in scheduler.timesteps:
        output = model_fn(latents, _batch_timesteps(t, latents))
        latents = scheduler.step(output, t, latents, generator=list(generators) if generators else None,
                                 return_dict=False)[0]
    return latents


def predicted_x0(alphas_cumprod: torch.Tensor, latents: torch.Tensor, eps: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), per latent of the batch."""
    abar = alphas_cumprod.to(latents.device)[timesteps].view(-1, *([1] * (latents.dim() - 1)))
    return (latents - (1 - abar).sqrt() * eps) / abar.sqrt()

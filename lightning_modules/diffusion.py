"""The Stable-Diffusion-v1-format prior used by Stage I: loading, prompt embeddings, and the DIFT feature hook.

A prior is a hub id (default ``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local folder in the layout
``save_pretrained`` writes: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``. Every
component is frozen and in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

DEFAULT_PRIOR = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PriorUnavailableError(RuntimeError):
    """The diffusion prior is neither a complete local folder nor obtainable from the hub."""


class StableDiffusionPrior(nn.Module):
    """UNet, VAE, text encoder, tokenizer and DDPM noise scheduler of one SD-v1-format model, frozen."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 name: str = "") -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler, self.name = tokenizer, scheduler, name
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "StableDiffusionPrior":
        """A frozen prior stays in eval mode whatever the trainer asks."""
        return super().train(False)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side, from the VAE's config (8 for SD v1)."""
        return vae_downsample_factor(self.vae)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (fp32) of images in [-1, 1]: the VAE posterior mean times the scaling factor (deterministic)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.mean.float() * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
        """Text-encoder hidden states (P, L, D) of the prompts, padded to the encoder's context length (77 for SD)."""
        device = next(self.text_encoder.parameters()).device
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        outputs = []
        for start in range(0, len(prompts), chunk):
            tokens = self.tokenizer(list(prompts[start:start + chunk]), padding="max_length", truncation=True,
                                    max_length=length, return_tensors="pt")
            outputs.append(self.text_encoder(tokens.input_ids.to(device))[0])
        return torch.cat(outputs)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, the scheduler's forward process (in the latents' dtype)."""
        return self.scheduler.add_noise(latents, noise, timesteps)


def vae_downsample_factor(vae: nn.Module) -> int:
    """2^(number of VAE blocks - 1): the VAE halves the resolution in every block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_prior(prior: str = DEFAULT_PRIOR, revision: str | None = None,
               local_files_only: bool | None = None) -> StableDiffusionPrior:
    """Load a prior from a local SD-layout folder or a hub id (``local_files_only`` defaults to HF_HUB_OFFLINE).

    Raises :class:`PriorUnavailableError` naming the prior when it cannot be loaded (a folder missing a component,
    or a hub id with no network and no cached copy).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(prior).expanduser()
    is_folder = path.is_dir()
    if is_folder:
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise PriorUnavailableError(f"diffusion prior folder {path} lacks the component folders {missing} "
                                        f"(expected {', '.join(COMPONENTS)}, as save_pretrained writes them)")
    source = str(path) if is_folder else prior
    offline = _is_offline() if local_files_only is None else local_files_only
    kwargs = {"revision": revision, "local_files_only": offline or is_folder}
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
            "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
        }
    except (OSError, ValueError) as err:  # hub / cache errors are OSError subclasses
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        where = f"the local folder {path}" if is_folder else (
            f"the hub id {prior!r}" + (" (offline, and no cached copy exists)" if offline else ""))
        raise PriorUnavailableError(
            f"cannot load the diffusion prior from {where}: {reason}. "
            "Pass --model.prior with a local folder holding unet/ vae/ text_encoder/ tokenizer/ scheduler/, "
            "or run once with network access to fill the Hugging Face cache.") from None
    return StableDiffusionPrior(**parts, name=prior)


def character_tokenizer(max_length: int = 77):
    """An offline CLIP tokenizer with one token per byte and no merges: it encodes any text, for priors with
    random weights (tests, benchmarks) where the real 49,408-token vocabulary is neither available nor needed."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {s: i + 2 for i, s in enumerate(symbols)}
    vocab |= {s + "</w>": i + 2 + len(symbols) for i, s in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def random_prior(unet: dict, vae: dict, text_encoder: dict, max_tokens: int = 77, seed: int = 0,
                 name: str = "random") -> StableDiffusionPrior:
    """A prior with random weights built from architecture configs (``configs/bench/sd15_random.yaml``), with the
    offline character tokenizer and a default DDPM scheduler: for benchmarks and tests, nothing downloaded."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **text_encoder)
    return StableDiffusionPrior(UNet2DConditionModel(**unet), AutoencoderKL(**vae), CLIPTextModel(text_config),
                                character_tokenizer(max_tokens), DDPMScheduler(), name=name)


class _StopForward(Exception):
    """Raised from a forward hook to end a UNet pass once the wanted block has run."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Inside this context a forward pass that reaches ``module`` ends there, raising with its output."""

    def hook(_module, _inputs, output):
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def up_block_features(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                      text_embeddings: torch.Tensor, up_block: int) -> torch.Tensor:
    """Output of ``unet.up_blocks[up_block]`` (after its upsampler, as DIFT takes it); later blocks never run."""
    with stop_after(unet.up_blocks[up_block]):
        try:
            unet(sample, timesteps, encoder_hidden_states=text_embeddings, return_dict=False)
        except _StopForward as stop:
            return stop.output
    raise RuntimeError(f"the UNet forward pass never reached up_blocks[{up_block}]")

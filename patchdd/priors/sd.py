"""The one Stable-Diffusion-v1-format stack of the suite: build, load, save, encode, and the DIFT feature hook.

A prior is five components: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``, the layout diffusers'
``save_pretrained`` writes. :func:`load_prior` reads them from a hub id (default
``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local folder, frozen, for the scoring pass;
:func:`build_prior` builds each component from its config or loads it, trainable, for the prior trainer
(:class:`patchdd.lightning_modules.diffusion_prior.DiffusionPrior`) and for random-weight benchmarks;
:func:`save_prior` writes a prior through ``StableDiffusionPipeline.save_pretrained``. Every failure to obtain a
component is one :class:`~patchdd.errors.PriorUnavailableError` naming it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from patchdd.data.sources import CLASS_MAPPING_FILE, ClassMapping
from patchdd.errors import PriorUnavailableError

DEFAULT_PRIOR = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class FreezablePrior(nn.Module):
    """A prior that, once :meth:`set_frozen` froze it, has no trainable parameter and stays in eval mode whatever
    a trainer asks."""

    frozen = False

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or not) the prior; called once its components are set."""
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "FreezablePrior":
        return super().train(mode and not self.frozen)


class StableDiffusionPrior(FreezablePrior):
    """UNet, VAE, text encoder, tokenizer and DDPM noise scheduler of one SD-v1-format model.

    A ``frozen`` prior (the default: the scoring pass) has no trainable parameter and stays in eval mode whatever
    a trainer asks.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 name: str = "", frozen: bool = True) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler, self.name = tokenizer, scheduler, name
        self.set_frozen(frozen)

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
        return encode_latents(self.vae, images) * float(self.vae.config.scaling_factor)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``(P, L, D)`` of the prompts (see :func:`encode_prompts`)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, the scheduler's forward process (in the latents' dtype)."""
        return self.scheduler.add_noise(latents, noise, timesteps)


def vae_downsample_factor(vae: nn.Module) -> int:
    """2^(number of VAE blocks - 1): the VAE halves the resolution in every block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_latents(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The VAE posterior mean (fp32, unscaled) of images in [-1, 1]: deterministic latents."""
    return vae.encode(images.to(vae.dtype)).latent_dist.mean.float()


def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """Per-token text embeddings ``(P, L, D)`` (the encoder's last hidden state), every prompt padded to the
    encoder's context length (77 for SD), encoded ``chunk`` prompts at a time."""
    device = next(text_encoder.parameters()).device
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    outputs = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(list(prompts[start:start + chunk]), padding="max_length", truncation=True,
                           max_length=length, return_tensors="pt")
        outputs.append(text_encoder(tokens.input_ids.to(device))[0])
    return torch.cat(outputs)


# ------------------------------------------------------------------------------------------ build / load / save


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(prior: str) -> bool:
    """A hub id is ``owner/name``; anything rooted, relative or deeper is meant as a folder."""
    return prior.startswith((".", "/", "~")) or prior.count("/") > 1


def load_component(cls, source: str | None, subfolder: str, revision: str | None = None,
                   local_files_only: bool | None = None, layout: Sequence[str] = COMPONENTS):
    """``cls.from_pretrained(source, subfolder=...)``, or one :class:`PriorUnavailableError` that names the
    component and the source (a local folder or a hub id, offline or not) and says how to provide it (a folder
    holding the ``layout`` component folders)."""
    if source is None:
        raise PriorUnavailableError(f"no config for the {subfolder} and no prior folder / hub id to load it from")
    path = Path(source).expanduser()
    is_folder = path.is_dir()
    offline = _is_offline() if local_files_only is None else local_files_only
    try:
        return cls.from_pretrained(str(path) if is_folder else source, subfolder=subfolder, revision=revision,
                                   local_files_only=offline or is_folder)
    except (OSError, ValueError) as err:  # hub / cache errors are OSError subclasses
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        if is_folder:
            where = f"the local folder {path}"
        elif _looks_like_path(source):
            where = f"{source!r}: no such folder"
        else:
            where = f"the hub id {source!r}" + (" (offline, and no cached copy exists)" if offline else "")
        raise PriorUnavailableError(
            f"cannot load the {subfolder or cls.__name__} of the diffusion prior from {where}: {reason}. Pass a local "
            f"folder holding {' '.join(c + '/' for c in layout)}, or run once with network access to fill the Hugging "
            "Face cache.") from None


def build_prior(pretrained: str | None = None, unet: dict | None = None, vae: dict | None = None,
                text_encoder: dict | None = None, scheduler: dict | None = None, revision: str | None = None,
                local_files_only: bool | None = None, frozen: bool = False, name: str = "") -> StableDiffusionPrior:
    """Each component built from its config when one is given, otherwise loaded from ``pretrained``.

    Configs are keyword arguments of ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextConfig`` and
    ``DDPMScheduler``. A built text encoder gets the offline :func:`character_tokenizer` (no vocabulary download).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def load(cls, subfolder: str):
        return load_component(cls, pretrained, subfolder, revision, local_files_only)

    if text_encoder is not None:
        encoder = CLIPTextModel(CLIPTextConfig(**text_encoder))
        tokenizer = character_tokenizer(encoder.config.max_position_embeddings)
    else:
        encoder, tokenizer = load(CLIPTextModel, "text_encoder"), load(CLIPTokenizer, "tokenizer")
    return StableDiffusionPrior(
        unet=UNet2DConditionModel.from_config(unet) if unet is not None else load(UNet2DConditionModel, "unet"),
        vae=AutoencoderKL.from_config(vae) if vae is not None else load(AutoencoderKL, "vae"),
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_config(scheduler) if scheduler is not None else load(DDPMScheduler, "scheduler"),
        name=name or (pretrained or ""),
        frozen=frozen,
    )


def load_prior(prior: str = DEFAULT_PRIOR, revision: str | None = None,
               local_files_only: bool | None = None) -> StableDiffusionPrior:
    """A frozen prior from a local SD-layout folder or a hub id (``local_files_only`` defaults to HF_HUB_OFFLINE).

    Raises :class:`PriorUnavailableError` naming the prior when it cannot be loaded (a folder missing a component,
    or a hub id with no network and no cached copy).
    """
    check_prior_folder(prior, COMPONENTS)
    return build_prior(prior, revision=revision, local_files_only=local_files_only, frozen=True, name=prior)


def check_prior_folder(prior: str, components: Sequence[str]) -> None:
    """When ``prior`` is a local folder, it must hold every component folder (else one clear error)."""
    path = Path(prior).expanduser()
    if path.is_dir():
        missing = [c for c in components if not (path / c).is_dir()]
        if missing:
            raise PriorUnavailableError(f"diffusion prior folder {path} lacks the component folders {missing} "
                                        f"(expected {', '.join(components)}, as save_pretrained writes them)")


def save_prior(out: str | Path, prior: StableDiffusionPrior, class_mapping: ClassMapping | None = None) -> Path:
    """Write ``prior`` in the SD layout with diffusers' ``StableDiffusionPipeline.save_pretrained`` (components
    and ``model_index.json``), plus the ``class_mapping.json`` it was trained on."""
    from diffusers import StableDiffusionPipeline

    # The pipeline rewrites an old-style scheduler config in place (steps_offset 1, clip_sample false: sampling
    # settings that neither training nor scoring reads); it gets a copy so the prior's own stays as it is.
    scheduler = type(prior.scheduler).from_config(prior.scheduler.config)
    with warnings.catch_warnings():  # ... and says so with a FutureWarning each
        warnings.simplefilter("ignore", FutureWarning)
        pipeline = StableDiffusionPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                           unet=prior.unet, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    root = Path(out)
    pipeline.save_pretrained(root)
    if class_mapping is not None:
        class_mapping.save(root / CLASS_MAPPING_FILE)
    return root


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


def random_prior(unet: dict, vae: dict, text_encoder: dict, seed: int = 0, name: str = "random") -> StableDiffusionPrior:
    """A frozen prior with random weights built from architecture configs (``configs/bench/sd15_random.yaml``)
    and a default DDPM scheduler: for benchmarks and tests, nothing downloaded."""
    torch.manual_seed(seed)
    return build_prior(None, unet, vae, text_encoder, scheduler={}, frozen=True, name=name)


# ----------------------------------------------------------------------------------------------- DIFT features


def up_block_features(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                      text_embeddings: torch.Tensor, up_block: int) -> torch.Tensor:
    """Output of ``unet.up_blocks[up_block]`` (after its upsampler, as DIFT takes it); later blocks never run.

    A truncated copy of ``UNet2DConditionModel.forward`` for plain text conditioning (no ControlNet or adapter
    residuals, no attention masks): time / class / added embeddings, ``conv_in``, the down blocks, the mid block,
    then the up blocks up to ``up_block``. It is one straight-line graph, so ``torch.compile`` captures it whole.
    """
    forward_upsample_size = any(side % 2**unet.num_upsamplers for side in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=text_embeddings, added_cond_kwargs={})
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=text_embeddings, added_cond_kwargs={})
    sample = unet.conv_in(sample)
    residuals = (sample,)
    for block in unet.down_blocks:
        cross = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        sample, block_residuals = block(hidden_states=sample, temb=emb, **cross)
        residuals += block_residuals
    if unet.mid_block is not None:
        cross = {"encoder_hidden_states": context} if getattr(unet.mid_block, "has_cross_attention", False) else {}
        sample = unet.mid_block(sample, emb, **cross)
    for index, block in enumerate(unet.up_blocks[:up_block + 1]):
        block_residuals, residuals = residuals[-len(block.resnets):], residuals[:-len(block.resnets)]
        last = index == len(unet.up_blocks) - 1
        upsample_size = residuals[-1].shape[2:] if forward_upsample_size and not last else None
        cross = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=block_residuals,
                       upsample_size=upsample_size, **cross)
    return sample

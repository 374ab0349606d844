"""The class-conditional DiT stack of the generative methods: build, load, save, and diffusers' DiT traps.

A DiT prior is three components in diffusers' ``DiTPipeline`` layout, ``transformer/ vae/ scheduler/`` plus
``model_index.json`` (and ``class_mapping.json`` for a prior the suite trained on its own classes).
:func:`load_dit_prior` reads them, frozen, from a hub id (default ``facebook/DiT-XL-2-256``) or a local folder;
:func:`build_dit_prior` builds each component from its config or loads it (the toy prior, fine-tunes, random-weight
benchmarks); :func:`save_dit_prior` writes one through ``DiTPipeline.save_pretrained``.

Traps handled here (``shared/research/generative_methods.md`` section 1.2):

* diffusers copies DiT's one timestep + label embedder into every transformer block; the copies must be equal
  (checked at load, :func:`embedder_copies_differ`), are tied into one in memory (a built DiT trains one shared
  embedder, as DiT does) and untied again on export (:func:`untied_copy`);
* each copy drops labels on its own in train mode (:func:`disable_block_label_dropout`: labels are dropped once,
  outside the model, by replacing them with the null id);
* the null class is ``config.num_embeds_ada_norm`` (1000 for ImageNet DiTs, the class count for a toy one), not
  a hard-coded 1000 as in ``DiTPipeline``;
* diffusers' DiT is not Meta's: its timestep frequencies are divided by 127 (``downscale_freq_shift=1``) where
  Meta's ``TimestepEmbedder``, which trained ``facebook/DiT-XL-2-256``, divides by 128, and its feed-forward
  LayerNorm has eps 1e-5 where Meta's has 1e-6. ``meta_dit=True`` (the default of every loader and config,
  :func:`use_meta_dit_math`) computes Meta's DiT; ``False`` keeps diffusers' math.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from patchdd.data.sources import CLASS_MAPPING_FILE, ClassMapping
from patchdd.data.subsets import imagenet_wnids
from patchdd.errors import CheckpointMismatchError
from patchdd.priors.sd import FreezablePrior, check_prior_folder, load_component, vae_downsample_factor

DEFAULT_DIT = "facebook/DiT-XL-2-256"
DIT_COMPONENTS = ("transformer", "vae", "scheduler")
META_NORM_EPS = 1e-6  # every LayerNorm of Meta's DiTBlock / FinalLayer


class DiTPrior(FreezablePrior):
    """Transformer, VAE and noise-schedule config of one class-conditional latent DiT.

    ``class_mapping`` names the classes of the label table (row ``i`` = class ``i``); ``None`` means the
    ImageNet-1K label order (sorted wnids), as for ``facebook/DiT-XL-2-256``. A ``frozen`` prior has no trainable
    parameter and stays in eval mode.
    """

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler, class_mapping: ClassMapping | None = None,
                 name: str = "", frozen: bool = True) -> None:
        super().__init__()
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.class_mapping, self.name = class_mapping, name
        disable_block_label_dropout(transformer)
        self.set_frozen(frozen)

    @property
    def null_id(self) -> int:
        """The label-table row of the unconditional (null) class: the last one."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def learns_sigma(self) -> bool:
        """The transformer predicts a variance too (``out_channels = 2 x in_channels``, as DiT-XL/2)."""
        return self.transformer.config.out_channels == 2 * self.transformer.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.transformer.config
        return (int(config.in_channels), int(config.sample_size), int(config.sample_size))

    @property
    def image_size(self) -> int:
        """Pixel side of the images the prior makes (latent side x the VAE's downsampling)."""
        return self.latent_shape[-1] * vae_downsample_factor(self.vae)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def label_ids(self, folders: Sequence[str]) -> list[int]:
        """The label-table row of each class folder (wnid): its position in the prior's class mapping, or in the
        ImageNet-1K order for a prior without one. A class the prior was not trained on is an error."""
        known = list(self.class_mapping.folders) if self.class_mapping else imagenet_wnids()
        if len(known) != self.null_id:
            raise CheckpointMismatchError(f"the DiT {self.name!r} has {self.null_id} label rows but its classes are "
                                          f"{len(known)} (add a class_mapping.json to the prior folder)")
        position = {folder: i for i, folder in enumerate(known)}
        missing = [f for f in folders if f not in position]
        if missing:
            raise CheckpointMismatchError(f"the DiT {self.name!r} was not trained on the classes {missing[:5]} "
                                          f"({len(known)} classes, e.g. {known[:3]})")
        return [position[f] for f in folders]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, mode: str = "sample", noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents (fp32) of images in [-1, 1]: the VAE posterior's ``mean`` or a ``sample`` from it."""
        return encode_scaled(self.vae, images, mode, noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) of scaled latents."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample.float()
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


LATENT_MODES = ("mean", "sample")


def encode_scaled(vae: nn.Module, images: torch.Tensor, mode: str = "sample",
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """``scaling_factor`` x the VAE posterior's mean, or a sample from it (the generative methods sample) drawn
    with ``noise`` (standard normal, the latents' shape; fresh noise when ``None``)."""
    if mode not in LATENT_MODES:
        raise ValueError(f"latent mode must be one of {LATENT_MODES}, got {mode!r}")
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    if mode == "mean":
        latents = posterior.mean
    else:
        noise = torch.randn_like(posterior.mean) if noise is None else noise.to(posterior.mean)
        latents = posterior.mean + posterior.std * noise
    return latents.float() * float(vae.config.scaling_factor)


def weights_hash(module: nn.Module) -> str:
    """A short sha256 of a module's parameters and buffers (names, shapes, bytes): which weights made a set."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def block_embedders(transformer: nn.Module) -> list[nn.Module]:
    """The timestep + label embedder of every transformer block (diffusers keeps one copy per block)."""
    return [block.norm1.emb for block in transformer.transformer_blocks]


def disable_block_label_dropout(transformer: nn.Module) -> None:
    """Stop every block's label embedder from dropping labels on its own in train mode (labels are dropped once,
    before the call, by the trainer); the null row of the table stays."""
    for embedder in block_embedders(transformer):
        embedder.class_embedder.dropout_prob = 0.0


def embedder_copies_differ(transformer: nn.Module) -> list[str]:
    """Names of the parameters in which a block's embedder differs from block 0's (empty when all copies agree,
    as they do in a converted DiT checkpoint and in a prior this suite wrote)."""
    embedders = block_embedders(transformer)
    reference = dict(embedders[0].named_parameters())
    return [f"transformer_blocks.{i}.norm1.emb.{name}" for i, embedder in enumerate(embedders[1:], start=1)
            for name, value in embedder.named_parameters() if not torch.equal(value, reference[name])]


def use_meta_dit_math(transformer: nn.Module) -> None:
    """Make a diffusers ``DiTTransformer2DModel`` compute Meta's DiT (``facebookresearch/DiT`` ``models.py``):
    timestep frequencies ``exp(-ln(10000) k / 128)`` (no ``downscale_freq_shift``) in every block's embedder, and
    eps 1e-6 in every feed-forward LayerNorm. The weights are untouched."""
    for embedder in block_embedders(transformer):
        embedder.time_proj.downscale_freq_shift = 0
    for block in transformer.transformer_blocks:
        block.norm3.eps = META_NORM_EPS


def tie_block_embedders(transformer: nn.Module) -> None:
    """Make every block use block 0's embedder: one timestep MLP and label table, as DiT has and trains them."""
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb = transformer.transformer_blocks[0].norm1.emb


def untied_copy(transformer: nn.Module) -> nn.Module:
    """A copy of ``transformer`` in diffusers' layout, one embedder copy per block (safetensors refuses tensors
    that share memory, and ``DiTPipeline`` expects the copies)."""
    copy = deepcopy(transformer)
    for block in copy.transformer_blocks[1:]:
        block.norm1.emb = deepcopy(copy.transformer_blocks[0].norm1.emb)
    return copy


def build_dit_prior(pretrained: str | None = None, transformer: dict | None = None, vae: dict | None = None,
                    scheduler: dict | None = None, vae_from: str | None = None, revision: str | None = None,
                    local_files_only: bool | None = None, frozen: bool = False, name: str = "",
                    meta_dit: bool = True) -> DiTPrior:
    """Each component built from its config when one is given, otherwise loaded.

    The transformer and scheduler load from ``pretrained``; the VAE from ``vae_from`` (e.g. the toy SD prior's,
    ``assets/toy_prior``) or else ``pretrained``. Configs are keyword arguments of ``DiTTransformer2DModel``,
    ``AutoencoderKL`` and ``DDPMScheduler``. ``meta_dit``: compute Meta's DiT (:func:`use_meta_dit_math`), as
    ``facebook/DiT-XL-2-256`` was trained and as D3HR, Minimax and Li et al. run it; ``False``: diffusers' math.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    def load(cls, source: str | None, subfolder: str):
        return load_component(cls, source, subfolder, revision, local_files_only, layout=DIT_COMPONENTS)

    if transformer is not None:
        model = DiTTransformer2DModel.from_config(transformer)
    else:
        model = load(DiTTransformer2DModel, pretrained, "transformer")
        differing = embedder_copies_differ(model)
        if differing:
            raise CheckpointMismatchError(f"the DiT {pretrained!r} has per-block embedders that differ from block "
                                          f"0's ({differing[:3]}): not a converted DiT checkpoint")
    tie_block_embedders(model)
    if meta_dit:
        use_meta_dit_math(model)
    schedule = DDPMScheduler.from_config(scheduler) if scheduler is not None else load(
        DDPMScheduler, pretrained, "scheduler")
    autoencoder = AutoencoderKL.from_config(vae) if vae is not None else load(AutoencoderKL, vae_from or pretrained,
                                                                              "vae")
    mapping_file = Path(pretrained).expanduser() / CLASS_MAPPING_FILE if pretrained else None
    mapping = ClassMapping.load(mapping_file) if mapping_file is not None and mapping_file.is_file() else None
    return DiTPrior(model, autoencoder, schedule, mapping, name=name or (pretrained or ""), frozen=frozen)


def load_dit_prior(prior: str = DEFAULT_DIT, revision: str | None = None, local_files_only: bool | None = None,
                   meta_dit: bool = True) -> DiTPrior:
    """A frozen DiT prior from a ``DiTPipeline``-layout folder or a hub id (``local_files_only`` defaults to
    HF_HUB_OFFLINE), computing Meta's DiT unless ``meta_dit`` is false. Raises :class:`PriorUnavailableError`
    naming the weights when they cannot be loaded."""
    check_prior_folder(prior, DIT_COMPONENTS)
    return build_dit_prior(prior, revision=revision, local_files_only=local_files_only, frozen=True, name=prior,
                           meta_dit=meta_dit)


def load_vae(source: str, revision: str | None = None, local_files_only: bool | None = None) -> nn.Module:
    """A frozen ``AutoencoderKL`` from a hub id or folder that holds one (``stabilityai/sd-vae-ft-mse``, a folder
    written by ``AutoencoderKL.save_pretrained``) or from a prior folder's ``vae/``."""
    from diffusers import AutoencoderKL

    subfolder = "vae" if (Path(source).expanduser() / "vae").is_dir() else None
    vae = load_component(AutoencoderKL, source, subfolder, revision, local_files_only, layout=("vae",))
    return vae.requires_grad_(False).eval()


def save_dit_prior(out: str | Path, prior: DiTPrior) -> Path:
    """Write ``prior`` with ``DiTPipeline.save_pretrained`` (readable by ``DiTPipeline.from_pretrained``) plus
    the ``class_mapping.json`` of its label table."""
    from diffusers import DiTPipeline

    scheduler = type(prior.scheduler).from_config(prior.scheduler.config)  # the pipeline may rewrite a config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipeline = DiTPipeline(transformer=untied_copy(prior.transformer), vae=prior.vae, scheduler=scheduler)
    root = Path(out)
    pipeline.save_pretrained(root)
    if prior.class_mapping is not None:
        prior.class_mapping.save(root / CLASS_MAPPING_FILE)
    return root

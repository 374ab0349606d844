"""Training a class-conditional latent DiT: the toy DiT prior of the generative methods (D3HR, plain DiT).

:class:`DiTDiffusionPrior` trains a ``DiTTransformer2DModel`` with the DDPM epsilon-prediction loss on VAE latents
of an ImageFolder data module, conditioned on the class label; a fraction of the labels is replaced by the null
class (classifier-free-guidance dropout) once per batch, outside the model (diffusers' per-block dropout is
switched off, :mod:`patchdd.priors.dit`). The transformer is built from a config (the toy) or loaded from a DiT
folder / hub id; the VAE is loaded (``vae_from``: the toy SD prior's VAE) and stays frozen.

``val/label_accuracy`` uses the prior as a classifier: the class whose conditional noise-prediction error is the
lowest, per validation image (chance is 1 / classes for a prior that ignores its label). At the end of ``fit``
the prior is written to ``export_dir`` in ``DiTPipeline``'s layout with its ``class_mapping.json``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from patchdd.data.sources import ImageBatch
from patchdd.errors import CheckpointMismatchError
from patchdd.lightning_modules.diffusion_prior import PriorExport
from patchdd.priors.dit import LATENT_MODES, DiTPrior, build_dit_prior, save_dit_prior
from patchdd.priors.objectives import drop_prompts, to_vae_range


def class_errors(transformer: torch.nn.Module, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Noise-prediction MSE of every latent under every class label: (B, num_classes), one batch of B x classes."""
    size = len(latents)
    noisy = scheduler.add_noise(latents, noise, timesteps).repeat(num_classes, 1, 1, 1)
    labels = torch.arange(num_classes, device=latents.device).repeat_interleave(size)
    output = transformer(noisy, timesteps.repeat(num_classes), labels, return_dict=False)[0][:, :latents.shape[1]]
    errors = (output - noise.repeat(num_classes, 1, 1, 1)).pow(2).flatten(1).mean(1)
    return errors.view(num_classes, size).T


class DiTDiffusionPrior(PriorExport, L.LightningModule):
    """Class-conditional latent DiT: epsilon-prediction DDPM training with label dropout.

    Args:
        pretrained: DiT folder (``DiTPipeline`` layout) or hub id; the transformer and scheduler load from it
            when no config is given below.
        transformer: config of the DiT to build (``DiTTransformer2DModel`` keyword arguments); its
            ``num_embeds_ada_norm`` must equal the data's class count (the null class is the next row).
        scheduler: config of the noise scheduler (``DDPMScheduler`` keyword arguments); ``None`` loads it.
        vae_from: folder or hub id holding the frozen VAE (``vae/``); ``None``: ``pretrained``.
        latent_mode: ``mean`` (deterministic) or ``sample`` (from the VAE posterior, as DiT trains).
        label_dropout: fraction of labels replaced by the null class per batch.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        decay_fraction: the last fraction of the steps runs at a tenth of the learning rate.
        export_dir: where ``fit`` writes the DiT folder at its end (``None``: nowhere).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        transformer: dict | None = None,
        scheduler: dict | None = None,
        vae_from: str | None = None,
        latent_mode: str = "mean",
        label_dropout: float = 0.1,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        decay_fraction: float = 0.15,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
        prior = build_dit_prior(pretrained, transformer, scheduler=scheduler, vae_from=vae_from, name="trained")
        self.transformer, self.vae, self.noise_scheduler = prior.transformer, prior.vae, prior.scheduler
        self.vae.requires_grad_(False)
        self.class_mapping = prior.class_mapping
        self.normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def prior(self) -> DiTPrior:
        """The trained components as a :class:`DiTPrior` (not copied)."""
        return DiTPrior(self.transformer, self.vae, self.noise_scheduler, self.class_mapping, frozen=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalisation is None:
            raise RuntimeError("the DiT prior needs the data module's mean / std: fit it with a data module")
        with torch.no_grad():
            return self.prior.encode(to_vae_range(images, *self.normalisation), self.hparams.latent_mode)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        mapping = datamodule.class_mapping
        rows = int(self.transformer.config.num_embeds_ada_norm)
        if rows != len(mapping):
            raise CheckpointMismatchError(f"the DiT has {rows} label rows, the data {len(mapping)} classes "
                                          "(set transformer.num_embeds_ada_norm to the class count)")
        if self.class_mapping is not None and self.class_mapping.folders != mapping.folders:
            raise CheckpointMismatchError(f"the DiT was trained on classes {self.class_mapping.folders[:5]}..., "
                                          f"the data module has {mapping.folders[:5]}...")
        self.class_mapping = mapping
        self.normalisation = (tuple(datamodule.mean), tuple(datamodule.std))

    def training_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor | None:
        if batch.images.numel() == 0:
            return None
        latents = self.encode(batch.images)
        labels = drop_prompts(batch.labels, len(self.class_mapping), self.hparams.label_dropout)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        output = self.transformer(noisy, timesteps, labels, return_dict=False)[0][:, :latents.shape[1]]
        loss = F.mse_loss(output, noise)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def validation_step(self, batch: ImageBatch, batch_idx: int) -> None:
        """``val/loss`` (own label) and ``val/label_accuracy`` (own label has the lowest error of all classes)."""
        if batch.images.numel() == 0:
            return
        latents = self.encode(batch.images)
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator).to(self.device)
        errors = class_errors(self.transformer, self.noise_scheduler, latents, noise, timesteps,
                              len(self.class_mapping))
        labels = batch.labels.to(self.device)
        self.log("val/loss", errors.gather(1, labels.view(-1, 1)).mean(), prog_bar=True, batch_size=len(labels))
        self.log("val/label_accuracy", (errors.argmin(1) == labels).float().mean(), prog_bar=True,
                 batch_size=len(labels))

    def configure_optimizers(self):
        """AdamW over the transformer; linear warm-up, then a tenth of the rate for the last ``decay_fraction``."""
        optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        decay_from = int(total * (1 - self.hparams.decay_fraction))
        warmup = max(1, self.hparams.warmup_steps)

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * (0.1 if step >= decay_from else 1.0)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def save_prior(self, out: str | Path) -> Path:
        """Write the prior in ``DiTPipeline``'s layout, with the class mapping of its label table."""
        return save_dit_prior(out, self.prior)


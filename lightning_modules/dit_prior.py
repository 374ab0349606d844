"""Training or fine-tuning a class-conditional latent DiT: the toy DiT prior of the generative methods (D3HR, plain
DiT) and the Minimax / self-adaptive-memory fine-tunes (DiffFit, memory regularisers, EMA).

:class:`DiTDiffusionPrior` trains a ``DiTTransformer2DModel`` with the DDPM epsilon-prediction loss on VAE latents
of an ImageFolder data module, conditioned on the class label; a fraction of the labels is replaced by the null
class (classifier-free-guidance dropout) once per batch, outside the model (diffusers' per-block dropout is
switched off, :mod:`patchdd.priors.dit`). The transformer is built from a config (the toy) or loaded from a DiT
folder / hub id; the VAE is loaded (``vae_from``: the toy SD prior's VAE) and stays frozen. The losses are plain
functions (:mod:`patchdd.generation.memory`, :func:`patchdd.priors.objectives.variational_bound_terms`).

``val/label_accuracy`` uses the prior as a classifier: the class whose conditional noise-prediction error is the
lowest, per validation image (chance is 1 / classes for a prior that ignores its label). At the end of ``fit``
the prior is written to ``export_dir`` in ``DiTPipeline``'s layout with its ``class_mapping.json``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from patchdd.data.sources import ImageBatch
from patchdd.errors import CheckpointMismatchError
from patchdd.lightning_modules.diffusion_prior import PriorExport
from patchdd.generation.memory import MemoryBank, memory_losses
from patchdd.generation.sampling import predicted_x0
from patchdd.priors.difffit import DiffFitScales, difffit_trainable
from patchdd.priors.dit import LATENT_MODES, DiTPrior, build_dit_prior, save_dit_prior
from patchdd.priors.objectives import drop_prompts, to_vae_range, variational_bound_terms
from patchdd.training.optim import ExponentialAverage


def class_errors(transformer: torch.nn.Module, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE of every latent under every candidate label row: (B, rows), one batch of B x rows."""
    size, count = len(latents), len(label_rows)
    noisy = scheduler.add_noise(latents, noise, timesteps).repeat(count, 1, 1, 1)
    labels = label_rows.to(latents.device).repeat_interleave(size)
    output = transformer(noisy, timesteps.repeat(count), labels, return_dict=False)[0][:, :latents.shape[1]]
    errors = (output - noise.repeat(count, 1, 1, 1)).pow(2).flatten(1).mean(1)
    return errors.view(count, size).T


@dataclass
class MemoryOptions:
    """Minimax's memory regularisers (``eviction: fifo``) or the self-adaptive memory of Li et al. (``max_similarity``).

    Args:
        lambda_real: weight of the representativeness term, 1 - min cos(x0, real bank).
        lambda_gen: weight of the diversity term, max cos(x0, generated bank).
        real_capacity: vectors per class in the real bank (N_R).
        gen_capacity: vectors per class in the generated bank (N_G).
        eviction: ``fifo`` (Minimax) or ``max_similarity`` (Li et al.).
        evict_every: ``step`` (both public codes: a bank is trimmed to capacity as it is filled) or ``epoch`` (the
            suite's reading of Li et al.'s figure caption: banks grow unbounded within an epoch, e.g. 115-175 per
            class against a capacity of 64, and are trimmed at its end; no reference code does this).
        legacy_accumulation: Li et al.'s code's loss (its reference: ``configs/prior/adaptive_memory.yaml`` sets it):
            the running sums added at every class of a set-ordered loop; off: each term counts once (Minimax's
            code, and Li et al.'s paper).
    """

    lambda_real: float = 0.002
    lambda_gen: float = 0.008
    real_capacity: int = 64
    gen_capacity: int = 64
    eviction: str = "fifo"
    evict_every: str = "step"
    legacy_accumulation: bool = False


FINETUNE_MODES = ("full", "difffit")


class DiTDiffusionPrior(PriorExport, L.LightningModule):
    """Class-conditional latent DiT: trained from scratch (the toy) or fine-tuned (Minimax, Li et al.).

    Epsilon-prediction DDPM training with label dropout once per batch; with a learned variance (``out_channels =
    2 x in_channels``, DiT-XL/2) IDDPM's variational-bound term is added (``loss = mse + vb``).

    Args:
        pretrained: DiT folder (``DiTPipeline`` layout) or hub id; the transformer and scheduler load from it
            when no config is given below.
        transformer: config of the DiT to build (``DiTTransformer2DModel`` keyword arguments); its
            ``num_embeds_ada_norm`` must equal the data's class count (the null class is the next row).
        scheduler: config of the noise scheduler (``DDPMScheduler`` keyword arguments); ``None`` loads it.
        vae_from: folder or hub id holding the frozen VAE (``vae/``); ``None``: ``pretrained``.
        latent_mode: ``mean`` (deterministic) or ``sample`` (from the VAE posterior, as DiT trains).
        label_dropout: fraction of labels replaced by the null class per batch.
        finetune: ``full`` (every transformer weight) or ``difffit`` (biases, the label table and per-channel
            scales on the first ``gamma_blocks`` blocks; :mod:`patchdd.priors.difffit`).
        gamma_blocks: blocks, from the first, with DiffFit scales (Minimax: 14 of 28).
        memory: the memory regularisers (``MemoryOptions``); ``None``: none (plain fine-tune).
        ema_decay: exponential moving average of the trained weights, exported instead of them (DiT / Minimax:
            0.9999); ``None``: export the weights themselves.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        decay_fraction: the last fraction of the steps runs at a tenth of the learning rate.
        export_dir: where ``fit`` writes the DiT folder at its end (``None``: nowhere).
        meta_dit: train Meta's DiT (timestep frequencies / 128, LayerNorm eps 1e-6), as Minimax and Li et al.
            fine-tune ``facebook/DiT-XL-2-256``; ``False``: diffusers' variant.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        transformer: dict | None = None,
        scheduler: dict | None = None,
        vae_from: str | None = None,
        latent_mode: str = "mean",
        label_dropout: float = 0.1,
        finetune: str = "full",
        gamma_blocks: int = 14,
        memory: MemoryOptions | None = None,
        ema_decay: float | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        decay_fraction: float = 0.15,
        export_dir: str | None = None,
        meta_dit: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        if isinstance(memory, dict):  # from a checkpoint's hyper-parameters
            memory = MemoryOptions(**memory)
        if memory is not None:  # a checkpoint holds plain values: it loads with weights_only
            self.hparams["memory"] = asdict(memory)
        self.memory = memory
        if memory is not None and memory.evict_every not in ("step", "epoch"):
            raise ValueError(f"memory.evict_every must be step or epoch, got {memory.evict_every!r}")
        prior = build_dit_prior(pretrained, transformer, scheduler=scheduler, vae_from=vae_from, name="trained",
                                meta_dit=meta_dit)
        self.transformer, self.vae, self.noise_scheduler = prior.transformer, prior.vae, prior.scheduler
        self.vae.requires_grad_(False)
        self.class_mapping, self.built = prior.class_mapping, transformer is not None
        self.scales = None
        if finetune == "difffit":
            difffit_trainable(self.transformer)
            self.scales = DiffFitScales(self.transformer, gamma_blocks)
        self.banks = (MemoryBank(memory.real_capacity, memory.eviction), MemoryBank(memory.gen_capacity,
                                                                                      memory.eviction)) if memory else None
        self.ema = ExponentialAverage(self.trained_parameters(), ema_decay) if ema_decay else None
        self.label_rows: torch.Tensor | None = None
        self.normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimiser updates (and the EMA averages), by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

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
        """The data's classes as label rows: their rows in a loaded prior (ImageNet's for facebook/DiT-XL-2-256, so
        an ImageWoof fine-tune trains the woof rows), or rows 0..C-1 of a built one."""
        datamodule = self.trainer.datamodule
        mapping = datamodule.class_mapping
        rows = int(self.transformer.config.num_embeds_ada_norm)
        if not self.built:
            self.label_rows = torch.tensor(self.prior.label_ids(mapping.folders))
        elif rows != len(mapping):
            raise CheckpointMismatchError(f"the DiT has {rows} label rows, the data {len(mapping)} classes "
                                          "(set transformer.num_embeds_ada_norm to the class count)")
        else:
            self.label_rows = torch.arange(len(mapping))
        if self.built:
            self.class_mapping = self.class_mapping or mapping  # a loaded prior keeps its own label table
        self.normalisation = (tuple(datamodule.mean), tuple(datamodule.std))

    def training_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor | None:
        if batch.images.numel() == 0:
            return None
        latents = self.encode(batch.images)
        rows = self.label_rows.to(self.device)[batch.labels]
        labels = drop_prompts(rows, self.prior.null_id, self.hparams.label_dropout)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        output = self.transformer(noisy, timesteps, labels, return_dict=False)[0]
        eps = output[:, :latents.shape[1]]
        loss = F.mse_loss(eps, noise)
        if self.prior.learns_sigma:
            alphas = self.noise_scheduler.alphas_cumprod
            loss = loss + variational_bound_terms(alphas, latents, noisy, timesteps, eps.detach(),
                                                  output[:, latents.shape[1]:]).mean()
        if self.banks is not None:
            loss = loss + self.memory_step(latents, predicted_x0(self.noise_scheduler.alphas_cumprod, noisy, eps,
                                                                 timesteps), batch.labels.to(self.device))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def memory_step(self, latents: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The memory terms of this batch (against the banks as they were), then the banks updated with the batch's
        real latents and detached x0 predictions."""
        options, (real, generated) = self.memory, self.banks
        terms = memory_losses(x0, labels, real, generated, options.lambda_real, options.lambda_gen,
                              options.legacy_accumulation)
        trim = options.evict_every == "step"
        for c in labels.unique().tolist():
            real.add(c, latents[labels == c], trim)
            generated.add(c, x0[labels == c], trim)
        self.log("train/memory_loss", terms, batch_size=len(labels))
        return terms

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step, then the EMA: both before any callback's batch end, so a checkpoint saved there holds them."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.trained_parameters())

    def on_train_epoch_end(self) -> None:
        if self.banks is not None and self.memory.evict_every == "epoch":
            for bank in self.banks:
                bank.trim()

    def validation_step(self, batch: ImageBatch, batch_idx: int) -> None:
        """``val/loss`` (own label) and ``val/label_accuracy`` (own label has the lowest error of the data's)."""
        if batch.images.numel() == 0:
            return
        latents = self.encode(batch.images)
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator).to(self.device)
        errors = class_errors(self.transformer, self.noise_scheduler, latents, noise, timesteps, self.label_rows)
        labels = batch.labels.to(self.device)
        self.log("val/loss", errors.gather(1, labels.view(-1, 1)).mean(), prog_bar=True, batch_size=len(labels))
        self.log("val/label_accuracy", (errors.argmin(1) == labels).float().mean(), prog_bar=True,
                 batch_size=len(labels))

    def configure_optimizers(self):
        """AdamW over the trained parameters; linear warm-up, then a tenth of the rate for the last
        ``decay_fraction``."""
        optimizer = torch.optim.AdamW(list(self.trained_parameters().values()), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        decay_from = int(total * (1 - self.hparams.decay_fraction))
        warmup = max(1, self.hparams.warmup_steps)

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * (0.1 if step >= decay_from else 1.0)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state()
        if self.banks is not None:
            checkpoint["memory_banks"] = [{c: t.cpu() for c, t in bank.banks.items()} for bank in self.banks]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load(checkpoint["ema"])
        if self.banks is not None and "memory_banks" in checkpoint:
            for bank, stored in zip(self.banks, checkpoint["memory_banks"]):
                bank.banks = dict(stored)

    def save_prior(self, out: str | Path) -> Path:
        """Write the prior in ``DiTPipeline``'s layout (the EMA weights when kept, DiffFit's scales folded in),
        with the class mapping of its label table."""
        swap = self.ema.swapped(self.trained_parameters()) if self.ema is not None else nullcontext()
        with swap:
            transformer = self.scales.folded(self.transformer) if self.scales is not None else self.transformer
            return save_dit_prior(out, DiTPrior(transformer, self.vae, self.noise_scheduler, self.class_mapping,
                                                frozen=False))

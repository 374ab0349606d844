"""Cross-entropy training of any zoo network on real data: how users make teachers for subsets and CIFAR."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from patchdd.training.optim import accuracy_metrics, build_optimizer, warmup_cosine
from patchdd.training.zoo import build_model


class RealValidation:
    """Validation / test steps on real labelled batches (``ImageBatch``): cross-entropy and top-1 / top-5.

    Mixed into a LightningModule that has ``forward``, ``val_metrics`` (see :func:`accuracy_metrics`) and
    ``_build(num_classes)``; without ``num_classes`` in its hyper-parameters the module is built in ``setup``
    with the data module's class count. Validation metrics are computed and reset in the module's own
    ``on_validation_epoch_end``; test metrics are logged here as ``test/top1``, ``test/top5``.
    """

    def setup(self, stage: str) -> None:
        if self.hparams.num_classes is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "num_classes"):
                raise ValueError(f"{type(self).__name__} needs num_classes, or a data module that reports it")
            self._build(datamodule.num_classes)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict({name.replace("val/", "test/"): value for name, value in metrics.items()})

    def _evaluate(self, batch, stage: str) -> None:
        if batch.labels.numel() == 0:
            return
        logits = self(batch.images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch.labels), batch_size=len(batch.labels), sync_dist=True)
        self.val_metrics.update(logits, batch.labels)


class Classifier(RealValidation, L.LightningModule):
    """A zoo network trained with cross-entropy; validation reports top-1 / top-5.

    ``num_classes`` defaults to the data module's class count. The network is ``self.model``, so a
    checkpoint of this module loads back with ``build_model(name, num_classes, checkpoint=path)``.

    Args:
        model: zoo name (timm name, ``tv:`` torchvision name, ``convnet_dN``, ``resnet_apN``).
        num_classes: class count (default: the data module's).
        pretrained: start from the hub weights.
        checkpoint: start from a local checkpoint.
        image_size: input side given to size-dependent models (ConvNets, ViT, Swin).
        model_kwargs: extra keyword arguments of the model's constructor (e.g. ``{"width": 32}``).
        optimizer: ``sgd`` or ``adamw``.
        lr: peak learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps before the per-step cosine decay.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        model: str = "resnet18",
        num_classes: int | None = None,
        pretrained: bool = False,
        checkpoint: str | None = None,
        image_size: int | None = None,
        model_kwargs: dict | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.skipped_images = 0
        if num_classes is not None:
            self._build(num_classes)

    def _build(self, num_classes: int) -> None:
        hp = self.hparams
        self.model = build_model(hp.model, num_classes, pretrained=hp.pretrained, checkpoint=hp.checkpoint,
                                 image_size=hp.image_size, **(hp.model_kwargs or {}))
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.hparams.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        self._count_skipped(batch)
        if batch.labels.numel() == 0:
            return None
        logits = self(batch.images)
        loss = self.criterion(logits, batch.labels)
        accuracy = (logits.argmax(1) == batch.labels).float().mean()
        self.log_dict({"train/loss": loss, "train/top1": accuracy}, prog_bar=True, batch_size=len(batch.labels))
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def _count_skipped(self, batch) -> None:
        """Unreadable images dropped by the loader are counted and logged, not fatal."""
        if batch.skipped:
            self.skipped_images += batch.skipped
            self.log("data/skipped_images", float(self.skipped_images), reduce_fx="max")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.betas)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

"""FKD-style evaluation of a synthetic set: a student learns from a frozen teacher's soft labels (RDED's protocol).

For every augmented and mixed batch the teacher's logits on that same batch are the target, and the loss is
``KLDivLoss(batchmean)(log_softmax(student / T), softmax(teacher / T))`` (:func:`kd_kl_loss`). The student
is validated on the real validation split of the same classes; the final and the best top-1 over the
validation runs are logged and written to ``summary.json`` in the run's log directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch

from patchdd.data.sources import teacher_class_folders, teacher_output_positions
from patchdd.errors import DataError
from patchdd.datamodules.real import rank_zero_log_dir
from patchdd.lightning_modules.classifier import RealValidation
from patchdd.training.augment import AugmentOptions, MixMode, augment_batch, mix_batch, mixed_cross_entropy
from patchdd.training.kd import RDED_TEMPERATURE, Schedule, kd_kl_loss, learning_rate_for, lr_factor
from patchdd.training.optim import accuracy_metrics, build_optimizer, weight_decay_groups
from patchdd.training.zoo import OutputSubset, build_model, recorded_class_mapping

# Checkpoints store the augmentation options among the hyper-parameters; let weights-only loading accept them.
torch.serialization.add_safe_globals([AugmentOptions])
SUMMARY_FILE = "summary.json"
PROTOCOL_FILE = "protocol.json"


class FKDStudent(RealValidation, L.LightningModule):
    """A student network trained on a synthetic set with a frozen teacher's soft labels, validated on real data.

    Training batches are ``(images, labels)``: uint8 images are augmented here on the device
    (:func:`patchdd.training.augment.augment_batch`, with the grid of the data module's synthetic set); float
    images are taken as already augmented by the loader (:func:`patchdd.training.augment.per_sample_transform`).
    Validation batches are the real data module's ``ImageBatch``.

    ``lr`` None looks the student up in ``lr_by_architecture``; ``temperature`` None takes RDED's value for the
    mixing (20 with CutMix, 4 with Mixup). A teacher without weights is an error unless ``random_teacher`` asks
    for one (a control row of a matrix). The teacher is rebuilt from its own source when a checkpoint of this
    module is loaded, so checkpoints hold the student only.

    A teacher with more outputs than the data has classes (a hub-pretrained ImageNet-1K teacher on ImageNette,
    say) is cut to the data's classes: ``teacher_classes`` names its output classes (``"imagenet1k"``, the
    default for ``teacher_pretrained``, or a teacher run's ``class_mapping.json``), and ``teacher_outputs``
    records (its class count, the data classes' positions) in the checkpoint; it is filled in ``setup``.

    Args:
        teacher: zoo name of the teacher (timm name, ``tv:`` torchvision name, ``convnet_dN``, ``resnet_apN``).
        student: zoo name of the student.
        num_classes: class count (default: the data module's).
        teacher_pretrained: load the teacher's hub weights (torchvision / timm ImageNet-1K).
        teacher_checkpoint: load the teacher from a local checkpoint (``.ckpt`` of this suite, ``.pt``, ...).
        random_teacher: allow a teacher with random weights (a control; otherwise an error).
        teacher_kwargs: extra keyword arguments of the teacher's constructor (e.g. ``{"width": 32}``).
        teacher_classes: the teacher's output classes: ``imagenet1k``, a ``class_mapping.json``, or None (the
            data's own classes).
        teacher_outputs: (teacher class count, data class positions) of a cut teacher; set in ``setup``.
        student_kwargs: extra keyword arguments of the student's constructor.
        model_image_size: input side given to size-dependent models (ConvNets, ViT, Swin).
        augment: the on-device augmentation (tile shuffle, crop scale / ratio, flip, normalisation).
        mixing: ``cutmix`` (RDED), ``mixup`` or ``none``, one per batch; the teacher labels the mixed batch.
        cutmix_alpha: Beta parameter of CutMix.
        mixup_alpha: Beta parameter of Mixup.
        min_teacher_top1: the sanity gate: the fit refuses a teacher whose top-1 on the real validation data is
            lower (None: twice chance, 2 / classes; 0: no gate; a random teacher is never gated).
        label_mode: ``soft`` (the teacher's soft labels on each augmented batch: the protocol) or ``hard``
            (cross-entropy on the set's class labels, no teacher; a mixed image counts both its labels by area,
            as IDC's CutMix loss; DD-Ranking's hard-label runs set ``mixing: none``).
        temperature: KD temperature (None: RDED's, 20 with CutMix, 4 with Mixup).
        scale_loss_by_t2: multiply the KD loss by T^2 (RDED does not).
        optimizer: ``adamw`` (RDED) or ``sgd``.
        lr: learning rate (None: looked up in ``lr_by_architecture`` by the student's name).
        lr_by_architecture: learning rate per substring of the student's name (RDED's table in the config).
        weight_decay: weight decay.
        decay_weights_only: decay weight matrices / kernels only, not biases and norm parameters (RDED).
        momentum: SGD momentum.
        betas: AdamW betas.
        schedule: ``half_cosine`` (RDED: ends at half the lr), ``cosine`` (to 0), ``multistep`` (IDC: x 0.2 at 2/3
            and at 5/6 of the epochs) or ``constant``, per epoch.
        track_unmixed_accuracy: RDED's extra no-grad student pass on the un-mixed batch for a training accuracy.
        channels_last: run student and teacher in channels-last memory format.
    """

    def __init__(
        self,
        teacher: str = "resnet18",
        student: str = "resnet18",
        num_classes: int | None = None,
        teacher_pretrained: bool = False,
        teacher_checkpoint: str | None = None,
        random_teacher: bool = False,
        teacher_kwargs: dict | None = None,
        teacher_classes: str | None = None,
        teacher_outputs: tuple[int, list[int]] | None = None,
        student_kwargs: dict | None = None,
        model_image_size: int | None = None,
        augment: AugmentOptions | dict = AugmentOptions(),
        mixing: MixMode = "cutmix",
        cutmix_alpha: float = 1.0,
        mixup_alpha: float = 0.8,
        min_teacher_top1: float | None = None,
        label_mode: Literal["soft", "hard"] = "soft",
        temperature: float | None = None,
        scale_loss_by_t2: bool = False,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float | None = None,
        lr_by_architecture: dict[str, float] | None = None,
        weight_decay: float = 0.01,
        decay_weights_only: bool = True,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: Schedule = "half_cosine",
        track_unmixed_accuracy: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # LightningCLI and checkpoints hand the options over as a dict
        self.augment = augment if isinstance(augment, AugmentOptions) else AugmentOptions(**augment)
        if temperature is None and label_mode == "soft" and mixing not in RDED_TEMPERATURE:
            raise ValueError(f"mixing {mixing!r} has no default temperature; pass temperature")
        self.temperature = temperature if temperature is not None else RDED_TEMPERATURE.get(mixing)
        self.lr = lr if lr is not None else learning_rate_for(student, lr_by_architecture or {})
        self.best_top1: float | None = None
        self.best_epoch: int | None = None
        self.final: dict[str, float] = {}
        self.validations = 0
        if num_classes is not None:
            self._build(num_classes)

    def _build(self, num_classes: int) -> None:
        hp = self.hparams
        if hp.label_mode == "soft" and not (hp.teacher_pretrained or hp.teacher_checkpoint or hp.random_teacher):
            raise ValueError("the teacher needs weights: teacher_pretrained=true or teacher_checkpoint=PATH "
                             "(random_teacher=true for a randomly initialised control teacher)")
        self.student = build_model(hp.student, num_classes, image_size=hp.model_image_size,
                                   **(hp.student_kwargs or {}))
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.hparams.num_classes = num_classes
        if hp.label_mode == "hard":  # cross-entropy on the set's labels: no teacher
            self.teacher = None
            return
        teacher_count, positions = hp.teacher_outputs or (num_classes, None)
        if hp.teacher_pretrained and teacher_count != 1000:
            raise ValueError(f"a pretrained hub teacher has 1000 ImageNet outputs, not {teacher_count}: train with a "
                             "data module of ImageNet classes (its outputs are cut to them) or pass "
                             "teacher_checkpoint=PATH of a teacher trained on these classes")
        teacher = build_model(hp.teacher, teacher_count, pretrained=hp.teacher_pretrained,
                              checkpoint=hp.teacher_checkpoint, image_size=hp.model_image_size,
                              **(hp.teacher_kwargs or {}))
        self.teacher = teacher if positions is None else OutputSubset(teacher, positions)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if hp.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if hp.label_mode == "soft" and hp.num_classes is None and hp.teacher_outputs is None:
            self.hparams.teacher_outputs = self._teacher_outputs(self.trainer.datamodule)
        super().setup(stage)

    def _teacher_outputs(self, datamodule) -> tuple[int, list[int]] | None:
        """(teacher's class count, position of each data class among its outputs), or None when they coincide.

        The teacher's classes are ``teacher_classes``, else ImageNet-1K for a hub teacher, else the class mapping
        its run recorded beside the checkpoint: a teacher trained on other classes is refused, whatever its count.
        """
        hp = self.hparams
        spec = hp.teacher_classes or ("imagenet1k" if hp.teacher_pretrained
                                      else recorded_class_mapping(hp.teacher_checkpoint))
        if spec is None or datamodule is None:
            return None
        data_folders = datamodule.class_mapping.folders
        teacher_folders = teacher_class_folders(spec, data_folders)
        positions = teacher_output_positions(teacher_folders, data_folders)
        return None if positions == list(range(len(teacher_folders))) else (len(teacher_folders), positions)

    def train(self, mode: bool = True) -> "FKDStudent":
        """Lightning puts the module in train mode every epoch; the teacher stays in eval mode."""
        super().train(mode)
        if getattr(self, "teacher", None) is not None:
            self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(self._memory_format(images))

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def _grid(self) -> int:
        synthetic = getattr(self.trainer.datamodule, "synthetic_set", None) if self._trainer else None
        return synthetic.grid if synthetic is not None else 1

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self._trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        if images.dtype == torch.uint8:
            images = augment_batch(images, self._grid(), self.augment)
        return images, labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        hp = self.hparams
        if hp.track_unmixed_accuracy:
            with torch.no_grad():
                unmixed = (self(images).argmax(1) == labels).float().mean()
            self.log("train/top1_unmixed", unmixed, batch_size=len(labels))
        mixing = hp.mixing if self.augment.enabled else "none"
        batch = mix_batch(images, mixing, hp.cutmix_alpha, hp.mixup_alpha)
        mixed = self._memory_format(batch.images)
        if hp.label_mode == "hard":  # cross-entropy on the set's own labels (both labels of a mixed image)
            loss = mixed_cross_entropy(self.student(mixed), labels, batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(mixed)
        student_logits = self.student(mixed)
        loss = kd_kl_loss(student_logits, teacher_logits, self.temperature, hp.scale_loss_by_t2)
        agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        self.log_dict({"train/loss": loss, "train/teacher_agreement": agreement}, prog_bar=True,
                      batch_size=len(labels))
        return loss

    def on_validation_epoch_end(self) -> None:
        metrics = {name: float(value) for name, value in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        self.log_dict(metrics, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self.final = metrics
        self.validations += 1
        if self.best_top1 is None or metrics["val/top1"] > self.best_top1:
            self.best_top1, self.best_epoch = metrics["val/top1"], self.current_epoch
        self.log("val/top1_best", self.best_top1)

    def summary(self) -> dict:
        """Final and best validation accuracy of this fit, as written to ``summary.json``."""
        return {
            "final_top1": self.final.get("val/top1"),
            "final_top5": self.final.get("val/top5"),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "epochs": self.current_epoch,
            "optimizer_steps": self.trainer.global_step,
            "validations": self.validations,
            "teacher": self.hparams.teacher if self.hparams.label_mode == "soft" else None,
            "student": self.hparams.student,
            "label_mode": self.hparams.label_mode,
            "augmentation": self.augment.enabled,
            "peak_memory_mb": peak_memory_mb(self.device),
        }

    def on_fit_start(self) -> None:
        """The sanity gate and the protocol card: the teacher's top-1 on the real validation data must reach
        ``min_teacher_top1`` (a random teacher, a control, is exempt); ``protocol.json`` in the log dir records
        what this result was measured with."""
        hp = self.hparams
        teacher_top1 = None
        if self.teacher is not None and self.trainer.datamodule is not None:
            teacher_top1 = teacher_accuracy(self.teacher, self.trainer.datamodule.val_dataloader(), self.device)
            floor = hp.min_teacher_top1 if hp.min_teacher_top1 is not None else 2 / hp.num_classes
            if teacher_top1 is not None and not hp.random_teacher and teacher_top1 < floor:
                raise DataError(f"the teacher's top-1 on the real validation data is {teacher_top1:.3f}, below the "
                                f"gate {floor:.3f} (twice chance unless min_teacher_top1 says otherwise): wrong "
                                "weights or wrong classes? (min_teacher_top1=0 accepts it)")
        log_dir = rank_zero_log_dir(self.trainer)
        if log_dir is not None:
            path = log_dir / PROTOCOL_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.protocol_card(teacher_top1), indent=1))

    def protocol_card(self, teacher_top1: float | None) -> dict:
        """What a result was measured with: teacher and its real-val top-1, student, label mode, optimiser and
        schedule, augmentation, normalisation, mixing, epochs, the global batch size, the world size and the batch
        per device, class order, precision."""
        hp, trainer = self.hparams, self.trainer
        datamodule = trainer.datamodule
        return {
            "label_mode": hp.label_mode,
            "teacher": None if self.teacher is None else {
                "name": hp.teacher, "checkpoint": hp.teacher_checkpoint, "pretrained": hp.teacher_pretrained,
                "random": hp.random_teacher, "real_val_top1": teacher_top1},
            "student": {"name": hp.student, "kwargs": hp.student_kwargs, "lr": self.lr},
            "optimizer": {"name": hp.optimizer, "weight_decay": hp.weight_decay, "schedule": hp.schedule},
            "augmentation": asdict(self.augment),
            "mixing": hp.mixing if self.augment.enabled else "none",
            "temperature": self.temperature if hp.label_mode == "soft" else None,
            "epochs": trainer.max_epochs,
            "batch_size": getattr(datamodule, "batch_size", None),
            "world_size": trainer.world_size,
            "device_batch_size": getattr(datamodule, "device_batch_size", None),
            "classes": list(datamodule.class_mapping.folders) if hasattr(datamodule, "class_mapping") else None,
            "precision": str(trainer.precision),
        }

    def on_fit_end(self) -> None:
        log_dir = rank_zero_log_dir(self.trainer)
        if log_dir is not None and not self.trainer.interrupted:
            path = log_dir / SUMMARY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.summary(), indent=1))

    def configure_optimizers(self):
        hp = self.hparams
        params = (weight_decay_groups(self.student, hp.weight_decay) if hp.decay_weights_only
                  else self.student.parameters())
        optimizer = build_optimizer(params, hp.optimizer, self.lr, hp.weight_decay, hp.momentum, hp.betas)
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError("FKDStudent's per-epoch schedule needs trainer.max_epochs")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, epochs, hp.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints keep the student and the best-accuracy record; the teacher is rebuilt from its source."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["fkd_record"] = {"best_top1": self.best_top1, "best_epoch": self.best_epoch,
                                    "final": self.final, "validations": self.validations}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        record = checkpoint.get("fkd_record", {})
        self.best_top1, self.best_epoch = record.get("best_top1"), record.get("best_epoch")
        self.final, self.validations = record.get("final", {}), record.get("validations", 0)


@torch.no_grad()
def teacher_accuracy(teacher: torch.nn.Module, batches, device: torch.device) -> float | None:
    """Top-1 of ``teacher`` over real ``ImageBatch`` batches (None when there are none)."""
    right = total = 0
    for batch in batches:
        if batch.labels.numel() == 0:
            continue
        predictions = teacher(batch.images.to(device)).argmax(1).cpu()
        right += int((predictions == batch.labels).sum())
        total += len(batch.labels)
    return right / total if total else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: the GPU's allocated peak on a GPU; on the CPU the process's peak resident set so far
    (cells run inline in one process share it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""Knowledge distillation as RDED evaluates a synthetic set: the soft-label loss and RDED's protocol rules
(temperature per mixing, learning-rate schedule, batch size, learning rate per architecture, validation cadence),
and the training length of IDC's hard-label protocol (Minimax, Li et al.)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

# RDED (argument.py): the distillation temperature that goes with each mixing.
RDED_TEMPERATURE = {"cutmix": 20.0, "mixup": 4.0}
Schedule = Literal["half_cosine", "cosine", "multistep", "constant"]
MULTISTEP_GAMMA = 0.2  # IDC: MultiStepLR(milestones=[2E // 3, 5E // 6], gamma=0.2)
IDC_EPOCHS = ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500))  # (up to this IPC, epochs); then 300


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               scale_by_t2: bool = False) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch (``KLDivLoss(reduction="batchmean")``).

    ``scale_by_t2`` multiplies by T^2 (Hinton et al.); RDED does not.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    loss = F.kl_div(log_student, target, reduction="batchmean")
    return loss * temperature**2 if scale_by_t2 else loss


def lr_factor(epoch: int, epochs: int, schedule: Schedule) -> float:
    """Learning-rate multiplier at ``epoch`` (0-based) of ``epochs``.

    ``half_cosine`` is RDED's ``0.5 (1 + cos(pi * epoch / (2 * epochs)))``: from 1 down to 0.5 at the end;
    ``cosine`` goes down to 0; ``multistep`` is IDC's (Minimax, Li et al.): x 0.2 from epoch ``2E // 3`` and again
    from ``5E // 6``; ``constant`` stays 1.
    """
    if schedule == "half_cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / (2 * epochs)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "multistep":
        return MULTISTEP_GAMMA ** sum(epoch >= milestone for milestone in (2 * epochs // 3, 5 * epochs // 6))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose 'half_cosine', 'cosine', 'multistep' or 'constant'")


def idc_epochs(ipc: int, num_classes: int) -> int:
    """IDC's training length for a hard-label student (Minimax's / Li et al.'s ``argument.py``, ``ipc_epoch``): 3000
    epochs at IPC 1, 2000 up to IPC 10, 1500 up to 50, 1000 up to 200, 500 up to 500, else 300; for exactly 100
    classes two thirds of that, rounded down to hundreds (ImageNet-100 at IPC 10: 1300), as the code computes it;
    other class counts (1000 included) keep the table's value."""
    epochs = next((e for bound, e in IDC_EPOCHS if ipc <= bound), 300)
    if num_classes == 100:
        epochs = int((2 / 3) * epochs)
        epochs -= epochs % 100
    return epochs


def rded_batch_size(ipc: int, num_classes: int) -> int:
    """RDED's batch size: 10 / 50 / 100 from IPC 1 / 10 / 50 up, doubled for 100+ classes, at most IPC x classes.

    RDED defines IPC 1, 10 and 50 only; IPCs in between take the size of the step below, IPC 100 that of 50.
    """
    base = 100 if ipc >= 50 else 50 if ipc >= 10 else 10
    if num_classes >= 100:
        base *= 2
    return min(base, ipc * num_classes)


def learning_rate_for(model_name: str, table: dict[str, float]) -> float:
    """The learning rate of the first ``table`` key contained in ``model_name`` (case-insensitive)."""
    name = model_name.lower()
    for key, lr in table.items():
        if key.lower() in name:
            return lr
    raise ValueError(f"no learning rate for student {model_name!r}: give lr, or add a key of its name to "
                     f"lr_by_architecture (keys: {list(table)})")


def idc_validates(epoch: int, max_epochs: int, divisions: int = 100) -> bool:
    """IDC's cadence (Minimax's ``train.py``): validate after 1-based epoch ``epoch + 1`` when it is a multiple of
    ``max_epochs // divisions`` (every epoch when that is 0: runs shorter than ``divisions`` epochs)."""
    return (epoch + 1) % max(1, max_epochs // divisions) == 0


def rded_validates(epoch: int, max_epochs: int, every: int = 10, last_fraction: float = 0.2) -> bool:
    """RDED's cadence: validate after epoch ``epoch`` (0-based) when it ends a block of ``every`` epochs in the
    last ``last_fraction`` of training; the last epoch is always validated."""
    if epoch == max_epochs - 1:
        return True
    return epoch % every == every - 1 and epoch > max_epochs * (1 - last_fraction)

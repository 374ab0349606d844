"""DD-Ranking's scores (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", 2025), as plain
functions of accuracies given as FRACTIONS (0.52, not 52).

* HLR (hard label recovery) = Acc(real, hard) - Acc(syn, hard): how much of the full real data's hard-label
  accuracy the synthetic set fails to recover (lower is better).
* IOR (improvement over random) = Acc(syn, any) - Acc(random, any): the gain over randomly chosen real images at
  the same IPC under the same protocol.
* LRS (label-robust score) = (e^alpha - e^-1) / (e - e^-1) with alpha = w IOR - (1 - w) HLR, w = 0.5.
* ARS (augmentation-robust score) = (e^beta - e^-1) / (e - e^-1) with
  beta = g [Acc(syn, aug) - Acc(random, aug)] + (1 - g) [Acc(syn, noaug) - Acc(random, noaug)], g = 0.5.

LRS and ARS map alpha, beta in [-1, 1] monotonically onto [0, 1]; 0.5 is not "no gain" (that is e^0 -> 0.27).
"""

from __future__ import annotations

import math


def hard_label_recovery(real_hard: float, synthetic_hard: float) -> float:
    """HLR = Acc(real, hard) - Acc(syn, hard)."""
    return real_hard - synthetic_hard


def improvement_over_random(synthetic: float, random: float) -> float:
    """IOR = Acc(syn) - Acc(random), both under the same protocol."""
    return synthetic - random


def robust_score(value: float) -> float:
    """DD-Ranking's map of alpha / beta in [-1, 1] onto [0, 1]: (e^x - e^-1) / (e - e^-1)."""
    return (math.exp(value) - math.exp(-1)) / (math.e - math.exp(-1))


def label_robust_score(real_hard: float, synthetic_hard: float, synthetic: float, random: float,
                       weight: float = 0.5) -> float:
    """LRS from alpha = w IOR - (1 - w) HLR."""
    alpha = weight * improvement_over_random(synthetic, random) - (1 - weight) * hard_label_recovery(
        real_hard, synthetic_hard)
    return robust_score(alpha)


def augmentation_robust_score(synthetic_aug: float, random_aug: float, synthetic_noaug: float, random_noaug: float,
                              weight: float = 0.5) -> float:
    """ARS from beta = g (Acc(syn, aug) - Acc(rand, aug)) + (1 - g) (Acc(syn, noaug) - Acc(rand, noaug))."""
    beta = weight * (synthetic_aug - random_aug) + (1 - weight) * (synthetic_noaug - random_noaug)
    return robust_score(beta)

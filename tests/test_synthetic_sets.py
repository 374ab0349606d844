"""The demo's figures of a synthetic set: teacher recognition and class diversity."""

from __future__ import annotations

import pytest
import torch

from patchdd.evaluation.synthetic_sets import class_diversity, recognition_rate


def test_class_diversity_is_zero_for_copies_and_near_one_for_unrelated_images():
    generator = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 3, 16, 16), generator=generator, dtype=torch.uint8)
    copies = torch.cat([one, one, (one.float() * 0.5 + 20).to(torch.uint8)])  # a darker copy is still a copy
    labels = torch.tensor([0, 0, 0])
    assert class_diversity(copies, labels) == pytest.approx(0.0, abs=1e-3)
    noise = torch.randint(0, 256, (20, 3, 16, 16), generator=generator, dtype=torch.uint8)
    assert class_diversity(noise, torch.arange(20) % 2) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="at least two images"):
        class_diversity(noise[:2], torch.tensor([0, 1]))


class BrightnessClassifier(torch.nn.Module):
    """Class 1 when the image is bright, else class 0."""

    def forward(self, x):
        bright = x.mean(dim=(1, 2, 3)) > 0
        return torch.stack([(~bright).float(), bright.float()], dim=1)


def test_recognition_rate_counts_the_images_assigned_to_their_label():
    images = torch.cat([torch.zeros(3, 3, 20, 20), torch.full((5, 3, 20, 20), 250.0)]).to(torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    model = BrightnessClassifier()
    assert recognition_rate(model, images, labels, 8, [0.5] * 3, [0.5] * 3, batch_size=3) == 1.0
    assert recognition_rate(model, images, 1 - labels, 8, [0.5] * 3, [0.5] * 3) == 0.0
    assert recognition_rate(model, images, torch.zeros(8, dtype=torch.long), 8, [0.5] * 3, [0.5] * 3) == 3 / 8

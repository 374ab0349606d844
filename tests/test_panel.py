"""The fairness panel: DD-Ranking's scores against hand-computed values, and the protocol switches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from patchdd.evaluation.ddranking import (augmentation_robust_score, hard_label_recovery, improvement_over_random,
                                          label_robust_score, robust_score)


def test_ddranking_scores_match_hand_computed_values() -> None:
    # real hard 0.90, synthetic hard 0.40, synthetic (soft) 0.70, random real images (soft) 0.55
    assert hard_label_recovery(0.90, 0.40) == pytest.approx(0.50)
    assert improvement_over_random(0.70, 0.55) == pytest.approx(0.15)
    alpha = 0.5 * 0.15 - 0.5 * 0.50  # = -0.175
    assert label_robust_score(0.90, 0.40, 0.70, 0.55) == pytest.approx(
        (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert label_robust_score(0.90, 0.40, 0.70, 0.55) == pytest.approx(0.2006, abs=1e-4)
    beta = 0.5 * (0.70 - 0.55) + 0.5 * (0.30 - 0.35)  # aug: 0.70 vs 0.55, no aug: 0.30 vs 0.35 -> 0.05
    assert augmentation_robust_score(0.70, 0.55, 0.30, 0.35) == pytest.approx(
        (math.exp(beta) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert augmentation_robust_score(0.70, 0.55, 0.30, 0.35) == pytest.approx(0.2908, abs=1e-4)


def test_robust_score_maps_the_extremes_onto_zero_and_one() -> None:
    assert robust_score(-1.0) == pytest.approx(0.0) and robust_score(1.0) == pytest.approx(1.0)
    assert robust_score(0.0) == pytest.approx(0.2689, abs=1e-4)  # no gain is not 0.5
    assert label_robust_score(1.0, 1.0, 0.5, 0.5) == pytest.approx(robust_score(0.0))


# ------------------------------------------------------------------------------------------ random_real
def test_random_real_gives_whole_images_seeded_per_class_and_never_tiled(tmp_path) -> None:
    import numpy as np

    from patchdd.methods.composition import LayoutOptions
    from patchdd.methods.registry import SynthesisOptions
    from patchdd.methods.synthesis import synthetic_set
    from test_distill import HEIGHT, WIDTH, random_rows, write_images, write_store

    counts = {"cls_a": 6, "cls_b": 6}
    write_images(tmp_path / "images", counts)
    write_store(tmp_path / "store", tmp_path / "images", random_rows(counts), list(counts))
    options = SynthesisOptions(selector="random_real", layout=LayoutOptions(output_size=32), seed=3)
    synthetic, picks = synthetic_set(tmp_path / "store", 4, "all", options, progress=False)
    assert synthetic.grid == 1 and synthetic.images.shape == (8, 3, 32, 32)  # IPC 4 <= 10, yet one image each
    side = min(WIDTH, HEIGHT)
    x0 = (WIDTH - side) // 2
    assert all(list(box) == [x0, 0, x0 + side, side] for box in picks.boxes)  # the centred square
    for folder in counts:  # distinct images of their own class
        ids = [i for i in picks.image_ids if i.startswith(folder)]
        assert len(ids) == len(set(ids)) == 4
    only_b = synthetic_set(tmp_path / "store", 4, "cls_b", options, progress=False)[1]
    assert list(only_b.image_ids) == [i for i in picks.image_ids if i.startswith("cls_b")]  # seeded per class
    other_seed = synthetic_set(tmp_path / "store", 4, "cls_b", SynthesisOptions(
        selector="random_real", layout=LayoutOptions(output_size=32), seed=4), progress=False)[1]
    assert list(other_seed.image_ids) != list(only_b.image_ids)
    assert np.isnan(picks.scores).all()


# ------------------------------------------------------------------------------------------ protocol switches
def test_no_augmentation_is_resize_and_normalize_only() -> None:
    import torch
    import torch.nn.functional as F

    from patchdd.data.pixels import normalize
    from patchdd.training.augment import AugmentOptions, augment_batch, per_sample_transform

    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    options = AugmentOptions(enabled=False, image_size=32)
    expected = normalize(F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True),
                         options.mean, options.std)
    assert torch.allclose(augment_batch(images, 2, options), expected, atol=1e-5)  # no shuffle, crop or flip
    assert torch.allclose(augment_batch(images, 2, options), augment_batch(images, 2, options))  # deterministic
    assert torch.allclose(per_sample_transform(2, options)(images[0]), expected[0], atol=0.05)


def test_hard_label_student_needs_no_teacher_and_learns_the_labels(tmp_path) -> None:
    import lightning as L
    import torch

    from patchdd.lightning_modules.student import FKDStudent
    from patchdd.training.augment import AugmentOptions
    from student_helpers import SIZE, SquaresData

    torch.manual_seed(0)
    model = FKDStudent(student="convnet_d2", student_kwargs={"width": 8}, model_image_size=SIZE, lr=3e-3,
                       label_mode="hard", augment=AugmentOptions(image_size=SIZE, enabled=False))
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, SquaresData(ipc=8, val_per_class=10, batch_size=8))
    assert model.teacher is None
    summary = model.summary()
    assert summary["label_mode"] == "hard" and summary["augmentation"] is False and summary["teacher"] is None
    assert summary["final_top1"] > 0.6  # coloured squares: the labels alone teach it


# ------------------------------------------------------------------------------------------ sanity gates
def gated_fit(tmp_path, **options):
    import lightning as L
    import torch

    from patchdd.lightning_modules.student import FKDStudent
    from patchdd.training.augment import AugmentOptions
    from student_helpers import SIZE, SquaresData, train_teacher

    tmp_path.mkdir(parents=True, exist_ok=True)
    teacher = train_teacher(tmp_path / "teacher.pt", steps=options.pop("teacher_steps"))
    torch.manual_seed(0)
    model = FKDStudent(teacher="convnet_d2", student="convnet_d2", teacher_checkpoint=str(teacher),
                       teacher_kwargs={"width": 16}, student_kwargs={"width": 8}, model_image_size=SIZE, lr=3e-3,
                       augment=AugmentOptions(image_size=SIZE), **options)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""))
    trainer.fit(model, SquaresData(ipc=2, val_per_class=10, batch_size=4))
    return tmp_path


def test_a_teacher_below_the_gate_is_refused_and_a_good_one_gets_a_protocol_card(tmp_path) -> None:
    import json

    from patchdd.errors import DataError

    with pytest.raises(DataError, match="below the gate 0.500"):  # an untrained teacher: about chance (0.25)
        gated_fit(tmp_path / "bad", teacher_steps=0)
    run = gated_fit(tmp_path / "good", teacher_steps=60)
    card = json.loads((run / "protocol.json").read_text())
    assert card["label_mode"] == "soft" and card["teacher"]["real_val_top1"] >= 0.5
    assert card["classes"] == ["red", "green", "blue", "yellow"] and card["epochs"] == 1
    assert card["mixing"] == "cutmix" and card["augmentation"]["enabled"] is True
    gated_fit(tmp_path / "forced", teacher_steps=0, min_teacher_top1=0)  # the gate can be lowered


def test_a_plain_set_whose_classes_are_not_the_real_datas_is_refused(tmp_path) -> None:
    from PIL import Image

    from patchdd.datamodules.distilled import DistilledDataModule
    from patchdd.datamodules.real import ImageFolderDataModule
    for folder in ("000", "001"):  # another method's label order, as numbered folders
        (tmp_path / "set" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "set" / folder / "a.png")
    for split in ("train", "val"):
        for wnid in ("n01440764", "n02102040"):
            (tmp_path / "real" / split / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "real" / split / wnid / "a.png")
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['000', '001'\]"):  # labels matched by folder
        DistilledDataModule(synthetic_dir=str(tmp_path / "set"), real=ImageFolderDataModule(str(tmp_path / "real")))


def test_ddranking_code_units_average_per_run_scores_of_percentages() -> None:
    """``panel_units: ddranking_code`` gives what DD-Ranking's soft_label.py / aug_robust.py print: per run
    hlr = full - syn_hard, ior = syn - random (percent), alpha = 0.5 ior - 0.5 hlr, lrs = (e^alpha - e^-1) /
    (e - e^-1), then the mean over runs; ``fractions`` scores the mean accuracies as fractions."""
    import math

    from patchdd.workflows.panel import panel_scores

    def row(selector, protocol, seed, top1):
        return {"ipc": 10, "selector": selector, "student": "S", "protocol": protocol, "seed": seed,
                "status": "done", "final_top1": top1}

    rows = [row("d", "soft_aug", 0, 0.52), row("d", "soft_aug", 1, 0.50), row("random_real", "soft_aug", 0, 0.49),
            row("random_real", "soft_aug", 1, 0.49), row("d", "hard_aug", 0, 0.30), row("d", "hard_aug", 1, 0.28),
            row("d", "soft_noaug", 0, 0.40), row("d", "soft_noaug", 1, 0.41),
            row("random_real", "soft_noaug", 0, 0.39), row("random_real", "soft_noaug", 1, 0.38)]

    def code_lrs(full, hard, syn, rand):  # DD-Ranking's lines, in percent
        alpha = 0.5 * (syn - rand) - 0.5 * (full - hard)
        return (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1))

    code = panel_scores(rows, 10, "d", "S", real_hard=0.90, units="ddranking_code")
    expected = (code_lrs(90, 30, 52, 49) + code_lrs(90, 28, 50, 49)) / 2
    assert code["LRS"] == pytest.approx(expected, rel=1e-9) and code["LRS"] < 1e-9  # percentages: a tiny exponential
    beta = [0.5 * (52 - 49) + 0.5 * (40 - 39), 0.5 * (50 - 49) + 0.5 * (41 - 38)]
    assert code["ARS"] == pytest.approx(np.mean([(math.exp(b) - math.exp(-1)) / (math.e - math.exp(-1))
                                                 for b in beta]), rel=1e-9)
    ours = panel_scores(rows, 10, "d", "S", real_hard=0.90)
    alpha = 0.5 * (0.51 - 0.49) - 0.5 * (0.90 - 0.29)
    assert ours["LRS"] == pytest.approx((math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1)), rel=1e-9)
    assert ours["IOR"] == pytest.approx(code["IOR"]) and ours["HLR"] == pytest.approx(code["HLR"])

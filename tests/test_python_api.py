"""The notebook API: ``patchdd.score`` (Stage I through the same command as ``patchdd predict``), ``SyntheticSet``
as a ``torch.utils.data.Dataset``, and ``patchdd.evaluate`` (a student fit through the same command as
``patchdd fit``) returning the student's summary."""

from __future__ import annotations

from pathlib import Path

import torch

import patchdd

FAST_SCORING = {"model.num_draws": 2, "model.dift_ensemble": 1, "model.patch_size": 32, "data.num_workers": 0,
                "data.batch_size": 8, "trainer.accelerator": "cpu", "trainer.enable_progress_bar": False}


def test_score_then_a_synthetic_set_feeds_a_dataloader(toy_root, prior_dir, tmp_path) -> None:
    folders = sorted(p.name for p in (toy_root / "train").iterdir())[1:4]
    store = patchdd.score(str(toy_root), str(prior_dir), str(tmp_path / "store"), classes=folders,
                          config="configs/score/toy.yaml",
                          options=FAST_SCORING | {"trainer.default_root_dir": str(tmp_path / "logs")})
    assert store.is_complete() and store.manifest.classes["folders"] == folders  # --data.classes: the subset
    assert len(store.done_ids()) == 3 * 6  # every training image of the three classes
    images, _ = patchdd.synthetic_set(tmp_path / "store", ipc=1, classes="all",
                                      synthesis=patchdd.SynthesisOptions(selector="random"), progress=False)
    assert isinstance(images, torch.utils.data.Dataset)
    image, label = images[2]
    assert image.dtype == torch.uint8 and image.shape == images.images.shape[1:] and label == 2
    batches = list(torch.utils.data.DataLoader(images, batch_size=2))
    assert [len(b[0]) for b in batches] == [2, 1] and torch.equal(torch.cat([b[1] for b in batches]), images.labels)


def test_evaluate_returns_the_students_summary(tmp_path) -> None:
    from student_helpers import CLASSES, SIZE, write_real_folder, write_synthetic_export
    from test_matrix import base_config

    from patchdd.training.zoo import build_model

    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc2", ipc=2)
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("convnet_d2", len(CLASSES), image_size=SIZE, width=8).state_dict(), teacher)
    summary = patchdd.evaluate(str(tmp_path / "syn" / "ipc2"), str(tmp_path / "real"), "convnet_d2", str(teacher),
                               student="convnet_d1", out=str(tmp_path / "run"), configs=[str(base_config(tmp_path))],
                               options={"model.teacher_kwargs": {"width": 8}, "model.student_kwargs": {"width": 8}})
    assert summary["epochs"] == 1 and 0.0 <= summary["final_top1"] <= 1.0
    assert Path(tmp_path / "run").is_dir()

"""Stage I and the evaluation from Python, through the very commands the command line runs.

``score`` is ``patchdd predict -c CONFIG --data.root ... --model.prior ... --store.dir ...``; ``evaluate`` is
``patchdd fit -c configs/student/rded_defaults.yaml [-c PRESET] ...`` with the set, the teacher and the student
given; both take any further option as ``options={"trainer.devices": 8}``, as ``--trainer.devices 8`` would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from patchdd.formats.score_store import ScoreStore
from patchdd.formats.stores import MANIFEST_FILE
from patchdd.lightning_modules.student import SUMMARY_FILE
from patchdd.workflows.invoke import run_trainer_command


def option_args(options: dict | None) -> list[str]:
    """``{"trainer.max_epochs": 2}`` as ``["--trainer.max_epochs", "2"]`` (non-strings as JSON)."""
    return [arg for key, value in (options or {}).items()
            for arg in (f"--{key}", value if isinstance(value, str) else json.dumps(value))]


def score(data_root: str, prior: str, out: str, classes: str | Sequence[str] | None = "all",
          config: str = "configs/score/sd15_imagenet.yaml", options: dict | None = None) -> ScoreStore:
    """Score a dataset's training images into a score store (Stage I): ``patchdd predict -c config`` with the data
    root, the prior and the store's folder; a cut run resumes when called again.

    Args:
        data_root: the ImageFolder root (``train/<class>/...``).
        prior: an SD-layout prior: a hub id or a local folder (``assets/toy_prior``).
        out: the score store's folder.
        classes: ``all``, a preset (``imagenette``...) or class folders / names.
        config: the scoring config (``configs/score/toy.yaml`` for the toy data).
        options: any other option of ``patchdd predict``, e.g. ``{"trainer.devices": 8}``.
    """
    args = ["predict", "-c", config, "--data.root", str(data_root), "--model.prior", str(prior), "--store.dir",
            str(out)]
    if classes is not None:
        listed = classes if isinstance(classes, str) else ",".join(classes)
        args += ["--data.classes", listed]
    run_trainer_command(args + option_args(options))
    return ScoreStore.open(out)


def evaluate(synthetic: str, real_root: str, teacher: str, teacher_checkpoint: str | None = None,
             student: str = "resnet18", out: str = "runs/student/evaluate",
             configs: Sequence[str] = ("configs/student/rded_defaults.yaml",), options: dict | None = None) -> dict:
    """Train a student on a synthetic set with a frozen teacher's soft labels (RDED's protocol by default) and
    return its ``summary.json`` (final and best top-1 on the real validation split, the protocol card).

    Args:
        synthetic: an exported set's folder (``OUT/ipc10``), any ImageFolder of synthetic images, or a score store
            (then ``options={"data.ipc": 10}`` says the IPC).
        real_root: the real data's root (its validation split scores the student).
        teacher: the teacher's zoo name (``resnet18``, ``convnet_d3``, ``tv:resnet18``).
        teacher_checkpoint: the teacher's run folder or checkpoint (``None``: the configs' or pretrained weights).
        student: the student's zoo name.
        out: the run's folder (``trainer.default_root_dir``).
        configs: the configs stacked, in order (a preset after ``rded_defaults.yaml``).
        options: any other option of ``patchdd fit``, e.g. ``{"trainer.max_epochs": 300}``.
    """
    is_store = (Path(synthetic) / MANIFEST_FILE).is_file()
    args = ["fit", *(arg for config in configs for arg in ("-c", config)),
            "--data.store", str(synthetic) if is_store else "null",
            "--data.synthetic_dir", "null" if is_store else str(synthetic), "--data.real.root", str(real_root),
            "--model.teacher", teacher, "--model.student", student, "--trainer.default_root_dir", str(out)]
    if teacher_checkpoint is not None:
        args += ["--model.teacher_checkpoint", str(teacher_checkpoint)]
    run_trainer_command(args + option_args(options))
    summaries = sorted(Path(out).rglob(SUMMARY_FILE), key=lambda path: path.stat().st_mtime)
    if not summaries:
        raise FileNotFoundError(f"the student run under {out} wrote no {SUMMARY_FILE}")
    return json.loads(summaries[-1].read_text())

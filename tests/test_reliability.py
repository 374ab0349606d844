"""Fault injection: inputs and interruptions that used to go wrong silently, each pinned by a test."""

from __future__ import annotations

import os
import time
import shutil
import signal
import struct
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from patchdd.data.sources import open_rgb, scan_class_folders
from patchdd.datamodules.score_writer import ScoreStoreWriter
from patchdd.errors import DataError, StoreError, StoreMismatchError
from patchdd.formats.score_store import MANIFEST_FILE, ScoreStore
from test_scoring import raw_row_count, run_predict, scorer, scoring_data


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (greyscale (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 16-bit RGB."""
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_greyscale_png_is_scaled_not_white(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    image = np.asarray(open_rgb(write_png16(tmp_path / "grey16.png", ramp)))
    assert image.dtype == np.uint8 and image.shape == (8, 32, 3)
    assert image[0, 0].tolist() == [0, 0, 0] and image[0, -1].tolist() == [255, 255, 255]
    assert np.allclose(image[0, :, 0], np.round(ramp[0] / 257), atol=1)  # a ramp, not a white image


def test_16_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), np.uint16)
    pixels[..., 0], pixels[..., 1] = 65535, 32896
    image = np.asarray(open_rgb(write_png16(tmp_path / "rgb16.png", pixels)))
    assert image[0, 0].tolist() == [255, 128, 0]


def test_hidden_folders_inside_class_folders_are_not_images(tmp_path: Path) -> None:
    for name in ("cat/a.png", "cat/.ipynb_checkpoints/a-checkpoint.png", "cat/._b.png", "cat/sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert scan_class_folders(tmp_path, ["cat"]).ids == ["cat/a.png", "cat/sub/c.png"]




# ------------------------------------------------------------------------------------------ Stage I store
def two_class_images(root: Path, sizes=((48, 32), (40, 40), (32, 48)), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "train" / name / f"{i}.png")
    return root


def test_resuming_a_store_on_other_data_is_a_mismatch_naming_the_difference(prior_dir, tmp_path) -> None:
    first = two_class_images(tmp_path / "first")
    run_predict(prior_dir, first, tmp_path / "store")
    other_root = shutil.copytree(first, tmp_path / "other")
    with pytest.raises(StoreMismatchError, match="data root"):  # same files, another root
        run_predict(prior_dir, other_root, tmp_path / "store")
    (first / "train" / "dog" / "2.png").unlink()  # same root, one image fewer
    with pytest.raises(StoreMismatchError, match="class dog: 3 images in the store's data, 2 now"):
        run_predict(prior_dir, first, tmp_path / "store")
    Image.new("RGB", (96, 64)).save(first / "train" / "dog" / "2.png")  # same name, other file (a resized copy)
    with pytest.raises(StoreMismatchError, match="class dog: same image count, other files"):
        run_predict(prior_dir, first, tmp_path / "store")
    assert len(ScoreStore.open(tmp_path / "store").done_ids()) == 6  # nothing was mixed in


def test_a_failed_first_run_leaves_no_store_behind(prior_dir, tmp_path) -> None:
    root = two_class_images(tmp_path / "images")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        run_predict(prior_dir, root, tmp_path / "store")
    (root / "train" / "empty").rmdir()
    with pytest.raises(Exception, match="no_such_prior"):  # a misspelled prior: fails after the data is read
        run_predict(tmp_path / "no_such_prior", root, tmp_path / "store")
    assert not (tmp_path / "store" / MANIFEST_FILE).exists()
    run_predict(prior_dir, root, tmp_path / "store")  # the corrected command just runs
    assert len(ScoreStore.open(tmp_path / "store").done_ids()) == 6


def test_a_garbage_manifest_is_a_store_error(tmp_path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        ScoreStore.open(tmp_path)


class SigtermAfterFirstBatch(L.Callback):
    """Delivers SIGTERM to this process once the first batch is done, as SLURM does before pre-empting a job."""

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.predict_loop.batch_progress.current.completed == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_scoring_after_the_current_batch_and_keeps_it(prior_dir, tmp_path) -> None:
    root = two_class_images(tmp_path / "images")
    trainer = L.Trainer(callbacks=[SigtermAfterFirstBatch(), ScoreStoreWriter(str(tmp_path / "store"))],
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(SystemExit):
        trainer.predict(scorer(prior_dir), datamodule=scoring_data(root), return_predictions=False)
    assert len(ScoreStore.open(tmp_path / "store").done_ids()) == 2  # one batch of 2, no more
    run_predict(prior_dir, root, tmp_path / "store")  # the same command resumes
    assert len(ScoreStore.open(tmp_path / "store").done_ids()) == 6


def test_ddp_resume_with_fewer_pending_images_than_ranks(prior_dir, tmp_path) -> None:
    """A SLURM requeue near the end of a run: 1 image left, 2 ranks; the idle rank finishes cleanly."""
    root = two_class_images(tmp_path / "images")
    run_predict(prior_dir, root, tmp_path / "store", batch_size=1)  # one shard per image
    store = ScoreStore.open(tmp_path / "store")
    store.shard_paths()[-1].unlink()
    assert len(store.done_ids()) == 5
    run_predict(prior_dir, root, tmp_path / "store", batch_size=1,
                trainer_kwargs={"devices": 2, "strategy": "ddp_fork", "use_distributed_sampler": False})
    assert len(store.done_ids()) == 6  # the missing image, once (2 patches per image, none written twice):
    assert raw_row_count(tmp_path / "store") == len(store.read()) == 12


# ------------------------------------------------------------------------------------------ Stage II input
def test_empty_class_list_and_negative_ipc_are_clear_errors() -> None:
    from patchdd.data.subsets import resolve_classes
    from patchdd.methods.composition import LayoutOptions
    from patchdd.methods.synthesis import patch_count

    with pytest.raises(ValueError, match="names no class"):
        resolve_classes("", ["a", "b"])
    with pytest.raises(ValueError, match="names no class"):
        resolve_classes(" , ", ["a", "b"])
    with pytest.raises(ValueError, match="IPC must be at least 1, got -1"):
        patch_count(-1, LayoutOptions())


# ------------------------------------------------------------------------------------------ Stage II outputs
@pytest.fixture
def small_store(tmp_path) -> tuple[Path, Path]:
    from test_distill import random_rows, write_images, write_store

    counts = {"cls_a": 12, "cls_b": 12}
    write_images(tmp_path / "images", counts)
    write_store(tmp_path / "store", tmp_path / "images", random_rows(counts), list(counts))
    return tmp_path / "images", tmp_path / "store"


def distill_small(store: Path, out: Path, **kwargs) -> None:
    from patchdd.methods.registry import SynthesisOptions
    from patchdd.workflows.distill import distill
    from test_distill import FAST, LAYOUT

    synthesis = SynthesisOptions(selector="random", layout=LAYOUT, clustering=FAST, **kwargs)
    distill(str(store), str(out), ipc=[2], classes="all", synthesis=synthesis, overwrite=True, progress=False)


def test_a_failing_distill_keeps_the_old_output_whole(small_store, tmp_path, monkeypatch) -> None:
    from patchdd.formats import synthetic_folder
    from patchdd.formats.synthetic_folder import SyntheticFolderWriter, save_png

    _, store = small_store
    out = tmp_path / "out"
    distill_small(store, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())

    def fail(self, info):
        raise RuntimeError("disk full")

    writes = {"started": 0, "finished": 0}

    def slow_png(image, path):  # PNGs still being encoded on their threads when the run fails
        writes["started"] += 1
        time.sleep(0.05)
        save_png(image, path)
        writes["finished"] += 1

    monkeypatch.setattr(SyntheticFolderWriter, "close", fail)
    monkeypatch.setattr(synthetic_folder, "save_png", slow_png)
    with pytest.raises(RuntimeError, match="disk full"):
        distill_small(store, out, seed=1)
    assert writes["started"] == writes["finished"] > 0  # no write still running into the removed building folder
    time.sleep(0.2)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before  # nothing lost or mixed
    assert not [p for p in out.iterdir() if ".building-" in p.name]


def test_two_runs_into_one_output_do_not_interleave(small_store, tmp_path) -> None:
    from patchdd.formats.outputs import OutputBusyError, exclusive_output

    _, store = small_store
    with exclusive_output(tmp_path / "out"):  # a first run holds the output
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
            distill_small(store, tmp_path / "out")
    distill_small(store, tmp_path / "out")  # free again once the first run is done
    assert (tmp_path / "out" / "ipc2" / "synthetic.json").is_file()


def resized_copy(root: Path, copy: Path, scale: float) -> Path:
    """Every PNG under ``root`` resized by ``scale`` into the same place under ``copy``."""
    for path in root.rglob("*.png"):
        target = copy / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.resize((int(image.width * scale), int(image.height * scale))).save(target)
    return copy


def test_a_resized_copy_is_an_error_naming_the_image(small_store, tmp_path) -> None:
    images, store = small_store
    resized = resized_copy(images, tmp_path / "resized", 0.5)
    with pytest.raises(DataError, match=r"image 'cls_a/img_\d+\.png' is 24x20, the store scored it at 48x40"):
        distill_small(store, tmp_path / "out", images_root=str(resized))


# ------------------------------------------------------------------------------------------ teachers
def test_a_teacher_trained_on_other_classes_is_refused(tmp_path) -> None:
    from types import SimpleNamespace

    import torch

    from patchdd.data.sources import ClassMapping
    from patchdd.lightning_modules.student import FKDStudent
    from patchdd.training.zoo import build_model

    run = tmp_path / "teacher_run"  # the layout a teacher fit writes: RUN/class_mapping.json, RUN/checkpoints/
    (run / "checkpoints").mkdir(parents=True)
    torch.save(build_model("convnet_d3", 2, image_size=16, width=8).state_dict(), run / "checkpoints" / "last.pt")
    ClassMapping.for_folders(["cat", "dog"]).save(run / "class_mapping.json")
    student = FKDStudent(teacher="convnet_d3", student="convnet_d3", teacher_checkpoint=str(run / "checkpoints" /
                         "last.pt"), teacher_kwargs={"width": 8}, model_image_size=16, lr=1e-3)
    other = SimpleNamespace(class_mapping=ClassMapping.for_folders(["ant", "bee"]))  # same count, other classes
    with pytest.raises(DataError, match="2 of the data's classes are not among the teacher's 2"):
        student._teacher_outputs(other)
    same = SimpleNamespace(class_mapping=ClassMapping.for_folders(["cat", "dog"]))
    assert student._teacher_outputs(same) is None  # its own classes: used as they are


def test_rded_without_teacher_weights_is_refused() -> None:
    from patchdd.data.sources import ClassMapping
    from patchdd.methods.rded import RDEDOptions, TeacherScorer

    with pytest.raises(ValueError, match="rded.checkpoint"):
        TeacherScorer(RDEDOptions(teacher="convnet_d3"), ClassMapping.for_folders(["cat", "dog"]), 32)


# ------------------------------------------------------------------------------------------ fit resume
REPO = Path(__file__).resolve().parents[1]
EVERY_STEP = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
              '"init_args": {"every_n_train_steps": 1, "save_last": true}}]')
EVERY_EPOCH = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
               '"init_args": {"save_top_k": 1, "save_last": "link", "save_on_train_epoch_end": true}}]')


def fit_then_resume(args: list[str], root: Path, first: list[str], second: list[str]) -> dict:
    """Fit with ``first`` (a run cut short), then ``--ckpt_path last`` with ``second``: the resumed run's
    last checkpoint, after checking that it continued in the same run folder."""
    import torch

    from patchdd import cli

    common = ["fit", *args, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    cli.main([*common, *first])
    cli.main([*common, *second, "--ckpt_path", "last"])
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]  # no new version_1
    return torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)


def validated_epochs(root: Path) -> list[int]:
    import csv

    with (root / "lightning_logs" / "version_0" / "metrics.csv").open() as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh) if row.get("val/top1")]


def test_teacher_fit_resumes_with_ckpt_path_last_and_keeps_best_and_last_apart(toy_root, tmp_path) -> None:
    args = ["-c", str(REPO / "configs/teacher/toy_convnet.yaml"), "--data.root", str(toy_root),
            "--data.num_workers", "0", "--trainer.limit_train_batches", "2"]
    last = fit_then_resume(args, tmp_path, ["--trainer.max_epochs", "2"], ["--trainer.max_epochs", "3"])
    assert last["epoch"] == 2  # last.ckpt is the last epoch, whatever the best one was
    assert validated_epochs(tmp_path) == [0, 1, 2]  # the resumed run's metrics continue the cut run's
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    import torch

    assert best.is_file() and "val/top1" in str(torch.load(best, weights_only=False)["callbacks"])


def test_prior_fit_resumes_with_ckpt_path_last(toy_root, tmp_path) -> None:
    args = ["-c", str(REPO / "configs/prior/toy.yaml"), "--data.root", str(toy_root), "--data.batch_size", "6",
            "--data.num_workers", "0", "--model.vae_steps", "1", "--model.warmup_steps", "1",
            "--trainer.limit_val_batches", "0", "--model.export_dir", str(tmp_path / "export"),
            "--trainer.callbacks", EVERY_STEP]
    last = fit_then_resume(args, tmp_path / "logs", ["--trainer.max_steps", "2"], ["--trainer.max_steps", "4"])
    assert last["global_step"] == 4


def test_student_fit_resumes_with_ckpt_path_last(tmp_path) -> None:
    import torch

    from patchdd.training.zoo import build_model
    from student_helpers import CLASSES, SIZE, write_real_folder, write_synthetic_export
    from test_matrix import base_config

    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc2", ipc=2)
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("convnet_d2", len(CLASSES), image_size=SIZE, width=8).state_dict(), teacher)
    args = ["-c", str(base_config(tmp_path)), "--model.teacher", "convnet_d2", "--model.teacher_checkpoint",
            str(teacher), "--model.teacher_kwargs", '{"width": 8}', "--model.student", "convnet_d1",
            "--model.student_kwargs", '{"width": 8}', "--trainer.callbacks", EVERY_EPOCH, "--trainer.logger", "null"]
    last = fit_then_resume(args[:-2], tmp_path / "run", ["--trainer.max_epochs", "1"], ["--trainer.max_epochs", "2"])
    assert last["epoch"] == 1
    assert validated_epochs(tmp_path / "run") == [0, 1]


def test_ckpt_path_last_with_nothing_to_resume_says_so(toy_root, tmp_path, capsys) -> None:
    from patchdd import cli

    with pytest.raises(SystemExit):
        cli.main(["fit", "-c", str(REPO / "configs/teacher/toy_convnet.yaml"), "--data.root", str(toy_root),
                  "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert f"nothing to resume: no lightning_logs/version_*/checkpoints/last.ckpt under {tmp_path}" in \
        capsys.readouterr().err


# ------------------------------------------------------------------------------------------ clear errors
def test_a_config_error_inside_a_union_is_unwrapped_to_its_cause(tmp_path, capsys) -> None:
    """jsonargparse reports a failing data module as "Does not validate against any of the Union subtypes";
    the command line says what failed instead."""
    from patchdd import cli

    with pytest.raises(SystemExit):
        cli.main(["fit", "-c", str(REPO / "configs/student/rded_defaults.yaml"), "-c",
                  str(REPO / "configs/student/toy.yaml"), "--data.synthetic_dir", str(tmp_path / "nowhere"),
                  "--trainer.default_root_dir", str(tmp_path)])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"data folder does not exist: {tmp_path / 'nowhere'}" in lines[0]
    assert "Union" not in lines[0]


def test_a_misspelled_local_prior_folder_is_not_called_a_hub_id(tmp_path) -> None:
    from patchdd.errors import PriorUnavailableError
    from patchdd.priors.sd import load_prior

    with pytest.raises(PriorUnavailableError, match="'runs/prior/toi': no such folder"):
        load_prior("runs/prior/toi")
    with pytest.raises(PriorUnavailableError, match="the hub id 'nobody/no-prior'"):
        load_prior("nobody/no-prior")

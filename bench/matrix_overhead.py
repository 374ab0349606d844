"""The matrix controller's overhead per cell: the same tiny cells run inline, as subprocesses and as submitit jobs
(``--executor.cluster local``), on the CPU.

    python bench/matrix_overhead.py            # 4 cells of a 1-epoch ConvNet student on 8 generated images

Each cell is the same tiny fit, so the differences per cell are what each launcher adds: a process start, the
imports, submitit's job files and its polling.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from patchdd.training.zoo import build_model
from patchdd.workflows.cluster import ExecutorSpec
from patchdd.workflows.matrix import StudentSpec, TeacherSpec, matrix

CLASSES = ["a", "b"]
SIZE = 32


def write_images(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def base_config(work: Path) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "FKDStudent", "init_args": {"model_image_size": SIZE, "augment": {"image_size": SIZE},
                                                            "min_teacher_top1": 0, "lr": 1e-3}},
        "data": {"class_path": "DistilledDataModule",
                 "init_args": {"synthetic_dir": str(work / "syn"), "folder_grid": 1, "folder_image_size": SIZE,
                               "batch_size": 4,
                               "real": {"class_path": "ImageFolderDataModule",
                                        "init_args": {"root": str(work / "real"), "image_size": SIZE,
                                                      "eval_resize": SIZE, "num_workers": 0}}}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
    }
    path = work / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(work: Path, launcher: str, cells: int) -> float:
    """Seconds for ``cells`` cells with ``launcher``."""
    start = time.perf_counter()
    matrix(str(work / f"out-{launcher}"), [str(base_config(work))],
           teachers=[TeacherSpec("convnet_d1", checkpoint=str(work / "teacher.pt"), kwargs={"width": 8})],
           students=[StudentSpec("convnet_d1", kwargs={"width": 8})], ipcs=[4], methods=["random"],
           seeds=list(range(cells)), synthetic_dir=str(work / "syn"), launcher=launcher,
           executor=ExecutorSpec(cluster="local", timeout_min=30, cpus_per_task=1, mem_gb=4))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_images(work / "real" / "train", 2, 0)
        write_images(work / "real" / "val", 2, 1)
        write_images(work / "syn", 4, 2)
        torch.manual_seed(0)
        torch.save(build_model("convnet_d1", len(CLASSES), image_size=SIZE, width=8).state_dict(),
                   work / "teacher.pt")
        seconds = {launcher: run(work, launcher, args.cells) for launcher in ("inline", "subprocess", "submitit")}
    print(f"\ndevice: CPU ({torch.get_num_threads()} threads); {args.cells} cells of a 1-epoch ConvNet student\n")
    print("| launcher | seconds | seconds per cell | overhead per cell over inline (s) |")
    print("| --- | --- | --- | --- |")
    for launcher, total in seconds.items():
        per_cell = total / args.cells
        print(f"| {launcher} | {total:.1f} | {per_cell:.1f} | {per_cell - seconds['inline'] / args.cells:+.1f} |")


if __name__ == "__main__":
    main()

"""``make rehearsal``: the README's GPU quickstart and the ImageWoof recipe (docs/recipes.md) run as written, with the
REAL architectures, on the CPU, before anyone spends GPU hours on them.

SD v1.5 (UNet 860 M, VAE, CLIP ViT-L/14 text encoder: ``configs/bench/sd15_random.yaml``) and DiT-XL/2 (675 M, the
sd-vae-ft-mse VAE) are built from their configs with random weights and written with ``save_pretrained`` into local
folders that stand for the hub ids; the teacher and students are timm's and torchvision's ResNet-18 at 224 px. The
data is an ImageNet-shaped folder of 2 ImageNette and 2 ImageWoof classes, 2 training and 1 validation JPEG (500 x
375) each. Every step runs as its own process (``python cli.py ...``, the command a user types, with the options
below appended); the table printed at the end gives each step's wall time and peak resident memory.

Rehearsal substitutions (every path and the order of the steps kept; what a step computes per image is the real
size, what it repeats is cut; at 256 px one 224 px patch fits an image, hence the 32 px patches):

| where | substitution |
| --- | --- |
| hub ids, ``/data/imagenet`` | the local random-weight folders; the ImageNet-shaped folder |
| ``imagenette`` / ``imagewoof`` | that preset's first 2 classes |
| every step | CPU, fp32, no loader workers, no progress bar |
| ``sd15_imagenet.yaml`` | 2 draws, 1 DIFT draw, 32 px patches, 20 kept per image (IPC 10 needs 40 per class) |
| ``d3hr_dit256.yaml`` | 10 DDIM steps (t = 600 on the grid: 6 inversion steps) |
| ``distill/paper.yaml`` | IPC 10 only, any patch size, 4 k-means clusters (top 2), RDED: 20 crops per image |
| ``--method rded`` | IPC 1, one patch per image (RDED keeps one crop per image: IPC 10 needs 40 images a class) |
| ``imagenet_subset_resnet18.yaml``, students | 1 epoch |
| ``dit_imagenet.yaml``, ``d3hr_imagenet.yaml`` | IPC 1, 10 DDIM steps; D3HR: 2,000 candidate groups |
| ``dit_minimax.yaml`` (with or without ``adaptive_memory.yaml``) | 2 DiffFit steps of batch 2, no validation |
| ``minimax_imagenet.yaml``, ``d4m_imagenet.yaml`` | IPC 1, 10 sampling steps; the DiT's own VAE for ``--vae`` |

Not rehearsed: the recipe's two matrices (``NOT_REHEARSED``; the students are rehearsed by the quickstart).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from patchdd.data.subsets import PRESETS
from tests.test_doc_commands import block_of, config_files, imagenet_shaped, suite_args

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal]

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURES = REPO / "configs" / "bench" / "sd15_random.yaml"
DIT_XL2 = {"num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28, "sample_size": 32,
           "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 1000}
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                "clip_sample": False}
CLASSES = {name: ",".join(PRESETS[name][:2]) for name in ("imagenette", "imagewoof")}
CPU_TRAINER = "--trainer.accelerator cpu --trainer.precision 32-true "
CPU_STUDENT = CPU_TRAINER + "--trainer.max_epochs 1 --trainer.enable_progress_bar false "
DIT_STEPS = "--prior {dit_xl2} --ipc 1 --sampling.steps 10 --accelerator cpu --batch_size 2 --progress false "
REHEARSAL = {config: options.split() for config, options in {
    "configs/score/sd15_imagenet.yaml": CPU_TRAINER + "--model.prior {sd15} --model.num_draws 2 "
                                                      "--model.dift_ensemble 1 --model.patch_size 32 --model.top_k 20 "
                                                      "--data.batch_size 4 --data.num_workers 0",
    "configs/invert/d3hr_dit256.yaml": CPU_TRAINER + "--model.prior {dit_xl2} --model.steps 10 --data.batch_size 4 "
                                                     "--data.num_workers 0",
    "configs/distill/paper.yaml": "--ipc 10 --synthesis.expect_settings null --synthesis.clustering.num_clusters 4 "
                                  "--synthesis.clustering.top_clusters 2 --synthesis.rded.crops_per_image 20 "
                                  "--synthesis.rded.device cpu --progress false",
    "configs/teacher/imagenet_subset_resnet18.yaml": CPU_STUDENT + "--data.batch_size 4 --data.num_workers 0 "
                                                                   "--model.warmup_steps 1",
    "configs/student/rded_defaults.yaml": CPU_STUDENT + "--data.real.init_args.num_workers 0 "
                                                        "--model.min_teacher_top1 0",
    "--method rded": "--ipc 1 --synthesis.layout.compose_max_ipc 0",
    "configs/student/imagenette.yaml": "--data.classes " + CLASSES["imagenette"],
    "configs/prior/dit_minimax.yaml": CPU_STUDENT + "--trainer.max_steps 2 --trainer.limit_val_batches 0 "
                                                    "--model.pretrained {dit_xl2} --model.vae_from {dit_xl2} "
                                                    "--data.batch_size 2 --data.num_workers 0 --data.classes "
                                                    + CLASSES["imagewoof"],
    "configs/prior/adaptive_memory.yaml": "",   # stacked on dit_minimax.yaml, whose options serve both
    "configs/generate/minimax_imagenet.yaml": "--ipc 1 --sampling.steps 10 --vae {dit_xl2} --accelerator cpu "
                                              "--batch_size 2 --progress false --classes " + CLASSES["imagewoof"],
    "configs/generate/d4m_imagenet.yaml": "--prior {sd15} --ipc 1 --d4m.steps 10 --accelerator cpu --precision 32-true "
                                          "--batch_size 2 --progress false",
    "configs/generate/dit_imagenet.yaml": DIT_STEPS,
    "configs/generate/d3hr_imagenet.yaml": DIT_STEPS + "--precision 32-true --d3hr.candidates 2000 "
                                                       "--d3hr.block_size 1000 --d3hr.device cpu",
}.items()}
NOT_REHEARSED = ["configs/matrix/woof_methods.yaml", "configs/matrix/idc_imagewoof.yaml"]


def real_priors(root: Path) -> dict[str, str]:
    """SD v1.5 and DiT-XL/2 with random weights, in the folder layouts of their hub repositories."""
    from patchdd.priors.dit import build_dit_prior, save_dit_prior
    from patchdd.priors.sd import random_prior, save_prior

    sd15 = yaml.safe_load(ARCHITECTURES.read_text())["sd15"]
    save_prior(root / "sd15", random_prior(**sd15, name="sd15"))
    save_dit_prior(root / "dit_xl2", build_dit_prior(None, DIT_XL2, sd15["vae"], DIT_SCHEDULE, frozen=True,
                                                     name="dit_xl2"))
    return {"sd15": str(root / "sd15"), "dit_xl2": str(root / "dit_xl2")}


def substitutions_of(args: list[str]) -> list[str]:
    """The keys of REHEARSAL that apply to a command: its configs and the options it gives."""
    return [key for key in REHEARSAL if key in config_files(args) or f" {key} " in f" {' '.join(args)} "]


def rehearsed(args: list[str], data_root: Path, priors: dict[str, str]) -> list[str]:
    """A command's arguments for the rehearsal: the data root and class presets replaced, its substitutions
    appended (a later option wins; the hub ids of the configs become the local folders)."""
    swap = {"/data/imagenet": str(data_root), **CLASSES}
    args = [swap.get(arg, arg) for arg in args]
    return args + [value.format(**priors) for key in substitutions_of(args) for value in REHEARSAL[key]]


def run_step(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``python cli.py ARGS`` as its own process; (seconds, peak resident GiB: its VmHWM, read every 0.2 s).
    Fails with the log's tail."""
    start, peak_kib = time.perf_counter(), 0
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], stdout=out, stderr=subprocess.STDOUT,
                                   env=os.environ | {"HF_HUB_OFFLINE": "1"})
        while process.poll() is None:
            peak_kib = max(peak_kib, resident_peak_kib(process.pid))
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    assert process.returncode == 0, f"{' '.join(args)}\n" + "".join(log.read_text()[-3000:])
    return seconds, peak_kib / 2**20


def resident_peak_kib(pid: int) -> int:
    """A running process's peak resident memory so far (VmHWM of /proc/PID/status), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def is_rehearsed(args: list[str]) -> bool:
    return not set(config_files(args)) & set(NOT_REHEARSED)


def recipe_steps() -> list[tuple[str, list[str]]]:
    """(page, arguments) of the quickstart's commands and the rehearsed commands of the ImageWoof recipe."""
    recipe = [suite_args(command) for command in block_of("docs/recipes.md").commands]
    return ([("README", suite_args(command)) for command in block_of("README.md").commands]
            + [("recipes", args) for args in recipe if is_rehearsed(args)])


def test_every_recipe_command_is_rehearsed_or_listed_as_not() -> None:
    """A command added to the recipe gets its substitutions in REHEARSAL or a place in NOT_REHEARSED."""
    recipe = [suite_args(command) for command in block_of("docs/recipes.md").commands]
    for args in filter(is_rehearsed, recipe):
        assert set(config_files(args)) <= set(substitutions_of(args)), shlex.join(args)
    assert {config for args in recipe for config in config_files(args)} >= set(NOT_REHEARSED)


@pytest.fixture
def built_priors(tmp_path):
    """(the local prior folders, seconds to build them); removed afterwards (7 GB, and pytest keeps its last three
    temporary folders)."""
    start = time.perf_counter()
    yield real_priors(tmp_path / "priors"), time.perf_counter() - start
    shutil.rmtree(tmp_path / "priors")


def test_the_quickstart_and_the_imagewoof_recipe_run_with_the_real_architectures(tmp_path, monkeypatch,
                                                                                   built_priors) -> None:
    wnids = tuple(PRESETS["imagenette"][:2]) + tuple(PRESETS["imagewoof"][:2])
    data_root = imagenet_shaped(tmp_path / "imagenet", wnids, train=2, val=1)
    priors, seconds = built_priors
    rows = [("build SD v1.5 and DiT-XL/2 (random weights, save_pretrained)", seconds, None)]
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(work)
    for i, (page, args) in enumerate(recipe_steps()):
        command = rehearsed(args, data_root, priors)
        seconds, peak = run_step(command, work / "logs" / f"{i:02d}-{args[0]}.log")
        method = f" --method {args[args.index('--method') + 1]}" if "--method" in args else ""
        rows.append((f"{page}: {args[0]} {' '.join(config_files(args))}{method}", seconds, peak))
    summary = json.loads(next(Path("runs/student/imagenette").rglob("summary.json")).read_text())
    assert summary["epochs"] == 1
    generated = [(f"woof/{method}/ipc1", 2) for method in ("rded", "dit", "d3hr", "minimax", "memory", "d4m")]
    for folder, images in [("imagenette/ipc10", 20), ("woof/diffusion/ipc10", 20), *generated]:
        assert len(list(Path(f"runs/syn/{folder}").rglob("*.png"))) == images, folder
    print("\n| step | seconds | peak resident memory (GiB) |\n| --- | --- | --- |")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.0f} | {'–' if peak is None else f'{peak:.1f}'} |")

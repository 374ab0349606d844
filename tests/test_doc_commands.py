"""Every command the README and the docs show is tested.

* Every ``patchdd`` / ``python cli.py`` command of every ``bash`` block is parsed by its own parser
  (``--print_config``: options, configs and values checked, nothing run); ``make`` targets and bench scripts exist;
  and within a block, a command reads under ``runs/`` only what an earlier command wrote (:class:`PathFlow`).
* The README's GPU quickstart runs end to end, in its order and with its paths, on the CPU through the substitution
  table below: a step that cannot find what an earlier step wrote fails here, as it would for a user.
* Every ``python`` block runs as written in a folder laid out as after ``make demo`` (small toy data, a one-epoch
  toy teacher, 30 training images per class), with ``patchdd.score`` / ``patchdd.evaluate`` given CPU-sized options
  (2 draws, 8 patches kept per image: IPC 10 needs 40 per class; 1 epoch).

A block that cannot run here is marked in the Markdown, right before it, with ``<!-- doc-test: skip (reason) -->``;
the marks are counted against a budget.

The substitution table (GPU-sized -> CPU-sized, every path kept):

| where | substitution |
| --- | --- |
| ``/data/imagenet`` | a generated ImageNet-shaped folder: the 10 ImageNette wnids, 3 training and 1 validation JPEG of 500 x 375 each |
| ``configs/score/sd15_imagenet.yaml`` | the tiny SD prior of ``tests/tiny_sd.py``; scored at 64 px, 16 px patches, 15 kept per image (IPC 10 needs 40 per class from 3 images), 1 draw, CPU, fp32 |
| ``configs/distill/paper.yaml`` | 64 px synthetic images, 4 clusters, no check of the paper's scoring settings |
| ``configs/teacher/imagenet_subset_resnet18.yaml`` | 1 epoch at 64 px, batch 8, CPU, fp32 |
| ``configs/student/rded_defaults.yaml`` | 1 epoch at 64 px, CPU, fp32, no loader workers, the teacher gate off (a teacher of random pixels is at chance) |
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from patchdd import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SKIP_MARK = re.compile(r"<!-- doc-test: skip \((.+?)\) -->\s*$")
SKIP_BUDGET = 4
NOT_SUITE_COMMANDS = ("pip", ".venv/bin/pip", "python3", "export", "cd", "srun", "sbatch")


@dataclass
class Block:
    page: str
    line: int
    commands: list[list[str]]
    skip: str | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def shell_blocks() -> list[Block]:
    """Every ```` ```bash ```` block of README.md and docs/, as commands (continuations joined, comments dropped)."""
    blocks = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "```bash":
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            text = "\n".join(lines[i + 1:end]).replace("\\\n", " ")
            commands = [shlex.split(row, comments=True) for row in text.splitlines()]
            mark = SKIP_MARK.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(str(page.relative_to(REPO)), i + 1, [c for c in commands if c],
                                mark.group(1) if mark else None))
    return blocks


def suite_args(command: list[str]) -> list[str] | None:
    """The arguments of a ``patchdd`` command (``patchdd ...``, ``python cli.py ...``, either under ``srun``), else
    None."""
    if command[0] == "srun":
        command = command[1:]
    if command[0] == "patchdd":
        return command[1:]
    if command[:2] == ["python", "cli.py"]:
        return command[2:]
    return None


BLOCKS = shell_blocks()


def test_the_skip_marks_stay_within_their_budget() -> None:
    skipped = [f"{block}: {block.skip}" for block in BLOCKS if block.skip]
    assert len(skipped) <= SKIP_BUDGET, skipped
    assert len(BLOCKS) > 15  # the collector finds the docs' blocks


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skip], ids=str)
def test_every_command_of_a_block_parses(block: Block, capsys) -> None:
    makefile = (REPO / "Makefile").read_text()
    flow = PathFlow(block)
    for command in block.commands:
        args = suite_args(command)
        if command[0] == "make":
            assert re.search(rf"^{re.escape(command[1])}:", makefile, re.M), f"{block}: no make target {command[1]}"
        elif command[0] == "python" and command[1].startswith("bench/"):
            assert (REPO / command[1]).is_file(), f"{block}: no script {command[1]}"
        elif args is None or command[0] == "sbatch":
            assert command[0] in NOT_SUITE_COMMANDS, f"{block}: {shlex.join(command)} is not a command of the suite"
        elif "--help" not in args and not any(a.endswith(".help") for a in args):
            with pytest.raises(SystemExit) as done:
                cli.main([*args, "--print_config"])
            printed = capsys.readouterr()
            assert done.value.code in (0, None), f"{block}: {shlex.join(command)}\n{printed.err}"
            flow.step(args[0], yaml.safe_load(printed.out) or {}, shlex.join(command))
    flow.check()


class PathFlow:
    """What the commands of one block read and write under ``runs/``. In a block that writes some kind of output
    (``runs/teacher/...``, ``runs/syn/...``), a command may read that kind only where an earlier command of the block
    wrote it, so a recipe whose step cannot find its predecessor's output fails here, without running anything
    (a block of single examples, reading what other pages make, writes none of the kinds it reads)."""

    def __init__(self, block: Block) -> None:
        self.block, self.written, self.pending = block, [], []

    def step(self, command: str, config: dict, line: str) -> None:
        self.pending += [(path, line, list(self.written)) for path in self.reads(command, config)]
        self.written += self.writes(command, config)

    def check(self) -> None:
        """Every read of a kind the block writes was written before it."""
        kinds = {kind(path) for path in self.written}
        for path, line, before in self.pending:
            found = any(path == w or path.startswith(w.rstrip("/") + "/") for w in before)
            assert found or kind(path) not in kinds, \
                f"{self.block}: {line}\n  reads {path}, which no earlier command of the block writes"

    @staticmethod
    def reads(command: str, config: dict) -> list[str]:
        model, data = dig(config, "model", "init_args"), dig(config, "data", "init_args")
        paths = {"fit": [model.get("teacher_checkpoint"), data.get("store"), data.get("synthetic_dir")],
                 "distill": [config.get("store")], "generate": [config.get("stats"), config.get("prior")]}
        return [str(p) for p in paths.get(command, []) if isinstance(p, str) and p.startswith("runs/")]

    @staticmethod
    def writes(command: str, config: dict) -> list[str]:
        if command in ("fit", "predict"):
            return [str(p) for p in (dig(config, "trainer").get("default_root_dir"), dig(config, "store").get("dir"),
                                     dig(config, "stats").get("dir"), dig(config, "model", "init_args").get(
                                         "export_dir")) if p]
        return [str(config["out"])] if config.get("out") else []


def kind(path: str) -> str:
    """The kind of a run output: its first two path components (``runs/teacher``)."""
    return "/".join(path.split("/")[:2])


def dig(config: dict, *keys: str) -> dict:
    """``config[k1][k2]...`` or ``{}``."""
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


# --- the README's GPU quickstart, end to end on the CPU ----------------------------------------------------------
SUBSTITUTIONS = {
    "configs/score/sd15_imagenet.yaml": ["--model.prior", "{tiny_sd}", "--data.image_size", "64",
                                         "--data.bucket_multiple", "32", "--model.patch_size", "16", "--model.top_k",
                                         "15", "--model.num_draws", "1", "--model.dift_ensemble", "1",
                                         "--data.batch_size", "4", "--data.num_workers", "0",
                                         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"],
    "configs/distill/paper.yaml": ["--synthesis.layout.output_size", "64", "--synthesis.expect_settings", "null",
                                   "--synthesis.clustering.num_clusters", "4", "--synthesis.clustering.top_clusters", "2", "--progress", "false"],
    "configs/teacher/imagenet_subset_resnet18.yaml": ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                                                      "--trainer.precision", "32-true", "--data.image_size", "64",
                                                      "--data.batch_size", "8", "--data.num_workers", "0",
                                                      "--model.warmup_steps", "1", "--trainer.enable_progress_bar",
                                                      "false"],
    "configs/student/rded_defaults.yaml": ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                                           "--trainer.precision", "32-true", "--model.augment.image_size", "64",
                                           "--data.real.init_args.image_size", "64",
                                           "--data.real.init_args.eval_resize", "72",
                                           "--data.real.init_args.num_workers", "0", "--model.min_teacher_top1", "0",
                                           "--trainer.enable_progress_bar", "false"],
}


def imagenet_shaped(root: Path, wnids: tuple[str, ...], train: int = 3, val: int = 1) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG``, 500 x 375 (ImageNet's most common size), random pixels."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
    return root


def config_files(args: list[str]) -> list[str]:
    """The ``-c`` / ``--config`` files of a command's arguments, in order."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-c", "--config")]


def block_of(page: str) -> Block:
    """The first shell block of ``page`` (README.md: the GPU quickstart; docs/recipes.md: the ImageWoof recipe)."""
    return next(b for b in BLOCKS if b.page == page)


def substituted(args: list[str], data_root: Path, tiny_sd: Path) -> list[str]:
    """A command's arguments on the CPU: the data root replaced, each config's extra options appended."""
    args = [str(data_root) if arg == "/data/imagenet" else arg for arg in args]
    return args + [value.format(tiny_sd=tiny_sd) for config in config_files(args)
                   for value in SUBSTITUTIONS.get(config, [])]


def test_the_readme_gpu_quickstart_runs_in_its_order(prior_dir, tmp_path, monkeypatch) -> None:
    from patchdd.data.subsets import PRESETS

    quickstart = block_of("README.md")
    data_root = imagenet_shaped(tmp_path / "imagenet", PRESETS["imagenette"])
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # every relative path of the recipe lands here
    for command in quickstart.commands:
        cli.main(substituted(suite_args(command), data_root, prior_dir))
    summaries = list(Path("runs/student/imagenette").rglob("summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["epochs"] == 1


# --- the Python examples, run as written -----------------------------------------------------------------------
FAST_SCORE = {"model.num_draws": 2, "model.dift_ensemble": 1, "model.top_k": 8, "data.num_workers": 0,
              "trainer.enable_progress_bar": False}
FAST_EVALUATE = {"trainer.max_epochs": 1, "data.real.init_args.num_workers": 0, "model.min_teacher_top1": 0,
                 "trainer.enable_progress_bar": False}


def python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every ```` ```python ```` block of README.md and docs/."""
    found = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
    return [(page.relative_to(REPO).as_posix(), code) for page in PAGES for code in found.findall(page.read_text())]


def with_options(function, extra: dict):
    def call(*args, options=None, **kwargs):
        return function(*args, options=extra | (options or {}), **kwargs)

    return call


def test_the_python_examples_run_as_written(tmp_path, monkeypatch) -> None:
    import patchdd
    from patchdd.data.toy import write_toy_dataset

    blocks = python_blocks()
    assert [page for page, _ in blocks] == ["docs/getting-started.md"]  # a new example gets its setting here
    monkeypatch.chdir(tmp_path)
    for shared in ("configs", "assets"):
        (tmp_path / shared).symlink_to(REPO / shared)
    write_toy_dataset("data/toy", train_per_class=30, val_per_class=2)  # 128 px, as the demo's
    cli.main(["fit", "-c", "configs/teacher/toy_convnet.yaml", "--data.root", "data/toy", "--trainer.max_epochs", "1",
              "--data.num_workers", "0", "--trainer.default_root_dir", "runs/demo/teacher",
              "--trainer.enable_progress_bar", "false"])  # the demo's teacher, one epoch
    monkeypatch.setattr(patchdd, "score", with_options(patchdd.score, FAST_SCORE))
    monkeypatch.setattr(patchdd, "evaluate", with_options(patchdd.evaluate, FAST_EVALUATE))
    for _, code in blocks:
        exec(compile(code, "example", "exec"), {})
    assert len(list(Path("runs/student/notebook").rglob("summary.json"))) == 1
    assert len(list(Path("runs/syn/toy/ipc10").rglob("*.png"))) == 10 * 10

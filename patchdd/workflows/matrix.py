"""Benchmark matrices: teachers x students (x IPCs x selectors x seeds), each cell a normal ``fit`` of FKDStudent.

Every cell runs ``patchdd fit -c BASE ...overrides`` (in its own process, or inline) with its output in its own
log file with its own log directory
(``OUT/ipc{N}/{selector}/{teacher}__{student}/seed{S}``); a cell is finished when its ``summary.json`` exists and
is skipped on rerun; an interrupted cell resumes from its ``checkpoints/last.ckpt``; a failed cell is recorded
with its error and the others go on. Cells are spread over GPUs one at a time per slot of ``devices_per_cell``
GPUs. Results: ``results.csv`` (one row per run), ``matrix.md`` (mean +- std over seeds, best teacher per student
column in bold, like the paper's Table 4) and ``matrix.png`` (annotated heatmaps).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from tqdm.auto import tqdm

from patchdd.errors import PatchDDError, one_line
from patchdd.formats.outputs import exclusive_output
from patchdd.formats.stores import MANIFEST_FILE, atomic_write_text
from patchdd.formats.synthetic_folder import INFO_FILE, synthetic_classes
from patchdd.lightning_modules.student import SUMMARY_FILE
from patchdd.training.kd import idc_epochs
from patchdd.training.zoo import find_run_checkpoint
from patchdd.workflows.cluster import ExecutorSpec, job_alive, make_executor, record_job, recorded_job, wait_for
from patchdd.workflows.console import output_to
from patchdd.workflows.invoke import deprecated, packaged_path, run_trainer_command
from patchdd.workflows.panel import RANDOM_REAL, FullDataSpec, ScoreUnits, full_data_accuracy, write_panel
from patchdd.workflows.runs import fit_arguments, format_cell, seed_statistics, slug

RESULT_COLUMNS = ["teacher", "student", "ipc", "selector", "protocol", "seed", "final_top1", "final_top5",
                  "best_top1", "best_epoch", "status", "error", "seconds", "peak_memory_mb", "set_method",
                  "set_identity", "log_dir"]
# How a cell trains its student: the teacher's soft labels or the set's hard labels, with RDED's augmentation or
# none (Resize + Normalize). soft_aug is the protocol; the others are the fairness panel's variants; idc is IDC's
# hard-label protocol (cross-entropy with CutMix, SGD, multi-step schedule, epochs by IPC), which Minimax and seed
# 001 report with: its settings are the file ``idc_config``, stacked on the base config.
Protocol = Literal["soft_aug", "soft_noaug", "hard_aug", "hard_noaug", "idc"]
MAIN_PROTOCOL = "soft_aug"
HARD_LABEL_PROTOCOLS = ("hard_aug", "hard_noaug", "idc")  # no teacher: one row per student
Metric = Literal["final_top1", "best_top1"]
Launcher = Literal["subprocess", "inline", "submitit"]
IDENTITY_FILE = "cell.json"  # the hash of the config and the inputs a cell ran with
RESUMABLE_LOGGER = "patchdd.datamodules.callbacks.ResumableCSVLogger"  # a resumed cell appends to metrics.csv


@dataclass
class NetworkSpec:
    """A zoo network of the matrix: name, constructor keyword arguments, a display label."""

    name: str
    label: str | None = None
    kwargs: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass
class TeacherSpec(NetworkSpec):
    """A teacher row: its weights come from the hub, a local checkpoint, or nowhere (a random control row)."""

    checkpoint: str | None = None
    pretrained: bool = False
    random_init: bool = False


@dataclass
class StudentSpec(NetworkSpec):
    """A student column: optional learning rate (else the config's per-architecture table)."""

    lr: float | None = None


NO_TEACHER = TeacherSpec(name="none", label="none (hard labels)")  # the row of the hard-label protocols


@dataclass
class Cell:
    teacher: TeacherSpec
    student: StudentSpec
    ipc: int
    selector: str
    seed: int
    directory: Path
    protocol: str = MAIN_PROTOCOL

    def describe(self) -> str:
        protocol = "" if self.protocol == MAIN_PROTOCOL else f", {self.protocol}"
        return (f"{self.teacher.title} x {self.student.title} seed {self.seed} "
                f"(IPC {self.ipc}, {self.selector}{protocol})")


def cell_overrides(cell: Cell, batch_size: int | str | None, synthetic_dir: str | None, devices: int | None,
                   overrides: dict) -> dict:
    """Dotted LightningCLI keys -> values that turn the base config into this cell's run."""
    values = {
        "seed_everything": cell.seed,
        "model.init_args.teacher": cell.teacher.name,
        "model.init_args.teacher_checkpoint": cell.teacher.checkpoint,
        "model.init_args.teacher_pretrained": cell.teacher.pretrained,
        "model.init_args.random_teacher": cell.teacher.random_init,
        "model.init_args.teacher_kwargs": cell.teacher.kwargs,
        "model.init_args.student": cell.student.name,
        "model.init_args.student_kwargs": cell.student.kwargs,
        "trainer.default_root_dir": str(cell.directory),
        "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(cell.directory), "name": "", "version": ""}},
    }
    if cell.student.lr is not None:
        values["model.init_args.lr"] = cell.student.lr
    if cell.protocol in HARD_LABEL_PROTOCOLS:
        values["model.init_args.label_mode"] = "hard"
    if cell.protocol.startswith("hard"):  # DD-Ranking's hard-label runs: one label per image, no mixing
        values["model.init_args.mixing"] = "none"
    if cell.protocol.endswith("noaug"):
        values["model.init_args.augment.enabled"] = False
    if devices is not None:
        values["trainer.devices"] = devices
    if synthetic_dir is not None:
        values["data.init_args.store"] = None
        values["data.init_args.synthetic_dir"] = set_folder(synthetic_dir, cell.ipc, cell.selector)
    else:
        values["data.init_args.ipc"] = cell.ipc
        values["data.init_args.synthesis.selector"] = cell.selector
    if batch_size is not None:
        values["data.init_args.batch_size"] = batch_size
    return {**values, **overrides}


def set_folder(template: str, ipc: int, method: str) -> str:
    """The set folder of an IPC and method from a ``synthetic_dir`` template (``{method}``, or ``{selector}``)."""
    return template.format(ipc=ipc, method=method, selector=method)


def read_summary(directory: Path) -> dict | None:
    path = directory / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def error_line(log_file: Path) -> str:
    """The error of a failed run's log: the command line's one-line error, else the last line that names an
    exception, else the last line."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    reported = [line.partition(" error: ")[2] for line in lines if line.startswith("patchdd ") and " error: " in line]
    errors = reported or [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][:500]


def cell_arguments(bases: list[str], values: dict, directory: Path) -> list[str]:
    """The cell's ``patchdd fit`` arguments now: from its ``last.ckpt`` when a cut run left one (its
    ``metrics.csv`` continued, not replaced), else from the start."""
    last = directory / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return fit_arguments(bases, values)
    logger = values["trainer.logger"] | {"class_path": RESUMABLE_LOGGER}
    return fit_arguments(bases, values | {"trainer.logger": logger}, last)


@dataclass
class CellJob:
    """One cell as a submitit job: ``patchdd fit`` in the job's process, output in the cell's ``log.txt``,
    resuming from the cell's ``last.ckpt`` when there is one; on pre-emption or at its time limit submitit
    requeues it (:meth:`checkpoint`) and it resumes. Returns the error line, or None."""

    bases: list[str]
    values: dict
    directory: str

    def __call__(self) -> str | None:
        directory = Path(self.directory)
        return run_inline(cell_arguments(self.bases, self.values, directory), directory / "log.txt")

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit_cells(indices: list[int], cells: list[Cell], bases: list[list[str]], settings: list[dict],
                 identities: list[str], spec: ExecutorSpec, out_dir: Path, record) -> None:
    """Run the pending cells as submitit jobs (one job array): a cell whose recorded job still runs is waited
    for, not resubmitted; ``record(index, outcome)`` as each ends."""
    executor = make_executor(spec, out_dir)
    records = {i: recorded_job(cells[i].directory) for i in indices}
    adopted = {i: record for i, record in records.items() if job_alive(record)}
    fresh = [i for i in indices if i not in adopted]
    for i in fresh:
        write_identity(cells[i].directory, identities[i])
    with executor.batch():
        handles = [executor.submit(CellJob(bases[i], settings[i], str(cells[i].directory))) for i in fresh]
    for i, job in zip(fresh, handles):
        record_job(cells[i].directory, str(job.job_id), spec.cluster, str(executor.folder))
    if adopted:
        print(f"{len(adopted)} cell(s) still run in jobs of an earlier controller: waited for, not resubmitted",
              flush=True)
    print(f"submitted {len(fresh)} cell(s) to {spec.cluster} ({executor.folder})", flush=True)
    started = time.time()
    for index, error in wait_for(dict(zip(fresh, handles)), adopted):
        directory = cells[index].directory
        summary = read_summary(directory)
        seconds = round(time.time() - started, 1)
        if error is None and summary is not None:
            record(index, {"status": "done", "error": "", "seconds": seconds, **summary})
        else:
            log = directory / "log.txt"
            record(index, {"status": "failed", "seconds": seconds,
                           "error": error or (error_line(log) if log.is_file() else f"no {SUMMARY_FILE} written")})


def cell_state(cell: Cell, identity: str) -> str:
    """``done``, ``stale`` (ran with another config or inputs), ``running`` (its job still runs), ``failed`` (ran,
    no result) or ``pending`` (never ran)."""
    if not cell.directory.exists():
        return "pending"
    if read_identity(cell.directory) != identity:
        return "stale"
    if read_summary(cell.directory) is not None:
        return "done"
    if job_alive(recorded_job(cell.directory)):
        return "running"
    return "failed" if (cell.directory / "log.txt").is_file() or recorded_job(cell.directory) else "pending"


def run_cell(cell: Cell, args: list[str], gpus: list[int] | None, launcher: Launcher) -> dict:
    """Run one cell's fit; its output goes to ``cell.directory/log.txt``."""
    cell.directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "patchdd", *args]
    (cell.directory / "command.txt").write_text(shlex.join(command) + "\n")
    start = time.time()
    log_file = cell.directory / "log.txt"
    error = run_subprocess(command, log_file, gpus) if launcher == "subprocess" else run_inline(args, log_file)
    summary = read_summary(cell.directory)
    seconds = round(time.time() - start, 1)
    if error is None and summary is not None:
        return {"status": "done", "error": "", "seconds": seconds, **summary}
    return {"status": "failed", "error": error or f"no {SUMMARY_FILE} written (was validation disabled?)",
            "seconds": seconds}


def run_subprocess(command: list[str], log_file: Path, gpus: list[int] | None) -> str | None:
    """Run ``command`` with its output in ``log_file``; the error line when it fails, else None."""
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    with log_file.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait()
        finally:  # the matrix was interrupted: do not leave the cell running on its own
            if process.poll() is None:
                process.terminate()
                process.wait()
    return error_line(log_file) if code != 0 else None


def run_inline(args: list[str], log_file: Path) -> str | None:
    """Run ``patchdd`` with ``args`` in this process, its output in ``log_file``; the error when it fails."""
    try:
        with output_to(log_file):
            run_trainer_command(args)
    except SystemExit as exit_:  # jsonargparse exits on a bad option
        return None if exit_.code in (0, None) else f"SystemExit: {exit_.code} (bad option? see {log_file})"
    except Exception as err:  # a failed cell is recorded, the matrix goes on
        return one_line(err)[:500]
    return None


def result_row(cell: Cell, outcome: dict, set_info: dict) -> dict:
    """A ``results.csv`` row: the cell, its outcome, and the method and identity of the set it learned from."""
    row = {"teacher": cell.teacher.title, "student": cell.student.title, "ipc": cell.ipc, "selector": cell.selector,
           "protocol": cell.protocol, "seed": cell.seed, "log_dir": str(cell.directory), **set_info}
    row.update({key: outcome.get(key) for key in RESULT_COLUMNS if key not in row})
    return row


def write_results(path: Path, rows: list[dict]) -> None:
    """``results.csv``, written beside and renamed into place."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in RESULT_COLUMNS} for row in rows)
    atomic_write_text(path, text.getvalue())


def aggregate(rows: list[dict], metric: Metric) -> dict[tuple, tuple[float, float, int, int]]:
    """(ipc, selector, teacher, student) -> (mean, std, finished runs, failed runs) of ``metric`` in percent."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["ipc"], row["selector"], row["teacher"], row["student"]), []).append(row)
    out = {}
    for key, members in groups.items():
        values = [float(r[metric]) for r in members if r["status"] == "done" and r[metric] is not None]
        mean, std = seed_statistics(values) if values else (float("nan"), 0.0)
        out[key] = (mean, std, len(values), sum(r["status"] == "failed" for r in members))
    return out


def markdown_tables(rows: list[dict], teachers: list[str], students: list[str], metric: Metric) -> str:
    """One Markdown table per (IPC, selector): teachers as rows, students as columns, best per column in bold."""
    stats = aggregate(rows, metric)
    blocks = []
    for ipc, selector in sorted({(r["ipc"], r["selector"]) for r in rows}):
        means = np.array([[stats.get((ipc, selector, t, s), (np.nan,))[0] for s in students] for t in teachers])
        column_best = [np.nanmax(col) if not np.all(np.isnan(col)) else np.nan for col in means.T]
        lines = [f"### IPC {ipc}, selector {selector}: {metric.replace('_', ' ')} (%)", "",
                 "| teacher \\ student | " + " | ".join(students) + " |", "|---" * (len(students) + 1) + "|"]
        for i, teacher in enumerate(teachers):
            cells = []
            for j, student in enumerate(students):
                text = format_cell(*stats.get((ipc, selector, teacher, student), (np.nan, 0.0, 0, 0)))
                cells.append(f"**{text}**" if means[i, j] == column_best[j] else text)
            lines.append(f"| {teacher} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_markdown(path: Path, rows: list[dict], teachers: list[str], students: list[str], title: str) -> None:
    seeds = sorted({r["seed"] for r in rows})
    header = (f"# {title}\n\nTop-1 accuracy on the real validation split, mean ± std over seeds {seeds} (sample std; "
              f"one seed: no ±). Bold: the best teacher for each student (column). `final` is the accuracy at the "
              f"end of training, `best` the best of the validation runs (RDED reports the best; it is optimistic).")
    body = "\n\n".join(markdown_tables(rows, teachers, students, m) for m in ("final_top1", "best_top1"))
    path.write_text(header + "\n\n" + body + "\n")


def write_heatmap(path: Path, rows: list[dict], teachers: list[str], students: list[str], metric: Metric,
                  title: str) -> None:
    """Annotated heatmaps (teachers x students) of ``metric``, one panel per (IPC, selector); best per column bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(rows, metric)
    panels = sorted({(r["ipc"], r["selector"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=((1.8 * len(students) + 4) * len(panels), 0.7 * len(teachers) + 2.5))
    for ax, (ipc, selector) in zip(axes[0], panels):
        cell = {(t, s): stats.get((ipc, selector, t, s), (np.nan, 0.0, 0, 0)) for t in teachers for s in students}
        means = np.array([[cell[t, s][0] for s in students] for t in teachers])
        image = ax.imshow(np.ma.masked_invalid(means), cmap="viridis", aspect="auto")
        middle = np.nanmean(means) if not np.all(np.isnan(means)) else 0.0
        for i, t in enumerate(teachers):
            for j, s in enumerate(students):
                text = format_cell(*cell[t, s]).replace(" (", "\n(")
                best = not np.isnan(means[i, j]) and means[i, j] == np.nanmax(means[:, j])
                shade = "white" if means[i, j] < middle else "black"  # NaN compares False: black on white
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=shade,
                        fontweight="bold" if best else "normal")
        ax.set_xticks(range(len(students)), students, rotation=30, ha="right")
        ax.set_yticks(range(len(teachers)), teachers)
        ax.set_xlabel("student")
        ax.set_ylabel("teacher")
        ax.set_title(f"IPC {ipc}, {selector}")
        fig.colorbar(image, ax=ax, label=f"{metric.replace('_', ' ')} (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_slots(gpus: list[int] | None, devices_per_cell: int) -> list[list[int] | None]:
    """Groups of ``devices_per_cell`` GPUs that each run one cell at a time (one slot without a GPU list)."""
    if gpus is None:
        return [None]
    if len(gpus) < devices_per_cell:
        raise ValueError(f"devices_per_cell={devices_per_cell} needs at least that many GPUs, got {gpus}")
    return [gpus[i:i + devices_per_cell] for i in range(0, len(gpus) - devices_per_cell + 1, devices_per_cell)]


def plan_cells(out_dir: Path, teachers: list[TeacherSpec], students: list[StudentSpec], ipcs: list[int],
               selectors: list[str], seeds: list[int], protocols: list[str] = (MAIN_PROTOCOL,)) -> list[Cell]:
    """Every (protocol, IPC, selector, teacher, student, seed) with its log directory, in that nesting order.
    Hard-label protocols (``HARD_LABEL_PROTOCOLS``) use no teacher: one row per student (teacher ``none``)."""
    for kind, titles in (("teacher", [t.title for t in teachers]), ("student", [s.title for s in students])):
        if len(set(titles)) != len(titles):
            raise ValueError(f"two {kind}s share a label in {titles}: give them distinct 'label's")
    cells = []
    for protocol in protocols:
        rows = [NO_TEACHER] if protocol in HARD_LABEL_PROTOCOLS else teachers
        prefix = "" if protocol == MAIN_PROTOCOL else f"{protocol}-"
        cells += [Cell(t, s, ipc, sel, seed, out_dir / f"ipc{ipc}" / slug(sel) / f"{slug(t.title)}__{slug(s.title)}"
                       / f"{prefix}seed{seed}", protocol)
                  for ipc, sel, t, s, seed in product(ipcs, selectors, rows, students, seeds)]
    return cells




def describe_outcome(outcome: dict) -> str:
    if outcome["status"] != "done":
        return f"FAILED: {outcome['error']} ({outcome['seconds']} s)"
    final, best = outcome.get("final_top1"), outcome.get("best_top1")
    shown = "no validation ran" if final is None else f"top-1 final {final:.4f}, best {best:.4f}"
    return f"{shown} ({outcome['seconds']} s)"


@contextmanager
def sigterm_exits():
    """Within: SIGTERM raises SystemExit, so that running cells are stopped too (as on Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_workers(worker, slots: list[list[int] | None]) -> None:
    """``worker(slot)`` per slot, in threads; a single slot runs in the main thread (Lightning's signal handlers
    are installed there)."""
    if len(slots) == 1:
        worker(slots[0])
        return
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def matrix(
    out: str,
    base: str | list[str],
    teachers: list[TeacherSpec] = [],
    students: list[StudentSpec] = [],
    ipcs: list[int] = [10],
    methods: list[str] = ["diffusion"],
    seeds: list[int] = [0],
    batch_size: int | Literal["rded", "base"] = "rded",
    synthetic_dir: str | None = None,
    overrides: dict = {},
    gpus: list[int] | None = None,
    devices_per_cell: int = 1,
    launcher: Launcher = "subprocess",
    executor: ExecutorSpec = ExecutorSpec(),
    dry_run: bool = False,
    panel_units: ScoreUnits = "fractions",
    heatmap_metric: Metric = "final_top1",
    title: str = "Teacher x student matrix",
    protocols: list[Protocol] = [MAIN_PROTOCOL],
    full_data: FullDataSpec | None = None,
    idc_config: str = "configs/student/idc.yaml",
    selectors: list[str] | None = None,
) -> Path:
    """Run a teacher x student (x IPC x selector x seed) matrix of FKD student fits; write CSV, Markdown and heatmap.

    Args:
        out: output directory (one log directory per cell, ``results.csv``, ``matrix.md``, ``matrix.png``).
        base: the ``fit`` config(s) every cell starts from, stacked in order (e.g.
            ``[configs/student/rded_defaults.yaml, configs/student/imagewoof.yaml]``).
        teachers: rows: ``{name, checkpoint, pretrained, random_init, label, kwargs}`` (none needed when every
            protocol uses hard labels).
        students: columns: ``{name, lr, label, kwargs}`` (lr None: the base config's ``lr_by_architecture``).
        ipcs: images per class; set as ``data.ipc`` (or filled into ``synthetic_dir``).
        methods: the methods whose sets the students learn from (``patchdd methods`` lists them): a selection
            method is set as ``data.selector`` (the set is built from the store), any method is filled into
            ``synthetic_dir``.
        seeds: random initialisations per cell; the tables show mean ± std over them.
        batch_size: an int, ``rded`` (RDED's rule, applied by the data module from the cell's IPC and class
            count: the rule a single ``fit`` uses too) or ``base`` (the base config's).
        synthetic_dir: exported sets instead of a store, a template with ``{ipc}`` / ``{method}``
            (e.g. ``runs/distill/woof/{method}/ipc{ipc}``; ``{selector}`` is the old spelling of ``{method}``).
        overrides: dotted keys applied to every cell, e.g. ``{"trainer.max_epochs": 300}``.
        gpus: GPU ids; each group of ``devices_per_cell`` runs one cell at a time (None: cells one by one,
            devices as the base config says).
        devices_per_cell: devices of one cell (>1: DDP inside the cell).
        launcher: ``subprocess`` (each cell its own process, output in ``log.txt``; needed for ``gpus``),
            ``inline`` (cells one after the other in this process: no start-up cost per cell, for small runs) or
            ``submitit`` (each pending cell a cluster job, see ``executor``; rerun, the controller waits for the
            cells whose jobs still run, collects the finished ones and resubmits the failed ones).
        executor: the submitit executor of ``launcher: submitit`` (``cluster: slurm | local | debug``, partition,
            GPUs, CPUs, memory, time limit, array parallelism, more ``#SBATCH`` settings).
        dry_run: list every cell with its state (done, stale, running, failed, pending) and run nothing.
        panel_units: how the panel computes LRS and ARS: ``fractions`` (of the mean accuracies, in [0, 1], as
            DD-Ranking's paper defines them) or ``ddranking_code`` (per run from percentages, averaged, as DD-Ranking's
            code prints them: comparable with its leaderboard).
        heatmap_metric: what the heatmap shows, ``final_top1`` or ``best_top1`` (``matrix.md`` shows both).
        title: title of the Markdown file and the heatmap.
        protocols: how the students learn: ``soft_aug`` (the protocol: the teacher's soft labels, RDED's
            augmentation), the fairness panel's ``soft_noaug``, ``hard_aug``, ``hard_noaug`` (hard labels: no
            teacher, no mixing; noaug: Resize + Normalize only) and ``idc`` (IDC's hard-label protocol, as Minimax
            and Li et al. report; ``idc_config``). ``matrix.md`` / ``matrix.png`` show the first protocol. With more
            than one, or with ``random_real`` among the selectors, ``panel.csv`` / ``panel.md`` / ``panel.png`` are
            written too.
        full_data: the full-data student of each student architecture for the panel's HLR and LRS (a
            ``Classifier`` fit config on the real data; trained once and cached).
        idc_config: the settings of the ``idc`` protocol's cells, stacked on ``base``; their epochs follow IDC's
            rule by IPC and class count (:func:`patchdd.training.kd.idc_epochs`) unless ``overrides`` set
            ``trainer.max_epochs``.
        selectors: the old spelling of ``methods`` (accepted for one release, with a note).
    """
    if selectors is not None:
        deprecated("selectors", "methods")
        methods = selectors
    if launcher == "inline" and gpus is not None:
        raise ValueError("launcher='inline' runs cells one by one in this process; use 'subprocess' with gpus")
    if not students or (not teachers and any(p not in HARD_LABEL_PROTOCOLS for p in protocols)):
        raise ValueError("a matrix needs at least one student, and a teacher unless every protocol uses hard labels")
    bases = [packaged_path(path) for path in ([base] if isinstance(base, str) else base)]
    missing = [path for path in bases if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"base config(s) not found: {missing} (relative paths start at {Path.cwd()})")
    check_prerequisites(teachers, ipcs, methods, synthetic_dir)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_output(out_dir):  # one controller per OUT: a second fails at once naming the first
        cells = plan_cells(out_dir, teachers, students, ipcs, methods, seeds, protocols)
        devices = devices_per_cell if gpus is not None or devices_per_cell != 1 else None
        cell_bases = [bases + [packaged_path(idc_config)] if cell.protocol == "idc" else bases for cell in cells]
        settings = [cell_overrides(cell, None if batch_size == "base" or cell.protocol == "idc" else batch_size,
                                   synthetic_dir, devices, idc_length(cell, synthetic_dir, overrides) | overrides)
                    for cell in cells]
        inputs = InputIdentities()
        configs = [merged_config(paths, values) for paths, values in zip(cell_bases, settings)]
        sets = [inputs.of_set(config) for config in configs]
        identities = [cell_identity(config, inputs) for config in configs]
        if dry_run:
            for index, cell in enumerate(cells):
                print(f"{cell_state(cell, identities[index]):<8} cell {index + 1}/{len(cells)}: {cell.describe()}")
            return out_dir
        rows: list[dict | None] = [None] * len(cells)
        pending: queue.Queue = queue.Queue()
        stale = 0
        for index, cell in enumerate(cells):
            if cell.directory.exists() and read_identity(cell.directory) != identities[index]:
                set_aside(cell.directory)  # run with another config: kept beside, never mixed in
                stale += 1
            summary = read_summary(cell.directory)
            if summary is not None:
                rows[index] = result_row(cell, {"status": "done", "error": "", **summary}, sets[index])
            else:
                pending.put(index)
        if pending.qsize() < len(cells):
            print(f"{len(cells) - pending.qsize()}/{len(cells)} cells finished before, skipped", flush=True)
        if stale:
            print(f"{stale} cell(s) had run with another config or other inputs: set aside as <cell>.stale-*, rerun",
                  flush=True)
        progress = tqdm(total=pending.qsize(), desc="cells", unit="cell", disable=None, leave=False)

        def record(index: int, outcome: dict, where: str) -> None:
            rows[index] = result_row(cells[index], outcome, sets[index])
            progress.write(f"cell {index + 1}/{len(cells)}: {cells[index].describe()}{where}: "
                           f"{describe_outcome(outcome)}")
            progress.update()

        def worker(slot: list[int] | None) -> None:
            while True:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                cell = cells[index]
                write_identity(cell.directory, identities[index])
                outcome = run_cell(cell, cell_arguments(cell_bases[index], settings[index], cell.directory), slot,
                                   launcher)
                record(index, outcome, f" on GPU {','.join(map(str, slot))}" if slot else "")

        if launcher == "submitit":
            submit_cells(list(pending.queue), cells, cell_bases, settings, identities, executor, out_dir,
                         lambda index, outcome: record(index, outcome, ""))
        else:
            with sigterm_exits():
                run_workers(worker, device_slots(gpus, devices_per_cell))
        progress.close()
        finished = [row for row in rows if row is not None]
        table_protocol = protocols[0]  # matrix.md and matrix.png show the first protocol
        teacher_names = [NO_TEACHER.title] if table_protocol in HARD_LABEL_PROTOCOLS else \
            list(dict.fromkeys(t.title for t in teachers))
        student_names = list(dict.fromkeys(s.title for s in students))
        write_results(out_dir / "results.csv", finished)
        main = [row for row in finished if row["protocol"] == table_protocol]
        write_markdown(out_dir / "matrix.md", main, teacher_names, student_names, title)
        write_heatmap(out_dir / "matrix.png", main, teacher_names, student_names, heatmap_metric, title)
        if len(protocols) > 1 or RANDOM_REAL in methods:
            reference = {s.title: full_data_accuracy(full_data, s.name, s.kwargs, s.title) for s in students} \
                if full_data is not None else {}
            for name, accuracy in reference.items():
                print(f"full-data student {name}: final top-1 {100 * accuracy:.1f} % (cached in {full_data.cache_dir})",
                      flush=True)
            write_panel(out_dir, finished, reference, title, panel_units)
        failed = sum(row["status"] == "failed" for row in finished)
        print(f"{len(finished) - failed}/{len(cells)} cells finished, {failed} failed; results in {out_dir}", flush=True)
        if failed:
            raise CellsFailedError(f"{failed} of {len(cells)} cells failed (errors in {out_dir / 'results.csv'}; "
                                   "the tables hold the others)")
        return out_dir


class CellsFailedError(PatchDDError, RuntimeError):
    """Some cells of a matrix failed (the others finished; the tables are written)."""


def check_prerequisites(teachers: list[TeacherSpec], ipcs: list[int], methods: list[str],
                        synthetic_dir: str | None) -> None:
    """Name every missing input in one error before any cell starts: teacher checkpoints and exported sets."""
    missing = [f"teacher checkpoint {t.checkpoint} (train one: patchdd fit -c configs/teacher/...)"
               for t in teachers if t.checkpoint and not has_checkpoint(t.checkpoint)]
    if synthetic_dir is not None:
        sets = sorted({set_folder(synthetic_dir, i, m) for i in ipcs for m in methods})
        missing += [f"synthetic set {path} (make it: patchdd distill ... --out {Path(path).parent}; the toy sets: "
                    "make demo writes runs/demo/syn/<method>/ipc<N>)" for path in sets if not Path(path).is_dir()]
    if missing:
        raise FileNotFoundError("the matrix needs what is missing: " + "; ".join(missing)
                                + " (the toy configs read what `make demo` writes: run it first)")


def idc_length(cell: Cell, synthetic_dir: str | None, overrides: dict) -> dict:
    """``trainer.max_epochs`` of an ``idc`` cell by IDC's rule (its IPC and the set's class count; empty for the
    other protocols and when ``overrides`` set the epochs). The class count is read from the exported set; a store
    has none to read."""
    if cell.protocol != "idc" or "trainer.max_epochs" in overrides:
        return {}
    if synthetic_dir is None:
        raise ValueError("the idc protocol reads the class count from exported sets (synthetic_dir); with a store, "
                         "set overrides: {trainer.max_epochs: N} (IDC's rule: patchdd.training.kd.idc_epochs)")
    classes = synthetic_classes(set_folder(synthetic_dir, cell.ipc, cell.selector))
    return {"trainer.max_epochs": idc_epochs(cell.ipc, len(classes))}


def has_checkpoint(path: str) -> bool:
    """A checkpoint file, or a run folder with a ``best.ckpt`` (see :func:`patchdd.training.zoo.resolve_checkpoint`)."""
    return Path(path).is_file() or find_run_checkpoint(path) is not None


def merged_config(bases: list[str], values: dict) -> dict:
    """The cell's config as values: the base YAML files loaded and merged in order (comments and layout do not
    count, values do), then the cell's dotted overrides."""
    config: dict = {}
    for path in bases:
        deep_merge(config, yaml.safe_load(Path(path).read_text()) or {})
    for key, value in values.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return config


def deep_merge(into: dict, update: dict) -> None:
    """``update`` merged into ``into`` (nested dicts key by key, other values replaced)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


def config_value(config: dict, key: str):
    """The value at a dotted key of a nested config (``None`` when absent)."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


class InputIdentities:
    """The identity of a cell's inputs, each computed once per matrix run: the synthetic set (its
    ``synthetic.json``, provenance table and image files' names and sizes; or the score store's content hash, the
    synthesis options being in the config) and the teacher checkpoint (size, modification time and a hash of its
    first and last MiB)."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], dict] = {}

    def of_set(self, config: dict) -> dict:
        """``{"set_method", "set_identity"}`` of the set of a cell's config (:func:`merged_config`)."""
        folder = config_value(config, "data.init_args.synthetic_dir")
        store = config_value(config, "data.init_args.store")
        if folder:
            return self.cached("set", folder, lambda: set_identity(Path(folder)))
        if store:
            return self.cached("store", store, lambda: {"set_method": config_value(
                config, "data.init_args.synthesis.selector") or "", "set_identity": store_identity(Path(store))})
        return {"set_method": "", "set_identity": ""}

    def of_teacher(self, config: dict) -> str:
        """The identity of the teacher checkpoint of a cell's config (empty without one)."""
        checkpoint = config_value(config, "model.init_args.teacher_checkpoint")
        if not checkpoint:
            return ""
        return self.cached("teacher", checkpoint, lambda: {"id": checkpoint_identity(checkpoint)})["id"]

    def cached(self, kind: str, key: str, compute) -> dict:
        if (kind, key) not in self.known:
            self.known[kind, key] = compute()
        return self.known[kind, key]


def set_identity(folder: Path) -> dict:
    """The method an exported set records and a hash of its description and files (names and sizes)."""
    if not folder.is_dir():
        return {"set_method": "", "set_identity": "missing"}
    digest = hashlib.sha256()
    info = folder / INFO_FILE
    method = ""
    if info.is_file():
        digest.update(info.read_bytes())
        recorded = json.loads(info.read_text())
        method = str(recorded.get("method") or recorded.get("selector") or "")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
        if path.suffix == ".parquet":
            digest.update(path.read_bytes())
    return {"set_method": method, "set_identity": digest.hexdigest()[:16]}


def store_identity(store: Path) -> str:
    """A score store's content hash (``missing`` when there is none yet)."""
    from patchdd.formats.score_store import ScoreStore

    return ScoreStore.open(store).content_hash() if (store / MANIFEST_FILE).is_file() else "missing"


def checkpoint_identity(checkpoint: str) -> str:
    """Size, modification time and a hash of the first and last MiB of a teacher checkpoint (a run folder: its
    ``best.ckpt``)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = find_run_checkpoint(checkpoint) or path
    if not path.is_file():
        return "missing"
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(MIB))
        handle.seek(max(0, stat.st_size - MIB))
        digest.update(handle.read(MIB))
    return digest.hexdigest()[:16]


MIB = 2**20


def cell_identity(config: dict, inputs: InputIdentities) -> str:
    """A hash of what decides a cell's result: its config as values and its inputs' identities."""
    record = {"config": config, "set": inputs.of_set(config), "teacher": inputs.of_teacher(config)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_identity(directory: Path) -> str | None:
    path = directory / IDENTITY_FILE
    try:
        return json.loads(path.read_text()).get("identity") if path.is_file() else None
    except ValueError:  # a state file of an older release written in place and cut: not this cell's identity
        return None


def write_identity(directory: Path, identity: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / IDENTITY_FILE, json.dumps({"identity": identity}) + "\n")


def set_aside(directory: Path) -> None:
    """Rename a cell folder that ran with another config to ``<folder>.stale-<its identity>``."""
    os.replace(directory, directory.with_name(f"{directory.name}.stale-{read_identity(directory) or 'unknown'}"))

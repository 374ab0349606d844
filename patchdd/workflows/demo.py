"""The end-to-end demo on the embedded toy data: teacher, prior, scoring, distillation, students, one table.

Every stage writes under ``out`` and is skipped when its result is already there, so an interrupted demo
resumes where it stopped. Stages run through the same CLI commands a user would type.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from patchdd.data.sources import IMAGENET_MEAN, IMAGENET_STD, list_class_folders
from patchdd.data.toy import BOXES_FILE, box_overlap, load_boxes, write_toy_dataset
from patchdd.evaluation.synthetic_sets import class_diversity, recognition_rate
from patchdd.formats.synthetic_folder import INFO_FILE, TILES_FILE, read_synthetic_folder, synthetic_classes
from patchdd.training.zoo import build_model, find_run_checkpoint
from patchdd.workflows.console import output_to
from patchdd.workflows.distill import distill
from patchdd.workflows.generate import generate
from patchdd.workflows.invoke import packaged_path, run_function, run_trainer_command
from patchdd.workflows.matrix import MAIN_PROTOCOL, StudentSpec, TeacherSpec, matrix
from patchdd.workflows.panel import FullDataSpec
from patchdd.workflows.runs import format_cell, seed_statistics, validation_top1s

FULL_DATA_ROW = "full data (teacher, CE)"


def config_args(configs: str | Sequence[str]) -> list[str]:
    """``-c PATH`` for one config file or for each of a stack (later files override earlier ones)."""
    paths = [configs] if isinstance(configs, str) else list(configs)
    return [arg for path in paths for arg in ("-c", path)]


def _stage(name: str, done: bool, action: Callable[[], None], log_file: Path | None = None,
           ledger: dict | None = None) -> None:
    """Run ``action`` unless ``done``, with the time it took (kept in ``ledger``); what it prints goes to
    ``log_file``."""
    if done:
        print(f"[demo] {name}: done before, skipped", flush=True)
        return
    start = time.perf_counter()
    print(f"[demo] {name} ..." + (f" (log: {log_file})" if log_file else ""), flush=True)
    if log_file is None:
        action()
    else:
        with output_to(log_file):
            action()
    seconds = time.perf_counter() - start
    if ledger is not None:
        ledger[name] = seconds
    print(f"[demo] {name}: {seconds:.0f} s", flush=True)


def localisation_rate(tiles_file: Path, boxes: dict[str, list[int]], split: str, threshold: float) -> float:
    """Fraction of the selected patches that hold at least ``threshold`` of their image's object."""
    tiles = pq.read_table(tiles_file, columns=["source_image", "box"]).to_pylist()
    hits = [box_overlap(t["box"], boxes[f"{split}/{t['source_image']}"]) >= threshold for t in tiles]
    return float(np.mean(hits))


def accuracy_by_cell(results_csv: Path) -> dict[tuple[str, int], list[float]]:
    """Final top-1 of every finished run of the main protocol, grouped by (selector, IPC)."""
    cells: dict[tuple[str, int], list[float]] = {}
    with results_csv.open() as fh:
        for row in csv.DictReader(fh):
            if row["status"] == "done" and row["protocol"] == MAIN_PROTOCOL:
                cells.setdefault((row["selector"], int(row["ipc"])), []).append(float(row["final_top1"]))
    return cells


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` over seeds in percent (the matrix tables' format); ``failed`` when no run finished."""
    return format_cell(*seed_statistics(values), len(values), 0) if values else "failed"


def once_per_dataset_row(name: str, seconds: float | None, sets: int, images: int, note: str) -> str:
    """A ledger row of a one-time stage, amortised over the ``images`` of the ``sets`` built from it here."""
    return (f"| {name} | " + (f"{seconds:.0f}" if seconds else "done before") + " | "
            + (f"{seconds / images:.2f} (amortised over the {images} images of the {sets} sets built here)"
               if seconds else "–") + f" | {note} |")


def per_set_row(name: str, seconds: float | None, images: int, ipcs: Sequence[int]) -> str:
    """A ledger row of a stage that builds one method's sets (all IPCs)."""
    return (f"| {name} | " + (f"{seconds:.1f}" if seconds else "done before") + " | "
            + (f"{seconds / images:.3f}" if seconds else "–") + f" | IPC {', '.join(map(str, ipcs))} |")


def cost_ledger(ledger: dict[str, float], results_csv: Path, selectors: Sequence[str], generators: Sequence[str],
                finetunes: Sequence[str], ipcs: Sequence[int], num_classes: int) -> str:
    """Seconds per stage of this run (stages done before show as such), per synthetic image; the one-time stages
    (Stage I's scoring, D3HR's inversion, a fine-tune) amortised over every set built from them; students per
    protocol from the matrix's rows (their seconds and peak memory)."""
    per_method = sum(i * num_classes for i in ipcs)
    lines = ["| stage | seconds | seconds per synthetic image | note |", "| --- | --- | --- | --- |"]
    scoring = next((v for k, v in ledger.items() if k.startswith("scoring")), None)
    lines.append(once_per_dataset_row("scoring (Stage I, once per dataset)", scoring, len(selectors) * len(ipcs),
                                      len(selectors) * per_method, "the store serves every IPC and class subset"))
    lines += [per_set_row(f"clustering + selection + export ({s})", ledger.get(f"distil ({s})"), per_method, ipcs)
              for s in selectors]
    if "d3hr" in generators:
        inversion = next((v for k, v in ledger.items() if k.startswith("D3HR inversion")), None)
        lines.append(once_per_dataset_row("D3HR inversion statistics (once per dataset)", inversion, len(ipcs),
                                          per_method, "the statistics serve every IPC and class subset"))
    lines += [once_per_dataset_row(f"DiT fine-tune ({f}, once per dataset)", ledger.get(f"fine-tune ({f})"),
                                   len(ipcs), per_method, "serves every IPC of its row") for f in finetunes]
    lines += [per_set_row(f"generation ({g})", ledger.get(f"generate ({g})"), per_method, ipcs) for g in generators]
    with results_csv.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        runs = [r for r in rows if r["protocol"] == protocol and r["seconds"]]  # runs of this time, not reused
        if not runs:
            lines.append(f"| students, {protocol} | done before | – | |")
            continue
        seconds = sum(float(r["seconds"]) for r in runs)
        peak = max((float(r["peak_memory_mb"]) for r in runs if r.get("peak_memory_mb")), default=float("nan"))
        lines.append(f"| students, {protocol} ({len(runs)} runs) | {seconds:.0f} | "
                     f"{seconds / len(runs):.1f} per run | peak memory {peak:.0f} MiB (process peak on CPU) |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def set_figures(syn_root: Path, methods: Sequence[str], ipc: int, teacher, image_size: int,
                mean: Sequence[float], std: Sequence[float]) -> dict[str, tuple[float, float]]:
    """Per method, its IPC ``ipc`` set's share of images the teacher recognises and its class diversity."""
    figures = {}
    for method in methods:
        synthetic = read_synthetic_folder(syn_root / method / f"ipc{ipc}")
        figures[method] = (recognition_rate(teacher, synthetic.images, synthetic.labels, image_size, mean, std),
                           class_diversity(synthetic.images, synthetic.labels))
    return figures


def results_markdown(accuracy: dict, localisation: dict, full_data: float, selectors: Sequence[str],
                     ipcs: Sequence[int], seeds: int, figures: dict[str, tuple[float, float]]) -> str:
    """The demo table: student top-1 (mean ± std over seeds) and patch localisation (patch methods only), per
    method and IPC; the largest IPC's sets recognised by the teacher and their class diversity."""
    top = max(ipcs)
    header = (["method"] + [f"IPC {i} top-1 (%)" for i in ipcs] + [f"IPC {i} localisation (%)" for i in ipcs]
              + [f"IPC {top} recognised (%)", f"IPC {top} diversity"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for selector in selectors:
        cells = [mean_std(accuracy.get((selector, i), [])) for i in ipcs]
        cells += [f"{100 * localisation[(selector, i)]:.0f}" if (selector, i) in localisation else "— (generated)"
                  for i in ipcs]
        recognised, diversity = figures[selector]
        cells += [f"{100 * recognised:.0f}", f"{diversity:.3f}"]
        lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    lines.append(f"| {FULL_DATA_ROW} | " + " | ".join([f"{100 * full_data:.1f}"] * len(ipcs))
                 + " |" + " — |" * (len(ipcs) + 2))
    notes = (f"\nStudent: final top-1 on the real toy validation split, mean ± std over {seeds} seeds. "
             "Localisation: share of selected patches that contain at least half of their image's object "
             "(ground-truth boxes); generated images have no source patch. Recognised: share of the set's images "
             "the teacher assigns to their class. Diversity: 1 - the mean pairwise cosine similarity of each "
             "class's images (standardised pixels), averaged over the classes (0: copies). Full data: the "
             "ConvNet-D3 teacher itself (its best epoch, the checkpoint that teaches the students), trained with "
             "cross-entropy on all training images (one run).\n")
    return "\n".join(lines) + "\n" + notes


def results_chart(accuracy: dict, localisation: dict, full_data: float, selectors: Sequence[str],
                  ipcs: Sequence[int], path: Path) -> None:
    """Grouped bars: student accuracy (left, mean ± std over seeds) and patch localisation (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(selectors)
    x = np.arange(len(ipcs))
    for k, selector in enumerate(selectors):
        means, stds = zip(*(seed_statistics(accuracy.get((selector, i), [np.nan])) for i in ipcs))
        left.bar(x + k * width, means, width, yerr=stds, capsize=3, label=selector)
        right.bar(x + k * width, [100 * localisation.get((selector, i), np.nan) for i in ipcs], width,
                  label=selector)
    left.axhline(100 * full_data, color="black", linestyle="--", linewidth=1, label=FULL_DATA_ROW)
    for axis, title in ((left, "student top-1 on real val (%)"), (right, "patches containing the object (%)")):
        axis.set_xticks(x + width * (len(selectors) - 1) / 2, [f"IPC {i}" for i in ipcs])
        axis.set_ylim(0, 100)
        axis.set_title(title)
    left.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_sheet(syn_root: Path, selectors: Sequence[str], ipc: int, path: Path) -> None:
    """First synthetic image of every class, one row per selector: what each selector picked."""
    plt = _pyplot()

    sets = {s: read_synthetic_folder(syn_root / s / f"ipc{ipc}") for s in selectors}
    names = next(iter(sets.values())).classes.names
    fig, axes = plt.subplots(len(selectors), len(names), figsize=(1.3 * len(names), 1.45 * len(selectors)),
                             squeeze=False)
    for row, (selector, synthetic) in enumerate(sets.items()):
        for label, axis in enumerate(axes[row]):
            image = synthetic.images[synthetic.labels == label][0]
            axis.imshow(image.permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(names[label], fontsize=8)
        axes[row][0].set_ylabel(selector, fontsize=9)
    fig.suptitle(f"IPC {ipc}: first synthetic image of each class", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(
    out: str = "runs/demo",
    data: str = "data/toy",
    prior: str = "assets/toy_prior",
    teacher_config: str = "configs/teacher/toy_convnet.yaml",
    prior_config: str = "configs/prior/toy.yaml",
    score_config: str | list[str] = "configs/score/toy.yaml",
    distill_config: str | list[str] = "configs/distill/toy.yaml",
    student_configs: list[str] = ["configs/student/rded_defaults.yaml", "configs/student/toy.yaml"],
    teacher_kwargs: dict = {"width": 32},
    teacher_image_size: int = 64,
    ipcs: list[int] = [1, 10],
    selectors: list[str] = ["diffusion", "random", "rded", "random_real"],
    dit_prior: str = "assets/toy_dit",
    dit_prior_config: str = "configs/prior/toy_dit.yaml",
    invert_config: str = "configs/invert/toy_d3hr.yaml",
    generators: dict[str, str] = {"dit": "configs/generate/toy_dit.yaml", "d3hr": "configs/generate/toy_d3hr.yaml",
                                  "minimax": "configs/generate/toy_dit.yaml", "memory": "configs/generate/toy_dit.yaml",
                                  "d4m": "configs/generate/toy_d4m.yaml"},
    finetunes: dict[str, str | list[str]] = {
        "minimax": "configs/prior/toy_minimax.yaml",
        "memory": ["configs/prior/toy_minimax.yaml", "configs/prior/adaptive_memory.yaml"]},
    seeds: list[int] = [0, 1],
    student_epochs: int = 50,
    localisation_threshold: float = 0.5,
    protocols: list[str] = ["soft_aug"],
) -> Path:
    """Run the whole method on the toy data and write runs/demo/results.{md,png} and a contact sheet.

    The prior is read from ``prior`` (an SD-layout folder); when it is missing it is trained first with
    ``prior_config``. The generative rows (``generators``: row -> ``generate`` config) use the DiT prior
    ``dit_prior`` (trained with ``dit_prior_config`` when missing), D4M the SD-layout ``prior``, and a row of
    ``finetunes`` (row -> ``fit`` config(s): Minimax, Li et al.'s self-adaptive memory) the DiT fine-tuned from ``dit_prior`` by
    that config; D3HR's inversion statistics come from ``invert_config``. ``score_config`` and ``distill_config``
    may be stacks of files (later ones override), e.g.
    ``configs/distill/toy.yaml`` plus ``configs/distill/toy_2x2.yaml`` for RDED's 2x2 layout.
    """
    out_dir, data_dir, prior_dir = Path(out), Path(data), Path(packaged_path(prior))
    dit_dir = Path(packaged_path(dit_prior))
    ledger: dict[str, float] = {}  # seconds of the stages run this time
    teacher_dir, store_dir, syn_root = out_dir / "teacher", out_dir / "scores", out_dir / "syn"
    logs = out_dir / "logs"
    start = time.perf_counter()

    _stage("toy data", (data_dir / BOXES_FILE).is_file(), lambda: write_toy_dataset(str(data_dir)),
           logs / "toydata.log")
    _stage("teacher", find_run_checkpoint(teacher_dir) is not None, lambda: run_trainer_command(
        ["fit", "-c", teacher_config, "--data.root", str(data_dir), "--trainer.default_root_dir", str(teacher_dir),
         "--trainer.enable_progress_bar", "false"]), logs / "teacher.log")
    teacher_checkpoint = find_run_checkpoint(teacher_dir)
    _stage("diffusion prior", (prior_dir / "unet").is_dir(), lambda: run_trainer_command(
        ["fit", "-c", prior_config, "--data.root", str(data_dir), "--model.export_dir", str(prior_dir),
         "--trainer.default_root_dir", str(out_dir / "prior_logs"), "--trainer.enable_progress_bar", "false"]),
           logs / "prior.log")
    _stage("scoring (resumes: only unscored images)", False, lambda: run_trainer_command(
        ["predict", *config_args(score_config), "--data.root", str(data_dir), "--model.prior", str(prior_dir),
         "--store.dir", str(store_dir), "--trainer.enable_progress_bar", "false"]), logs / "scoring.log", ledger)
    for selector in selectors:
        done = all((syn_root / selector / f"ipc{i}" / INFO_FILE).is_file() for i in ipcs)
        _stage(f"distil ({selector})", done, lambda s=selector: run_function("distill", distill, [
            *config_args(distill_config), "--store", str(store_dir), "--out", str(syn_root / s),
            "--synthesis.selector", s, "--synthesis.rded.checkpoint", str(teacher_checkpoint),
            "--overwrite", "true", "--progress", "false", "--ipc", *map(str, ipcs)]), logs / f"distill-{selector}.log",
               ledger)
    if set(generators) - {"d4m"}:
        _stage("DiT prior", (dit_dir / "transformer").is_dir(), lambda: run_trainer_command(
            ["fit", "-c", dit_prior_config, "--data.root", str(data_dir), "--model.export_dir", str(dit_dir),
             "--trainer.default_root_dir", str(out_dir / "dit_prior_logs"), "--trainer.enable_progress_bar",
             "false"]), logs / "dit_prior.log")
    if "d3hr" in generators:
        _stage("D3HR inversion statistics (resumes)", False, lambda: run_trainer_command(
            ["predict", "-c", invert_config, "--data.root", str(data_dir), "--model.prior", str(dit_dir),
             "--stats.dir", str(out_dir / "d3hr_stats"), "--trainer.default_root_dir", str(out_dir / "d3hr_stats"),
             "--trainer.enable_progress_bar", "false"]), logs / "d3hr_inversion.log", ledger)
    finetunes = {name: configs for name, configs in finetunes.items() if name in generators}
    tuned_priors = {name: out_dir / "priors" / name for name in finetunes}
    for name, configs in finetunes.items():
        tuned = tuned_priors[name]
        _stage(f"fine-tune ({name})", (tuned / "transformer").is_dir(), lambda c=configs, t=tuned: run_trainer_command(
            ["fit", *config_args(c), "--data.root", str(data_dir), "--model.pretrained", str(dit_dir),
             "--model.export_dir", str(t), "--trainer.default_root_dir", str(t.with_name(f"{t.name}_logs")),
             "--trainer.enable_progress_bar", "false"]), logs / f"finetune-{name}.log", ledger)
    data_classes = ",".join(list_class_folders(data_dir / "train"))  # the prior may know more classes
    for method, config in generators.items():
        done = all((syn_root / method / f"ipc{i}" / INFO_FILE).is_file() for i in ipcs)
        # D4M works with the SD-layout prior, a fine-tuned row with its own DiT
        method_prior = prior_dir if method == "d4m" else tuned_priors.get(method, dit_dir)
        _stage(f"generate ({method})", done, lambda m=method, c=config, p=method_prior: run_function(
            "generate", generate, ["-c", c, "--prior", str(p), "--out", str(syn_root / m), "--data_root", str(data_dir),
                                   "--stats", str(out_dir / "d3hr_stats"), "--classes", data_classes,
                                   "--overwrite", "true", "--progress", "false", "--ipc", *map(str, ipcs)]),
               logs / f"generate-{method}.log", ledger)
    methods = [*selectors, *generators]
    _stage("students", False, lambda: matrix(
        out=str(out_dir / "students"), base=student_configs,
        teachers=[TeacherSpec("convnet_d3", checkpoint=str(teacher_checkpoint), kwargs=teacher_kwargs,
                              label="ConvNet-D3")],
        students=[StudentSpec("convnet_d3", kwargs=teacher_kwargs, label="ConvNet-D3")],
        ipcs=ipcs, methods=methods, seeds=seeds,
        synthetic_dir=str(syn_root / "{selector}" / "ipc{ipc}"),
        overrides={"trainer.max_epochs": student_epochs, "data.real.root": str(data_dir)},
        launcher="inline", title="Toy demo students", protocols=protocols,
        full_data=FullDataSpec(teacher_config, {"data.init_args.root": str(data_dir)}, str(out_dir / "full_data"))),
           ledger=ledger)

    boxes = load_boxes(data_dir)
    localisation = {(s, i): localisation_rate(syn_root / s / f"ipc{i}" / TILES_FILE, boxes, "train",
                                              localisation_threshold) for s in selectors for i in ipcs}
    accuracy = accuracy_by_cell(out_dir / "students" / "results.csv")
    full_data = max(validation_top1s(teacher_checkpoint.parents[1]))  # the accuracy of best.ckpt
    teacher = build_model("convnet_d3", len(synthetic_classes(syn_root / selectors[0] / f"ipc{ipcs[0]}")),
                          image_size=teacher_image_size, checkpoint=str(teacher_checkpoint), **teacher_kwargs).eval()
    figures = set_figures(syn_root, methods, max(ipcs), teacher, teacher_image_size, IMAGENET_MEAN, IMAGENET_STD)
    table = results_markdown(accuracy, localisation, full_data, methods, ipcs, len(seeds), figures)
    panel = out_dir / "students" / "panel.md"
    panel_text = panel.read_text().partition("\n\n")[2] if panel.is_file() else ""
    costs = cost_ledger(ledger, out_dir / "students" / "results.csv", selectors, list(generators), list(finetunes),
                        ipcs, len(synthetic_classes(syn_root / selectors[0] / f"ipc{ipcs[0]}")))
    (out_dir / "results.md").write_text(f"# Toy demo results\n\n{table}\n## Fairness panel\n\n{panel_text}\n"
                                        f"## Cost ledger\n\n{costs}")
    results_chart(accuracy, localisation, full_data, methods, ipcs, out_dir / "results.png")
    selection_sheet(syn_root, methods, max(ipcs), out_dir / "contact_sheet.png")
    (out_dir / "results.json").write_text(json.dumps(
        {"accuracy": {f"{s}/ipc{i}": v for (s, i), v in accuracy.items()},
         "localisation": {f"{s}/ipc{i}": v for (s, i), v in localisation.items()}, "full_data": full_data,
         "recognised": {m: f[0] for m, f in figures.items()}, "diversity": {m: f[1] for m, f in figures.items()}},
        indent=1))
    print(f"\n{table}\n{panel_text}\nwrote {out_dir / 'results.md'} (with the panel and the cost ledger), "
          f"results.png, students/panel.png, contact_sheet.png "
          f"({time.perf_counter() - start:.0f} s in all)")
    return out_dir / "results.md"


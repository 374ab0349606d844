"""The fairness panel beside a matrix: every method at the same IPC under four protocols (soft / hard labels, with
and without augmentation), the random-real baseline, the full-data student, and DD-Ranking's LRS and ARS.

Written by ``matrix`` when its ``protocols`` and ``selectors`` allow it: ``panel.csv`` (one row per set x student x
protocol x seed), ``panel.md`` (per IPC and student, a row per method: final top-1 mean ± std over seeds per
protocol, the best-of as a labelled extra column, HLR, IOR, LRS, ARS) and ``panel.png`` (grouped bars).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from patchdd.evaluation.ddranking import (augmentation_robust_score, hard_label_recovery, improvement_over_random,
                                          label_robust_score)
from patchdd.workflows.console import output_to

ScoreUnits = Literal["fractions", "ddranking_code"]
from patchdd.workflows.invoke import packaged_path, run_trainer_command
from patchdd.workflows.runs import fit_arguments, format_cell, seed_statistics, slug, validation_top1s

PROTOCOLS = ("soft_aug", "soft_noaug", "hard_aug", "hard_noaug", "idc")  # idc: a column, in no score
RANDOM_REAL = "random_real"
PANEL_COLUMNS = ["ipc", "selector", "teacher", "student", "protocol", "seed", "final_top1", "best_top1", "status",
                 "seconds", "peak_memory_mb", "log_dir"]


@dataclass
class FullDataSpec:
    """The full-data student: each student architecture trained with cross-entropy on all real training images,
    by a ``Classifier`` fit config (a teacher config), cached once per config, overrides and architecture.

    Args:
        config: the fit config(s) (e.g. ``configs/teacher/toy_convnet.yaml``), stacked in order.
        overrides: dotted keys for that fit (``{"data.init_args.root": "data/toy"}``).
        cache_dir: where the runs are kept (``<cache_dir>/<student>-<hash>/``).
    """

    config: str | list[str]
    overrides: dict = field(default_factory=dict)
    cache_dir: str = "runs/full_data"


def full_data_accuracy(spec: FullDataSpec, name: str, kwargs: dict, title: str) -> float:
    """Final real-validation top-1 of architecture ``name`` trained on all real training images (cached)."""
    configs = [packaged_path(path) for path in ([spec.config] if isinstance(spec.config, str) else spec.config)]
    digest = hashlib.sha256(json.dumps([[Path(p).read_text() for p in configs], spec.overrides, name, kwargs],
                                       sort_keys=True, default=str).encode()).hexdigest()[:12]
    run = Path(spec.cache_dir) / f"{slug(title)}-{digest}"
    result = run / "full_data.json"
    if not result.is_file():
        values = {"model.init_args.model": name, "model.init_args.model_kwargs": kwargs,
                  "trainer.default_root_dir": str(run), "trainer.enable_progress_bar": False,
                  "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(run), "name": "", "version": ""}},
                  **spec.overrides}
        with output_to(run / "log.txt"):
            run_trainer_command(fit_arguments(configs, values))
        result.write_text(json.dumps({"final_top1": validation_top1s(run)[-1], "model": name, "kwargs": kwargs}))
    return json.loads(result.read_text())["final_top1"]


def write_panel(out_dir: Path, rows: list[dict], full_data: dict[str, float], title: str,
                units: ScoreUnits = "fractions") -> None:
    """``panel.csv``, ``panel.md`` and ``panel.png`` from the matrix's result rows (``full_data``: student title
    -> the full-data student's top-1; ``units``: how LRS and ARS are computed, see :func:`panel_scores`)."""
    with (out_dir / "panel.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, PANEL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "panel.md").write_text(f"# {title}: fairness panel\n\n{panel_markdown(rows, full_data, units)}")
    panel_chart(rows, out_dir / "panel.png", title)


def finals(rows: list[dict], metric: str = "final_top1", **where) -> list[float]:
    """``metric`` (the final top-1 by default) of every finished run matching ``where``."""
    return [float(r[metric]) for r in rows if r["status"] == "done" and r[metric] not in (None, "")
            and all(str(r[k]) == str(v) for k, v in where.items())]


def mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def seed_finals(rows: list[dict], **where) -> dict[str, float]:
    """Seed -> final top-1 of the finished runs matching ``where``."""
    return {str(r["seed"]): float(r["final_top1"]) for r in rows if r["status"] == "done"
            and r["final_top1"] not in (None, "") and all(str(r[k]) == str(v) for k, v in where.items())}


def ddranking_code_scores(rows: list[dict], ipc: int, selector: str, student: str, real_hard: float | None) -> dict:
    """LRS and ARS as DD-Ranking's code computes them: per run (seed), from accuracies in PERCENT fed to the
    exponential, then the mean over runs (None where no seed has every run)."""
    def runs(method: str, protocol: str) -> dict[str, float]:
        return {s: 100 * v for s, v in seed_finals(rows, ipc=ipc, selector=selector if method == "set" else method,
                                                    student=student, protocol=protocol).items()}

    syn, rand, syn_hard = runs("set", "soft_aug"), runs(RANDOM_REAL, "soft_aug"), runs("set", "hard_aug")
    syn_noaug, rand_noaug = runs("set", "soft_noaug"), runs(RANDOM_REAL, "soft_noaug")
    lrs = [label_robust_score(100 * real_hard, syn_hard[s], syn[s], rand[s]) for s in syn
           if real_hard is not None and s in rand and s in syn_hard]
    ars = [augmentation_robust_score(syn[s], rand[s], syn_noaug[s], rand_noaug[s]) for s in syn
           if s in rand and s in syn_noaug and s in rand_noaug]
    return {"LRS": mean_or_none(lrs), "ARS": mean_or_none(ars)}


def panel_scores(rows: list[dict], ipc: int, selector: str, student: str, real_hard: float | None,
                 units: ScoreUnits = "fractions") -> dict:
    """HLR, IOR, LRS and ARS of one set; None where a run is missing. ``units``: ``fractions`` (the suite: the
    scores of the mean accuracies over seeds, as fractions, so alpha and beta lie in [-1, 1] as DD-Ranking's paper
    defines them) or ``ddranking_code`` (DD-Ranking's code: per-run scores of accuracies in percent, averaged: the
    numbers its leaderboard prints, see :func:`ddranking_code_scores`). HLR and IOR are the same in both."""
    def acc(method: str, protocol: str) -> float | None:
        return mean_or_none(finals(rows, ipc=ipc, selector=method, student=student, protocol=protocol))

    syn, rand = acc(selector, "soft_aug"), acc(RANDOM_REAL, "soft_aug")
    syn_hard, syn_noaug, rand_noaug = acc(selector, "hard_aug"), acc(selector, "soft_noaug"), acc(RANDOM_REAL,
                                                                                                 "soft_noaug")
    scores = {"HLR": None, "IOR": None, "LRS": None, "ARS": None}
    if real_hard is not None and syn_hard is not None:
        scores["HLR"] = hard_label_recovery(real_hard, syn_hard)
    if syn is not None and rand is not None:
        scores["IOR"] = improvement_over_random(syn, rand)
    if scores["HLR"] is not None and scores["IOR"] is not None:
        scores["LRS"] = label_robust_score(real_hard, syn_hard, syn, rand)
    if None not in (syn, rand, syn_noaug, rand_noaug):
        scores["ARS"] = augmentation_robust_score(syn, rand, syn_noaug, rand_noaug)
    if units == "ddranking_code":
        scores |= ddranking_code_scores(rows, ipc, selector, student, real_hard)
    return scores


def panel_markdown(rows: list[dict], full_data: dict[str, float], units: ScoreUnits = "fractions") -> str:
    """Per IPC and student: a row per method; final top-1 (%) per protocol, best-of, HLR / IOR (points), LRS, ARS."""
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    blocks = []
    for ipc, student in sorted({(int(r["ipc"]), r["student"]) for r in rows}):
        real_hard = full_data.get(student)
        header = (["method"] + [f"{p.replace('_', ' ')} (%)" for p in protocols]
                  + ["soft aug best-of (%)", "HLR", "IOR", "LRS", "ARS"])
        lines = [f"### IPC {ipc}, student {student}"
                 + (f" (full data, hard labels: {100 * real_hard:.1f} %)" if real_hard is not None else ""), "",
                 "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for selector in dict.fromkeys(r["selector"] for r in rows if int(r["ipc"]) == ipc):
            cells = []
            for protocol in protocols:
                values = finals(rows, ipc=ipc, selector=selector, student=student, protocol=protocol)
                cells.append(format_cell(*seed_statistics(values), len(values), 0) if values else "–")
            best = finals(rows, "best_top1", ipc=ipc, selector=selector, student=student, protocol="soft_aug")
            cells.append(format_cell(*seed_statistics(best), len(best), 0) if best else "–")
            scores = panel_scores(rows, ipc, selector, student, real_hard, units)
            cells += [f"{100 * scores[k]:+.1f}" if scores[k] is not None else "–" for k in ("HLR", "IOR")]
            cells += [f"{scores[k]:.3f}" if scores[k] is not None else "–" for k in ("LRS", "ARS")]
            lines.append(f"| {selector} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    notes = ("\nFinal top-1 on the real validation split, mean ± std over seeds; the best-of (the best validation "
             "run) is optimistic, because the validation split is the test set here. HLR = Acc(real, hard) - "
             "Acc(set, hard); IOR = Acc(set) - Acc(random_real) under the soft-label protocol (both in points); "
             + ("LRS and ARS as DD-Ranking defines them (w = g = 0.5), of the mean accuracies as fractions, in [0, "
                "1], higher is better (DD-Ranking's code feeds percentages to the exponential and averages per-run "
                "scores: its leaderboard's numbers are on another scale; `panel_units: ddranking_code` gives them)"
                if units == "fractions" else
                "LRS and ARS as DD-Ranking's code computes them (w = g = 0.5): per run, from accuracies in percent, "
                "averaged over runs: comparable with its leaderboard, not bounded by 1")
             + "; `random_real` is the reference set, so its IOR is 0.\n")
    return "\n\n".join(blocks) + "\n" + notes


def panel_chart(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: per IPC, each method's final top-1 (mean ± std over seeds) under each protocol (the first
    student's; ``panel.md`` has them all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    student = rows[0]["student"]
    rows = [r for r in rows if r["student"] == student]
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    ipcs = sorted({int(r["ipc"]) for r in rows})
    fig, axes = plt.subplots(1, len(ipcs), figsize=(6 * len(ipcs), 4), squeeze=False)
    for axis, ipc in zip(axes[0], ipcs):
        methods = list(dict.fromkeys(r["selector"] for r in rows if int(r["ipc"]) == ipc))
        width = 0.8 / len(protocols)
        for k, protocol in enumerate(protocols):
            stats = [seed_statistics(v) if (v := finals(rows, ipc=ipc, selector=m, protocol=protocol))
                     else (np.nan, 0.0) for m in methods]
            axis.bar(np.arange(len(methods)) + k * width, [s[0] for s in stats], width, yerr=[s[1] for s in stats],
                     capsize=3, label=protocol.replace("_", " "))
        axis.set_xticks(np.arange(len(methods)) + width * (len(protocols) - 1) / 2, methods)
        axis.set_ylim(0, 100)
        axis.set_title(f"IPC {ipc}: final top-1 on real val (%)")
        axis.legend(fontsize=8)
    fig.suptitle(f"{title}: fairness panel, student {student}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

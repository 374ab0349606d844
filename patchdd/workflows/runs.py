"""Small pieces the run workflows share: run arguments, folder names, accuracies read back, mean ± std."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np


def slug(text: str) -> str:
    """``text`` as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def fit_arguments(base: list[str], values: dict, checkpoint: Path | None = None) -> list[str]:
    """``patchdd fit`` arguments: the base configs, then every override as ``--key=value`` (JSON for non-strings)."""
    args = ["fit"]
    for path in base:
        args += ["-c", path]
    for key, value in values.items():
        args.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    if checkpoint is not None:
        args.append(f"--ckpt_path={checkpoint}")
    return args


def validation_top1s(run_dir: Path) -> list[float]:
    """Every ``val/top1`` a Lightning CSV log (``run_dir/metrics.csv``) holds, in order."""
    with (run_dir / "metrics.csv").open() as fh:
        values = [float(row["val/top1"]) for row in csv.DictReader(fh) if row.get("val/top1")]
    if not values:
        raise ValueError(f"no val/top1 in {run_dir / 'metrics.csv'}")
    return values


def seed_statistics(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run) of accuracies (fractions), in percent."""
    percent = 100 * np.asarray(values, dtype=float)
    return float(percent.mean()), float(percent.std(ddof=1)) if len(percent) > 1 else 0.0


def format_cell(mean: float, std: float, runs: int, failed: int) -> str:
    """``mean ± std`` (one run: ``mean``), ``failed`` or ``–`` for no run, with a count of failed runs."""
    if runs == 0:
        return "failed" if failed else "–"
    text = f"{mean:.1f} ± {std:.1f}" if runs > 1 else f"{mean:.1f}"
    return text + (f" ({failed} failed)" if failed else "")

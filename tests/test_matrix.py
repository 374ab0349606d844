"""`cli.py matrix`: a 2 x 2 teacher x student matrix of real `fit` runs, resume, failures, tables and heatmap."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from patchdd.workflows.matrix import StudentSpec, TeacherSpec, aggregate, markdown_tables, write_heatmap
from patchdd.training.zoo import build_model
from student_helpers import CLASSES, SIZE, write_real_folder, write_synthetic_export

REPO = Path(__file__).resolve().parent.parent


def base_config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "FKDStudent",
                  "init_args": {"model_image_size": SIZE, "augment": {"image_size": SIZE}, "min_teacher_top1": 0,
                                "lr_by_architecture": {"convnet": 0.003}}},
        "data": {"class_path": "DistilledDataModule",
                 "init_args": {"synthetic_dir": str(tmp_path / "syn" / "ipc2"), "batch_size": 4,
                               "real": {"class_path": "ImageFolderDataModule",
                                        "init_args": {"root": str(tmp_path / "real"), "image_size": SIZE,
                                                      "eval_resize": SIZE, "num_workers": 0}}}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def matrix_config(tmp_path: Path, base: Path, epochs: int = 1) -> Path:
    teacher, wrong = tmp_path / "teacher.pt", tmp_path / "convnet_d3.pt"
    torch.save(build_model("convnet_d2", len(CLASSES), image_size=SIZE, width=8).state_dict(), teacher)
    torch.save(build_model("convnet_d3", len(CLASSES), image_size=SIZE, width=8).state_dict(), wrong)
    config = {
        "base": str(base),
        "teachers": [{"name": "convnet_d2", "checkpoint": str(teacher), "kwargs": {"width": 8}, "label": "T-good"},
                     {"name": "convnet_d2", "checkpoint": str(wrong), "kwargs": {"width": 8}, "label": "T-wrong"}],
        "students": [{"name": "convnet_d1", "kwargs": {"width": 8}, "label": "S-d1"},
                     {"name": "convnet_d2", "kwargs": {"width": 8}, "label": "S-d2"}],
        "ipcs": [2],
        "selectors": ["random"],  # the old spelling of methods
        "seeds": [0],
        "synthetic_dir": str(tmp_path / "syn" / "ipc{ipc}"),
        "overrides": {"trainer.max_epochs": epochs},
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_matrix(config: Path, out: Path, launcher: str, returncode: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "matrix", "-c", str(config), "--out", str(out),
                             "--launcher", launcher],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == returncode, result.stdout + result.stderr
    return result


def check_matrix_run(tmp_path: Path, launcher: str) -> None:
    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc2", ipc=2)
    config = matrix_config(tmp_path, base_config(tmp_path))
    out = tmp_path / "out"

    first = run_matrix(config, out, launcher, returncode=1)  # failed cells: the matrix exits non-zero ...
    assert "cell 1/4: T-good x S-d1 seed 0 (IPC 2, random)" in first.stdout
    assert "error: CellsFailedError: 2 of 4 cells failed" in first.stderr  # ... in one line, tables written
    assert "note: selectors is deprecated, use methods" in first.stderr  # the config's old spelling still works
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    status = {(r["teacher"], r["student"]): r for r in rows}
    for student in ("S-d1", "S-d2"):
        good = status["T-good", student]
        assert good["status"] == "done" and 0 <= float(good["final_top1"]) <= 1 and good["best_top1"]
        assert (Path(good["log_dir"]) / "summary.json").is_file()
        bad = status["T-wrong", student]
        assert bad["status"] == "failed" and "CheckpointMismatchError" in bad["error"]
    table = (out / "matrix.md").read_text()
    assert "| T-wrong | failed | failed |" in table and "IPC 2, selector random" in table
    assert (out / "matrix.png").stat().st_size > 1000

    second = run_matrix(config, out, launcher, returncode=1).stdout
    assert "2/4 cells finished before, skipped" in second
    assert "cell 3/4: T-wrong x S-d1 seed 0 (IPC 2, random)" in second  # failed cells are tried again
    assert [r["final_top1"] for r in csv.DictReader((out / "results.csv").open())] == [r["final_top1"] for r in rows]

    changed = matrix_config(tmp_path, base_config(tmp_path), epochs=2)  # a changed config: no stale reuse
    third = run_matrix(changed, out, launcher, returncode=1).stdout
    assert "finished before" not in third and "4 cell(s) had run with another config or other inputs" in third
    good = out / "ipc2" / "random" / "T-good__S-d1"
    assert json.loads((good / "seed0" / "summary.json").read_text())["epochs"] == 2
    assert len(list(good.glob("seed0.stale-*"))) == 1  # the 1-epoch result is kept beside, not mixed in


def test_matrix_through_cli_records_failures_and_skips_finished_cells(tmp_path):
    check_matrix_run(tmp_path, "inline")


@pytest.mark.slow
def test_matrix_subprocess_cells(tmp_path):
    check_matrix_run(tmp_path, "subprocess")
    log = (tmp_path / "out" / "ipc2" / "random" / "T-wrong__S-d1" / "seed0" / "log.txt").read_text()
    assert "CheckpointMismatchError" in log


def test_missing_prerequisites_are_named_before_any_cell(tmp_path):
    write_real_folder(tmp_path / "real", per_class=2, seed=0)  # the synthetic set is not made
    config = matrix_config(tmp_path, base_config(tmp_path))
    (tmp_path / "teacher.pt").unlink()
    result = run_matrix(config, tmp_path / "out", "inline", returncode=1)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "the matrix needs what is missing" in lines[0]
    assert f"teacher checkpoint {tmp_path / 'teacher.pt'}" in lines[0]
    assert f"synthetic set {tmp_path / 'syn' / 'ipc2'}" in lines[0]
    assert not (tmp_path / "out" / "ipc2").exists()  # no cell started


def fake_rows() -> list[dict]:
    rows = []
    for teacher, student, values in (("A", "x", [0.50, 0.60]), ("A", "y", [0.30, 0.30]), ("B", "x", [0.40, 0.40]),
                                     ("B", "y", [0.70, 0.90])):
        for seed, value in enumerate(values):
            rows.append({"teacher": teacher, "student": student, "ipc": 10, "selector": "diffusion", "seed": seed,
                         "final_top1": value, "best_top1": value + 0.01, "status": "done"})
    return rows


def test_tables_show_mean_std_over_seeds_and_mark_best_teacher(tmp_path):
    rows = fake_rows()
    stats = aggregate(rows, "final_top1")
    mean, std, runs, failed = stats[10, "diffusion", "A", "x"]
    assert mean == pytest.approx(55.0) and std == pytest.approx(7.0711, abs=1e-3) and (runs, failed) == (2, 0)
    table = markdown_tables(rows, ["A", "B"], ["x", "y"], "final_top1")
    assert "| A | **55.0 ± 7.1** | 30.0 ± 0.0 |" in table
    assert "| B | 40.0 ± 0.0 | **80.0 ± 14.1** |" in table
    write_heatmap(tmp_path / "m.png", rows, ["A", "B"], ["x", "y"], "best_top1", "test")
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_table4_config_parses_into_specs(tmp_path):
    from patchdd.workflows.invoke import command_parser
    from patchdd.workflows.matrix import matrix

    parser = command_parser("matrix", matrix)
    config = parser.instantiate_classes(parser.parse_args(["-c", str(REPO / "configs/matrix/table4.yaml"),
                                                           "--out", str(tmp_path)]))
    assert len(config.teachers) == 7 and len(config.students) == 7 and config.ipcs == [50]
    assert isinstance(config.teachers[0], TeacherSpec) and config.teachers[0].pretrained
    assert isinstance(config.students[6], StudentSpec) and config.students[6].name == "tv:vit_b_16"


def test_fairness_panel_from_a_matrix_with_all_protocols(tmp_path):
    """Two methods (a set and the random_real reference) x four protocols x two seeds, the full-data student
    cached: panel.csv has a row per run, panel.md the LRS / ARS the formulas give on those runs."""
    from patchdd.evaluation.ddranking import augmentation_robust_score, label_robust_score

    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    for selector in ("random", "random_real"):
        write_synthetic_export(tmp_path / "syn" / selector / "ipc2", ipc=2)
    full_data = tmp_path / "full_data.yaml"
    full_data.write_text(yaml.safe_dump({
        "model": {"class_path": "Classifier", "init_args": {"model": "convnet_d1", "image_size": SIZE,
                                                            "optimizer": "adamw", "lr": 3e-3}},
        "data": {"class_path": "ImageFolderDataModule",
                 "init_args": {"root": str(tmp_path / "real"), "image_size": SIZE, "eval_resize": SIZE,
                               "batch_size": 4, "num_workers": 0}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_model_summary": False}}))
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("convnet_d2", len(CLASSES), image_size=SIZE, width=8).state_dict(), teacher)
    config = tmp_path / "panel.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(base_config(tmp_path)),
        "teachers": [{"name": "convnet_d2", "checkpoint": str(teacher), "kwargs": {"width": 8}, "label": "T"}],
        "students": [{"name": "convnet_d1", "kwargs": {"width": 8}, "label": "S"}],
        "ipcs": [2], "methods": ["random", "random_real"], "seeds": [0, 1],
        "protocols": ["soft_aug", "soft_noaug", "hard_aug", "hard_noaug"],
        "synthetic_dir": str(tmp_path / "syn" / "{selector}" / "ipc{ipc}"),
        "full_data": {"config": str(full_data), "cache_dir": str(tmp_path / "full_cache")},
        "overrides": {"trainer.max_epochs": 1}}))
    out = tmp_path / "out"
    run_matrix(config, out, "inline")
    rows = list(csv.DictReader((out / "panel.csv").open()))
    assert len(rows) == 2 * 4 * 2 and {r["protocol"] for r in rows} == {"soft_aug", "soft_noaug", "hard_aug",
                                                                          "hard_noaug"}
    assert all(r["status"] == "done" for r in rows)
    hard = [r for r in rows if r["protocol"].startswith("hard")]
    assert all(Path(r["log_dir"]).name.startswith("hard_") for r in hard)
    assert json.loads((Path(hard[0]["log_dir"]) / "summary.json").read_text())["label_mode"] == "hard"

    def mean(selector, protocol):
        values = [float(r["final_top1"]) for r in rows if r["selector"] == selector and r["protocol"] == protocol]
        return sum(values) / len(values)

    (cached,) = (tmp_path / "full_cache").glob("S-*/full_data.json")
    real_hard = json.loads(cached.read_text())["final_top1"]
    lrs = label_robust_score(real_hard, mean("random", "hard_aug"), mean("random", "soft_aug"),
                             mean("random_real", "soft_aug"))
    ars = augmentation_robust_score(mean("random", "soft_aug"), mean("random_real", "soft_aug"),
                                    mean("random", "soft_noaug"), mean("random_real", "soft_noaug"))
    table = (out / "panel.md").read_text()
    line = next(row for row in table.splitlines() if row.startswith("| random |"))
    assert line.rstrip(" |").endswith(f"{lrs:.3f} | {ars:.3f}")
    assert (out / "panel.png").stat().st_size > 1000
    stamp = cached.stat().st_mtime
    run_matrix(config, out, "inline")  # everything reused: the cells and the cached full-data student
    assert cached.stat().st_mtime == stamp


def test_idc_protocol_cells_train_hard_label_students_by_idcs_rules(tmp_path):
    """The idc protocol: no teacher (one row per student), configs/student/idc.yaml stacked on the base (SGD,
    multi-step schedule, CutMix cross-entropy), epochs by IPC and class count unless the overrides set them; the
    matrix table shows the first protocol."""
    from patchdd.training.kd import idc_epochs
    from patchdd.workflows.matrix import Cell, idc_length

    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc2", ipc=2)
    config = yaml.safe_load(matrix_config(tmp_path, base_config(tmp_path)).read_text())
    config["protocols"] = ["idc"]
    path = tmp_path / "idc.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    run_matrix(path, out, "inline")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and {r["teacher"] for r in rows} == {"none (hard labels)"}
    assert all(r["status"] == "done" for r in rows)
    cell = Path(rows[0]["log_dir"])
    assert cell.name == "idc-seed0" and "configs/student/idc.yaml" in (cell / "command.txt").read_text()
    card = json.loads((cell / "protocol.json").read_text())
    assert card["label_mode"] == "hard" and card["teacher"] is None and card["mixing"] == "cutmix"
    assert card["optimizer"] == {"name": "sgd", "weight_decay": 5e-4, "schedule": "multistep"}
    assert card["student"]["lr"] == 0.01 and card["augmentation"]["scale"] == [0.5, 1.0]
    assert card["epochs"] == 1  # the overrides win over IDC's rule
    assert "| none (hard labels) |" in (out / "matrix.md").read_text()
    idc_cell = Cell(TeacherSpec("none"), StudentSpec("convnet_d1"), 2, "random", 0, tmp_path, "idc")
    assert idc_length(idc_cell, str(tmp_path / "syn" / "ipc{ipc}"), {}) == {
        "trainer.max_epochs": idc_epochs(2, len(CLASSES))}
    assert idc_length(Cell(TeacherSpec("t"), StudentSpec("s"), 2, "random", 0, tmp_path), None, {}) == {}
    assert idc_length(idc_cell, None, {"trainer.max_epochs": 5}) == {}  # a store, the epochs given
    with pytest.raises(ValueError, match="synthetic_dir"):
        idc_length(idc_cell, None, {})


def test_idc_imagewoof_config_needs_no_teacher(tmp_path):
    from patchdd.workflows.invoke import command_parser
    from patchdd.workflows.matrix import matrix

    parser = command_parser("matrix", matrix)
    config = parser.instantiate_classes(parser.parse_args(["-c", str(REPO / "configs/matrix/idc_imagewoof.yaml"),
                                                           "--out", str(tmp_path)]))
    assert config.protocols == ["idc"] and config.teachers == []
    assert [s.name for s in config.students] == ["convnet_d6", "resnet_ap10", "tv:resnet18"]
    with pytest.raises(ValueError, match="a teacher unless every protocol uses hard labels"):
        matrix(out=str(tmp_path), base=str(REPO / "configs/student/rded_defaults.yaml"), teachers=[],
               students=config.students, protocols=["soft_aug", "idc"])


def test_woof_methods_config_judges_every_method_of_the_suite(tmp_path):
    from patchdd.workflows.invoke import command_parser
    from patchdd.workflows.matrix import matrix

    parser = command_parser("matrix", matrix)
    config = parser.instantiate_classes(parser.parse_args(["-c", str(REPO / "configs/matrix/woof_methods.yaml"),
                                                           "--out", str(tmp_path)]))
    assert config.protocols == ["soft_aug"] and config.ipcs == [10, 50, 100] and len(config.seeds) == 5
    assert set(config.methods) == {"diffusion", "rded", "random_real", "dit", "d3hr", "minimax", "memory", "d4m"}


# --- cells that know their inputs; one controller per OUT --------------------------------------------------------
def inputs_matrix(tmp_path: Path, out: Path) -> list[dict]:
    from patchdd.workflows.matrix import matrix

    matrix(str(out), [str(tmp_path / "base.yaml")],
           teachers=[TeacherSpec("convnet_d2", checkpoint=str(tmp_path / "teacher.pt"), kwargs={"width": 8})],
           students=[StudentSpec("convnet_d1", kwargs={"width": 8})], ipcs=[2], methods=["random", "diffusion"],
           synthetic_dir=str(tmp_path / "syn" / "{method}" / "ipc{ipc}"), launcher="inline")
    return list(csv.DictReader((out / "results.csv").open()))


def write_teacher(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(build_model("convnet_d2", len(CLASSES), image_size=SIZE, width=8).state_dict(), path)


def test_a_changed_input_reruns_exactly_the_cells_that_used_it(tmp_path, capsys):
    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    for method in ("random", "diffusion"):
        write_synthetic_export(tmp_path / "syn" / method / "ipc2", ipc=2)
    write_teacher(tmp_path / "teacher.pt", seed=0)
    base_config(tmp_path)
    out = tmp_path / "out"
    first = inputs_matrix(tmp_path, out)
    assert [r["set_method"] for r in first] == ["random", "random"] and len({r["set_identity"] for r in first}) == 1
    capsys.readouterr()

    base = tmp_path / "base.yaml"
    base.write_text("# a comment changes no value\n" + base.read_text())
    inputs_matrix(tmp_path, out)
    assert "2/2 cells finished before, skipped" in capsys.readouterr().out

    rded = tmp_path / "syn" / "diffusion" / "ipc2"  # re-distilled with another method at the same path
    info = json.loads((rded / "synthetic.json").read_text())
    (rded / "synthetic.json").write_text(json.dumps(info | {"selector": "rded"}))
    rows = inputs_matrix(tmp_path, out)
    printed = capsys.readouterr().out
    assert "1/2 cells finished before, skipped" in printed and "(IPC 2, diffusion)" in printed
    assert "(IPC 2, random)" not in printed.split("skipped")[1]
    assert {r["selector"]: r["set_method"] for r in rows} == {"random": "random", "diffusion": "rded"}
    assert len(list((out / "ipc2" / "diffusion").glob("*/seed0.stale-*"))) == 1  # the old result kept beside

    write_teacher(tmp_path / "teacher.pt", seed=1)  # the teacher replaced: every cell it taught reruns
    inputs_matrix(tmp_path, out)
    assert "finished before" not in capsys.readouterr().out


def test_two_controllers_started_together_neither_crash_nor_run_a_cell_twice(tmp_path):
    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc2", ipc=2)
    config = yaml.safe_load(matrix_config(tmp_path, base_config(tmp_path)).read_text())
    config["teachers"] = config["teachers"][:1]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, str(REPO / "cli.py"), "matrix", "-c", str(tmp_path / "one.yaml"), "--out",
               str(tmp_path / "out"), "--launcher", "inline"]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate() for run in runs]
    for (stdout, stderr), run in zip(outputs, runs):
        assert "JSONDecodeError" not in stderr and "Traceback" not in stderr
        assert run.returncode == 0 or "OutputBusyError" in stderr and "is being written by pid" in stderr, stderr
    trained = sum(stdout.count("cell 1/2:") + stdout.count("cell 2/2:") for stdout, _ in outputs)
    assert trained == 2  # each cell once, by whichever controller held OUT
    assert len(list(csv.DictReader((tmp_path / "out" / "results.csv").open()))) == 2


def test_submitit_local_runs_the_cells_as_jobs_like_the_subprocess_launcher(tmp_path):
    """``--launcher submitit --executor.cluster local``: a dry run lists the cells and submits nothing; the cells run
    as submitit jobs (a job id recorded per cell) and give the tables the other launchers give; a rerun skips them."""
    write_real_folder(tmp_path / "real", per_class=2, seed=0)
    write_synthetic_export(tmp_path / "syn" / "ipc2", ipc=2)
    config = yaml.safe_load(matrix_config(tmp_path, base_config(tmp_path)).read_text())
    config["teachers"] = config["teachers"][:1]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(config))

    def run(out: str, *extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, str(REPO / "cli.py"), "matrix", "-c", str(tmp_path / "one.yaml"),
                               "--out", str(tmp_path / out), *extra], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    submitit = ("--launcher", "submitit", "--executor.cluster", "local", "--executor.timeout_min", "30")
    dry = run("jobs", *submitit, "--dry_run", "true").stdout
    assert dry.count("pending  cell") == 2 and not (tmp_path / "jobs" / "ipc2").exists()
    run("jobs", *submitit)
    run("inline", "--launcher", "inline")
    rows = {name: list(csv.DictReader((tmp_path / name / "results.csv").open())) for name in ("jobs", "inline")}
    assert [r["status"] for r in rows["jobs"]] == ["done", "done"]
    for job_row, inline_row in zip(rows["jobs"], rows["inline"]):
        assert (job_row["teacher"], job_row["student"], job_row["set_identity"]) == \
            (inline_row["teacher"], inline_row["student"], inline_row["set_identity"])
        assert float(job_row["final_top1"]) == pytest.approx(float(inline_row["final_top1"]), abs=0.05)
        assert json.loads((Path(job_row["log_dir"]) / "job.json").read_text())["cluster"] == "local"
    assert "2/2 cells finished before, skipped" in run("jobs", *submitit).stdout
    assert run("jobs", *submitit, "--dry_run", "true").stdout.count("done     cell") == 2

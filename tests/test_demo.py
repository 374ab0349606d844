"""The demo's whole pipeline on a reduced setting: tiny prior, few images, short trainings; every cell filled."""

import json
from pathlib import Path

import yaml

from patchdd.data.toy import write_toy_dataset
from tests.tiny_sd import save_tiny_sd
from patchdd.workflows.demo import FULL_DATA_ROW, demo

REPO = Path(__file__).resolve().parents[1]


def _reduced(config: str, tmp_path: Path, changes: dict) -> str:
    """A copy of a shipped config with some nested values replaced (``a.b.c`` keys)."""
    data = yaml.safe_load((REPO / config).read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / f"{Path(config).parent.name}_{Path(config).name}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_demo_pipeline_fills_every_cell_and_resumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the shipped configs use repository-relative paths
    data = write_toy_dataset(str(tmp_path / "toy"), num_classes=3, image_size=64, train_per_class=8,
                             val_per_class=3)
    prior = save_tiny_sd(tmp_path / "prior")
    teacher = _reduced("configs/teacher/toy_convnet.yaml", tmp_path, {
        "trainer.max_epochs": 1, "data.init_args.num_workers": 0, "data.init_args.batch_size": 8})
    score = _reduced("configs/score/toy.yaml", tmp_path, {
        "model.init_args.num_draws": 2, "model.init_args.dift_ensemble": 1, "data.init_args.num_workers": 0})
    student = _reduced("configs/student/toy.yaml", tmp_path, {"data.init_args.real.init_args.num_workers": 0,
                                                              "model.init_args.min_teacher_top1": 0})  # 1-epoch teacher
    invert = _reduced("configs/invert/toy_d3hr.yaml", tmp_path, {
        "model.init_args.steps": 10, "data.init_args.num_workers": 0})
    generators = {"dit": _reduced("configs/generate/toy_dit.yaml", tmp_path, {"sampling.steps": 10}),
                  "d3hr": _reduced("configs/generate/toy_d3hr.yaml", tmp_path, {
                      "sampling.steps": 10, "d3hr.candidates": 128, "d3hr.block_size": 64}),
                  "memory": _reduced("configs/generate/toy_dit.yaml", tmp_path, {"sampling.steps": 10}),
                  "d4m": _reduced("configs/generate/toy_d4m.yaml", tmp_path, {"d4m.steps": 5, "d4m.image_size": 32})}
    # seed 001's row: the committed toy DiT fine-tuned a few steps with self-adaptive memory banks
    finetunes = {"memory": [_reduced("configs/prior/toy_minimax.yaml", tmp_path, {
        "trainer.max_steps": 4, "data.init_args.num_workers": 0}), "configs/prior/adaptive_memory.yaml"],
        "minimax": "configs/prior/toy_minimax.yaml"}  # not a generator row here: never run
    out = tmp_path / "demo"
    kwargs = dict(out=str(out), data=str(data), prior=str(prior), teacher_config=teacher, score_config=score,
                  student_configs=["configs/student/rded_defaults.yaml", student], ipcs=[1, 2],
                  selectors=["diffusion", "random", "rded", "random_real"], invert_config=invert,
                  generators=generators, finetunes=finetunes, seeds=[0, 1], student_epochs=2,
                  protocols=["soft_aug", "hard_aug"])

    table = demo(**kwargs).read_text()

    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    main = rows[:rows.index(next(r for r in rows if FULL_DATA_ROW in r)) + 1]
    assert [row.split("|")[1].strip() for row in main] == ["diffusion", "random", "rded", "random_real", "dit", "d3hr",
                                                           "memory", "d4m", FULL_DATA_ROW]
    for row in main[:8]:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert len(cells) == 6 and all(c and c != "failed" for c in cells), row
        assert "±" in cells[0] and "±" in cells[1]  # two seeds: mean ± std
        assert 0 <= float(cells[4]) <= 100 and 0 <= float(cells[5]) <= 2  # recognised (%), diversity at IPC 2
    assert "generated" in main[5] and "generated" not in main[0]  # no source patches to localise
    for name in ("results.png", "contact_sheet.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "students").rglob("summary.json"))) == 2 * 8 * 2 * 2  # IPCs x methods x seeds x protocols
    assert "| generation (d3hr) |" in table and "D3HR inversion statistics" in table
    assert "DiT fine-tune (memory" in table and "fine-tune (minimax" not in table
    memory_set = json.loads((out / "syn" / "memory" / "ipc2" / "synthetic.json").read_text())
    assert Path(memory_set["prior"]) == out / "priors" / "memory"  # sampled from its own fine-tuned DiT
    assert (out / "priors" / "memory_logs").is_dir() and not (out / "priors" / "minimax").exists()
    assert "## Fairness panel" in table and "## Cost ledger" in table
    panel = next(line for line in table.splitlines() if line.startswith("| diffusion |") and "LRS" not in line
                 and line.count("|") > 8)
    assert panel.split("|")[-3].strip() != "–"  # an LRS: hard-label runs, random_real and the full-data student
    assert (out / "students" / "panel.png").stat().st_size > 0

    # a second call finds every stage done and rebuilds the same table without training again
    stamp = (out / "students" / "results.csv").stat().st_mtime
    again = demo(**kwargs).read_text()
    results = table.partition("## Cost ledger")[0]
    assert again.partition("## Cost ledger")[0] == results  # the same results; the ledger says what ran this time
    assert "done before" in again.partition("## Cost ledger")[2]
    assert len(list((out / "students").rglob("summary.json"))) == 64
    assert (out / "students" / "results.csv").stat().st_mtime >= stamp


def test_demo_config_stacks_override_the_base_files(monkeypatch) -> None:
    """The layout / window variants of README's demo table are config stacks the commands accept."""
    from patchdd.workflows.invoke import command_parser
    from patchdd.workflows.distill import distill
    from patchdd.workflows.demo import config_args

    monkeypatch.chdir(REPO)
    assert config_args("a.yaml") == ["-c", "a.yaml"]
    assert config_args(["a.yaml", "b.yaml"]) == ["-c", "a.yaml", "-c", "b.yaml"]
    parser = command_parser("distill", distill)
    base = parser.parse_args(["-c", "configs/distill/toy.yaml"])
    stacked = parser.parse_args(config_args(["configs/distill/toy.yaml", "configs/distill/toy_2x2.yaml",
                                             "configs/distill/toy_window24.yaml"]))
    assert base.synthesis.layout.compose_max_ipc == 0 and stacked.synthesis.layout.compose_max_ipc == 10
    assert stacked.synthesis.layout.output_size == base.synthesis.layout.output_size == 64  # the rest of the base file stays
    assert base.synthesis.expect_settings["patch_size"] == 32 and stacked.synthesis.expect_settings["patch_size"] == 24
    window = yaml.safe_load((REPO / "configs/score/toy_window24.yaml").read_text())
    assert window["model"]["init_args"]["patch_size"] == stacked.synthesis.expect_settings["patch_size"]

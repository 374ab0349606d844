"""Teacher training through the real CLI and the YAML config, and the checkpoint loading back into the zoo."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchdd import cli
from patchdd.data.sources import ClassMapping
from patchdd.datamodules.real import ImageFolderDataModule
from patchdd.errors import DataError
from patchdd.training.zoo import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/teacher/toy_convnet.yaml")


def test_fit_few_steps_writes_a_checkpoint_the_zoo_loads(toy_root: Path, tmp_path: Path) -> None:
    cli.main(["fit", "-c", CONFIG, "--data.root", str(toy_root), "--trainer.max_steps", "5",
              "--trainer.default_root_dir", str(tmp_path), "--data.num_workers", "0",
              "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    config = (run / "config.yaml").read_text()
    assert "seed_everything: 0" in config
    mapping = ClassMapping.load(run / "class_mapping.json")
    assert mapping.folders == ImageFolderDataModule(str(toy_root)).class_mapping.folders
    model = build_model("convnet_d3", num_classes=len(mapping), image_size=64, width=32, checkpoint=str(checkpoint))
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert torch.equal(model.classifier.weight, saved["model.classifier.weight"])


def test_missing_root_exits_non_zero_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_data"
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "-c", CONFIG, "--data.root", str(missing),
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert f"patchdd fit: error: DataError: data root does not exist: {missing}" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_class_in_config_is_one_error_line(toy_root: Path, tmp_path: Path, capsys) -> None:
    args = ["fit", "-c", CONFIG, "--data.root", str(toy_root), "--data.classes", "[dodecahedron]",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1"]
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    assert stopped.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "unknown class" in lines[0] and "dodecahedron" in lines[0]
    with pytest.raises(ValueError, match="unknown class"):  # --traceback: the exception itself
        cli.main(["--traceback", *args])


def test_help_lists_every_command(capsys) -> None:
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *cli.COMMANDS):
        assert f"  {name}" in out


def test_toydata_command_and_print_config(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["toydata", "--print_config"])
    assert "train_per_class: 100" in capsys.readouterr().out
    cli.main(["toydata", "--out", str(tmp_path / "toy"), "--num_classes", "2", "--train_per_class", "1",
              "--val_per_class", "1", "--image_size", "32"])
    assert len(list((tmp_path / "toy").rglob("*.png"))) == 4


def test_data_error_type_for_bad_root(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        _ = ImageFolderDataModule(str(tmp_path / "x")).class_mapping


def test_test_command_reports_test_metrics(toy_root: Path, tmp_path: Path) -> None:
    from lightning import Trainer

    from patchdd.lightning_modules.classifier import Classifier

    dm = ImageFolderDataModule(str(toy_root), image_size=32, eval_resize=32, num_workers=0, batch_size=8)
    model = Classifier("convnet_d3", image_size=32, model_kwargs={"width": 8})
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))
    results = trainer.test(model, datamodule=dm)[0]
    assert {"test/loss", "test/top1", "test/top5"} <= set(results)
    assert 0.0 <= results["test/top1"] <= results["test/top5"] <= 1.0

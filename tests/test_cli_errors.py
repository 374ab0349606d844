"""Parser errors are one line: an unknown option names the nearest known one, a missing config says which -c files
the command takes, a preset without its base config says so; --verbose adds the parser's own message."""

from __future__ import annotations

import pytest

from patchdd import cli


def error_lines(args: list[str], capsys) -> list[str]:
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 1
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("args, expected", [
    (["fit", "-c", "configs/student/rded_defaults.yaml", "-c", "configs/student/toy.yaml", "--model.temprature", "2"],
     "unknown option --model.temprature (did you mean --model.temperature?)"),
    (["predict", "-c", "configs/score/toy.yaml", "--data.batch_sise", "2"],
     "unknown option --data.batch_sise (did you mean --data.batch_size?)"),
    (["generate", "--methd", "dit"], "unknown option --methd (did you mean --method?)"),
    (["fit"], "patchdd fit needs a config: -c CONFIG.yaml (from configs/teacher/, configs/student/ or configs/prior/)"),
    (["distill", "--store", "runs/scores"], "missing --out: give it, or a config that sets it with -c CONFIG.yaml "
                                            "(from configs/distill/)"),
    (["fit", "-c", "configs/student/toy.yaml"], "(configs/student/toy.yaml is stacked on "
                                                "configs/student/rded_defaults.yaml: pass -c "
                                                "configs/student/rded_defaults.yaml before it)"),
])
def test_a_parser_error_is_one_line(args, expected, capsys) -> None:
    lines = error_lines(args, capsys)
    assert len(lines) == 1 and lines[0].startswith(f"patchdd {args[0]}: error: OptionError: ")
    assert expected in lines[0]


def test_verbose_adds_the_parsers_own_message(capsys, monkeypatch) -> None:
    monkeypatch.delenv("PATCHDD_VERBOSE", raising=False)
    lines = error_lines(["--verbose", "generate", "--methd", "dit"], capsys)
    assert len(lines) > 1 and "--methd" in lines[0] and lines[-1].startswith("patchdd generate: error: OptionError")

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


# --- one name per concept -----------------------------------------------------------------------------------------
def test_patchdd_methods_lists_every_method_of_both_families(capsys) -> None:
    from patchdd.methods.catalog import CATALOG
    from patchdd.methods.registry import METHODS
    from patchdd.workflows.generate import GENERATIVE_METHODS

    cli.main(["methods"])
    out = capsys.readouterr().out
    names = [m.name for m in CATALOG]
    assert all(f"| {name} |" in out for name in names)
    assert {m.name for m in CATALOG if m.family == "selection"} == set(METHODS)  # distill --method takes them all
    generated = {m.commands.split("generate --method ")[1].split()[0] for m in CATALOG if m.family == "generative"}
    assert generated == set(GENERATIVE_METHODS)  # and every generative row names a generate method


def test_distill_takes_method_and_generate_the_old_data_spelling(tmp_path, capsys) -> None:
    from test_distill import FAST, LAYOUT, random_rows, write_images, write_store

    counts = {"cls_a": 6, "cls_b": 6}
    write_images(tmp_path / "images", counts)
    write_store(tmp_path / "store", tmp_path / "images", random_rows(counts), list(counts))
    cli.main(["distill", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--ipc", "1",
              "--method", "random", "--synthesis.layout.output_size", str(LAYOUT.output_size),
              "--synthesis.clustering.num_clusters", str(FAST.num_clusters), "--progress", "false"])
    import json

    assert json.loads((tmp_path / "out" / "ipc1" / "synthetic.json").read_text())["selector"] == "random"
    with pytest.raises(SystemExit):  # d4m without a data root; the old --data spelling is read, with a note
        cli.main(["generate", "--method", "d4m", "--data", str(tmp_path / "nowhere"), "--prior",
                  str(tmp_path / "no_prior"), "--out", str(tmp_path / "gen")])
    assert "note: data is deprecated, use data_root" in capsys.readouterr().err


def no_parser(args):
    raise AssertionError("the cached help should not build the parser")


def test_command_help_is_built_once_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cli.main(["methods", "--help"])
    first = capsys.readouterr().out
    assert "usage: patchdd methods" in first and len(list((tmp_path / "patchdd" / "help").glob("methods-*.txt"))) == 1

    monkeypatch.setattr(cli, "dispatch", no_parser)
    cli.main(["methods", "--help"])
    assert capsys.readouterr().out == first
    with pytest.raises(SystemExit):  # options besides --help: the parser runs (here: the stand-in that fails)
        cli.main(["methods", "--help", "--verbose_x"])
    assert "should not build the parser" in capsys.readouterr().err


def test_setup_builds_every_commands_help_so_the_first_call_is_read_from_the_cache(tmp_path, monkeypatch, capsys):
    """``make setup`` runs ``build_help_cache``; the trainer commands' usage names ``patchdd`` whichever process built
    it (here pytest, whose sys.argv[0] LightningCLI would print)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cli.build_help_cache()
    monkeypatch.setattr(cli, "dispatch", no_parser)
    for command in (*cli.TRAINER_COMMANDS, *cli.COMMANDS):
        cli.main([command, "--help"])
        usage = capsys.readouterr().out.splitlines()[0]
        assert usage.startswith("usage: patchdd ") and f" {command} " in f"{usage} ", usage

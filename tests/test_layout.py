"""The package layout: one importable name, imports that run one way (cli -> workflows -> Lightning classes ->
core) with no cycle, a fast command line, and a public API that resolves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each installed package lives in the checkout (pyproject.toml's package-dir).
PACKAGE_DIRS = {"patchdd": REPO / "patchdd", "patchdd.lightning_modules": REPO / "lightning_modules",
                "patchdd.datamodules": REPO / "datamodules"}
# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS = ("core", "lightning", "workflows", "cli")


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def layer(module: str) -> str:
    if module in ("patchdd", "patchdd.cli", "patchdd.__main__"):
        return "cli"
    if module.startswith("patchdd.workflows"):
        return "workflows"
    if module.startswith(("patchdd.lightning_modules", "patchdd.datamodules")):
        return "lightning"
    return "core"


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The suite's modules ``path`` imports anywhere (functions included), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {name: imported_modules(path, set(files)) for name, path in files.items()}
    # The public API's lazy table counts as imports of the package facade.
    api = ast.literal_eval(next(node.value for node in ast.parse(files["patchdd"].read_text()).body
                                if isinstance(node, ast.Assign) and node.targets[0].id == "_API"))
    graph["patchdd"] |= set(api.values())
    # So does the command table of the CLI.
    commands = ast.literal_eval(next(node.value for node in ast.parse(files["patchdd.cli"].read_text()).body
                                     if isinstance(node, ast.Assign) and node.targets[0].id == "COMMANDS"))
    graph["patchdd.cli"] |= {target.partition(":")[0] for target in commands.values()}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the scan found the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_run_one_way() -> None:
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in import_graph().items()
             for b in targets if LAYERS.index(layer(b)) > LAYERS.index(layer(a))]
    assert not wrong, "\n".join(wrong)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lightning_folders_hold_lightning_classes_only() -> None:
    """lightning_modules/ holds LightningModules (and their mixins), datamodules/ data modules, callbacks and
    their datasets, samplers and loaders (a class may also derive from one of these defined above it in its file)."""
    for folder, allowed in (("lightning_modules", {"L.LightningModule", "RealValidation"}),
                            ("datamodules", {"L.LightningDataModule", "RealDataModule", "Callback",
                                             "BasePredictionWriter", "Dataset", "Sampler", "DataLoader", "CSVLogger",
                                             "ExperimentWriter"})):
        for path in (REPO / folder).glob("*.py"):
            bases = set(allowed)
            classes = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)]
            for cls in classes:
                names = {ast.unparse(base) for base in cls.bases}
                assert not names or names & bases, f"{path.name}: {cls.name} is not a Lightning class (or a mixin)"
                bases.add(cls.name)


def test_public_api_resolves_every_name() -> None:
    code = "import patchdd; missing = [n for n in patchdd.__all__ if getattr(patchdd, n, None) is None]; print(missing)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["-m", "patchdd", "--help"], [str(REPO / "cli.py"), "--help"]])
def test_help_imports_neither_torch_nor_lightning(command) -> None:
    """``patchdd --help`` answers at once: it reads the commands' docstrings without importing them."""
    probe = ("import runpy, sys; sys.argv = [sys.argv[0], '--help']; "
             f"runpy.run_path({command[-2]!r}, run_name='__main__') if {command[0]!r} != '-m' else "
             "runpy.run_module('patchdd', run_name='__main__'); "
             "print('torch' in sys.modules, 'lightning' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "distill" in result.stdout and "--traceback" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "False False"


def test_every_lightning_class_documents_every_option() -> None:
    """``Args:`` entries for every constructor parameter, so that ``--model.help`` / ``--data.help`` explain them."""
    import inspect
    import re

    from patchdd.workflows.invoke import import_lightning_classes

    import_lightning_classes()
    import lightning as L

    classes = [cls for base in (L.LightningModule, L.LightningDataModule, L.Callback)
               for cls in _subclasses(base) if cls.__module__.startswith("patchdd.")]
    assert len(classes) >= 10
    undocumented = []
    for cls in classes:
        documented = set(re.findall(r"^\s{8}(\w+):", cls.__doc__ or "", re.M))
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and parameter.kind is not parameter.VAR_POSITIONAL and name not in documented:
                undocumented.append(f"{cls.__name__}.{name}")
    assert not undocumented, undocumented


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct} | _subclasses(direct)}


def test_the_wheel_installs_only_patchdd_with_configs_assets_and_a_script(tmp_path) -> None:
    """``pip install .`` adds one top-level name; the Lightning classes, configs and toy prior come under it."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("patchdd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"patchdd", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in ("patchdd/lightning_modules/student.py", "patchdd/datamodules/distilled.py"):
        assert expected in names
    data = [f"patchdd/{path.relative_to(REPO)}" for folder in ("configs", "assets")
            for path in (REPO / folder).rglob("*") if path.is_file()]
    assert len(data) > 30 and not [path for path in data if path not in names]  # every config and asset
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt")
    assert b"patchdd = patchdd.cli:main" in entry_points

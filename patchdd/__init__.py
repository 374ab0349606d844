"""patchdd: dataset distillation with diffusion models, as a PyTorch Lightning suite.

The public API a notebook needs, imported on first use (``import patchdd`` itself is instant)::

    import patchdd
    store = patchdd.score("data/toy", "assets/toy_prior", "runs/demo/scores", config="configs/score/toy.yaml")
    store = patchdd.ScoreStore.open("runs/demo/scores")                       # a Stage I score store
    images, picks = patchdd.synthetic_set("runs/demo/scores", ipc=10, classes="all",
                                          synthesis=patchdd.SynthesisOptions(selector="diffusion"))
    patchdd.distill("runs/demo/scores", "runs/syn/toy", ipc=[1, 10])           # export PNG ImageFolders
    patchdd.generate("d3hr", "runs/syn/d3hr", "assets/toy_dit", ipc=[10], stats="runs/demo/d3hr_stats")
    model = patchdd.build_model("resnet18", num_classes=10)                   # the model zoo
    summary = patchdd.evaluate("runs/syn/toy/ipc10", "data/toy", "convnet_d3", "runs/demo/teacher",
                               student="convnet_d3", configs=["configs/student/rded_defaults.yaml",
                                                              "configs/student/toy.yaml"])
    patchdd.matrix(out=..., base=[...], teachers=[...], students=[...])       # teacher x student matrices

The command line is ``patchdd --help`` (``python -m patchdd``, ``python cli.py``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "ScoreStore": "patchdd.formats.score_store",
    "StoreIndex": "patchdd.methods.store_index",
    "SynthesisOptions": "patchdd.methods.registry",
    "METHODS": "patchdd.methods.registry",
    "make_selector": "patchdd.methods.registry",
    "synthetic_set": "patchdd.methods.synthesis",
    "open_store": "patchdd.methods.synthesis",
    "LayoutOptions": "patchdd.methods.composition",
    "ClusterOptions": "patchdd.methods.selection",
    "RDEDOptions": "patchdd.methods.rded",
    "SyntheticSet": "patchdd.formats.synthetic_set",
    "read_synthetic_folder": "patchdd.formats.synthetic_folder",
    "contact_sheet": "patchdd.formats.synthetic_folder",
    "ClassMapping": "patchdd.data.sources",
    "resolve_classes": "patchdd.data.subsets",
    "write_toy_dataset": "patchdd.data.toy",
    "load_prior": "patchdd.priors.sd",
    "build_prior": "patchdd.priors.sd",
    "load_dit_prior": "patchdd.priors.dit",
    "build_dit_prior": "patchdd.priors.dit",
    "LatentStatsStore": "patchdd.formats.latent_stats",
    "SamplingOptions": "patchdd.generation.plan",
    "D3HROptions": "patchdd.generation.plan",
    "group_sample": "patchdd.generation.group_sampling",
    "generate": "patchdd.workflows.generate",
    "build_model": "patchdd.training.zoo",
    "distill": "patchdd.workflows.distill",
    "score": "patchdd.workflows.python_api",
    "evaluate": "patchdd.workflows.python_api",
    "matrix": "patchdd.workflows.matrix",
    "TeacherSpec": "patchdd.workflows.matrix",
    "StudentSpec": "patchdd.workflows.matrix",
    "demo": "patchdd.workflows.demo",
    "PatchDDError": "patchdd.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'patchdd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

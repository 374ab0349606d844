"""Every method of the suite, selection and generative, in one table: where it comes from, what it needs, how it
runs. ``patchdd methods`` prints it; the matrix's ``methods`` axis takes these names.

Selection methods build a set from a score store (``patchdd distill --method NAME``; the registry that builds
them is :data:`patchdd.methods.registry.METHODS`); generative ones sample a diffusion prior (``patchdd generate``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """One method: its name, its family (``selection`` or ``generative``), its source, what it needs, and the
    commands that make its set."""

    name: str
    family: str
    source: str
    needs: str
    commands: str


CATALOG = (
    MethodInfo("diffusion", "selection", "Zhong et al., diffusion-driven patch selection (the core)",
               "a score store", "patchdd distill --method diffusion"),
    MethodInfo("rded", "selection", "Sun et al., RDED (CVPR 2024)", "a score store (its images) and a teacher",
               "patchdd distill --method rded --synthesis.rded.checkpoint TEACHER"),
    MethodInfo("random", "selection", "baseline: random patches of the store's patch size", "a score store",
               "patchdd distill --method random"),
    MethodInfo("random_real", "selection", "baseline: whole random real images (DD-Ranking's reference)",
               "a score store (its images)", "patchdd distill --method random_real"),
    MethodInfo("dit", "generative", "baseline: class-conditional DiT samples from noise", "a DiT prior",
               "patchdd generate --method dit"),
    MethodInfo("d3hr", "generative", "Zhao et al., D3HR (ICML 2025)", "a DiT prior and its inversion statistics",
               "patchdd predict -c configs/invert/...; patchdd generate --method d3hr --stats STATS"),
    MethodInfo("minimax", "generative", "Gu et al., Minimax diffusion (CVPR 2024)",
               "a DiT fine-tuned with FIFO memory banks",
               "patchdd fit -c configs/prior/dit_minimax.yaml; patchdd generate --method dit --prior TUNED"),
    MethodInfo("memory", "generative", "Li et al., the self-adaptive-memory DiT",
               "a DiT fine-tuned with self-adaptive banks",
               "patchdd fit -c configs/prior/dit_minimax.yaml -c configs/prior/adaptive_memory.yaml; "
               "patchdd generate --method dit --prior TUNED"),
    MethodInfo("d4m", "generative", "Su et al., D4M (CVPR 2024)", "an SD-layout prior and the training images",
               "patchdd generate --method d4m --data_root ROOT"),
)


def methods_table() -> str:
    """The catalog as a Markdown table."""
    rows = [f"| {m.name} | {m.family} | {m.source} | {m.needs} | `{m.commands}` |" for m in CATALOG]
    return "\n".join(["| method | family | source | needs | commands |", "| --- | --- | --- | --- | --- |", *rows])


def list_methods() -> None:
    """List every method of the suite: its family, source, what it needs and the commands that make its set."""
    print(methods_table())

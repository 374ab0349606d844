"""A training loader that resumes mid-epoch exactly where a cut run stopped.

Lightning saves the ``state_dict()`` of a loader that has one in every checkpoint and hands it back through
``load_state_dict()`` before the resumed run iterates (its protocol for stateful loaders). :class:`ResumableLoader`
keeps there the random state the epoch's iterator was created with (the shuffle order and the workers' seeds are
drawn from it), the batches handed out since, and every global random state at the save. The resumed run creates
its iterator from the same state, skips the batches the cut run trained on (its workers load them, so their own
random streams advance as before), and continues from the saved random state: the same batches, augmentations and
noise as an uncut run.

Exact when the workers are started with each epoch's iterator (``persistent_workers`` off, or no workers):
persistent workers keep random streams from earlier epochs that no checkpoint holds.
"""

from __future__ import annotations

from typing import Any

import random

import numpy as np
import torch
from torch.utils.data import DataLoader


def collect_rng_states() -> dict[str, Any]:
    """Every global random state (torch, CUDA, numpy, Python) as tensors and plain values, so that a checkpoint
    holding them loads with ``weights_only``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`collect_rng_states` collected."""
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"]:
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose iteration Lightning can save and resume mid-epoch (see the module's docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_rng: dict[str, Any] | None = None
        self._handed_out = 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self):
        resume, self._resume = self._resume, None
        mid_epoch = resume is not None and 0 < resume["batches"] < len(self)
        if resume is not None:  # mid-epoch: the epoch's iterator is made again; else the next one from now
            set_rng_states(resume["epoch_rng"] if mid_epoch else resume["rng"])
        self._epoch_rng, self._handed_out = collect_rng_states(), 0
        batches = super().__iter__()
        if mid_epoch:
            for _ in range(resume["batches"]):
                next(batches)
            self._handed_out = resume["batches"]
            set_rng_states(resume["rng"])
        return self._counted(batches)

    def _counted(self, batches):
        for batch in batches:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch's iteration stands, and the random states now."""
        return {"epoch_rng": self._epoch_rng, "batches": self._handed_out, "rng": collect_rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next iteration."""
        self._resume = state

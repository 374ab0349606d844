"""Profiles: named readings of a generative method's options.

Every option's default is the method's ``reference`` profile: what its public code ran to produce the published
numbers. Another profile (:data:`PROFILES`) is a named set of option values (a paper reading, the suite's earlier
choices); :func:`apply_profile` sets them on the options a user left at their reference default, and
:func:`profile_label` names the profile a set of options matches (``custom`` when none), which ``generate`` records
in every set's provenance.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

REFERENCE = "reference"
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "d3hr": {
        # the paper: restart aligned at t = 600, m = 1e6 candidates, per-dimension skewness (1, 1, 0.5), each class
        # its own candidates, DDIM's own last steps
        "paper": {"restart_offset": 0, "candidates": 1_000_000, "block_size": 1024, "blocks_per_batch": 8,
                  "score_variant": "paper", "seeding": "hashed", "final_steps": "scheduler"},
    },
    "d4m": {
        # the suite's earlier reading: bicubic squash, every leftover chunk fitted, file order, first lemma only
        "suite": {"resize_filter": "bicubic", "leftover": "all", "order": "files", "prompt_template": "{name}"},
    },
}
# How much work, not how it is done: a profile sets them, but they do not decide which profile a run matches (a toy
# run with fewer candidates is still the reference's procedure; the provenance records the values).
SCALE_FIELDS = frozenset({"candidates", "block_size", "blocks_per_batch"})


def profile_names(method: str) -> tuple[str, ...]:
    """The profiles of ``method``: ``reference`` first."""
    return (REFERENCE, *PROFILES.get(method, {}))


def apply_profile(method: str, profile: str, options):
    """``options`` (a dataclass of the method's options) with ``profile``'s values on every field still at its
    reference default; a field the user set keeps its value."""
    if profile not in profile_names(method):
        raise ValueError(f"profile {profile!r} is not one of {method}'s: {', '.join(profile_names(method))}")
    defaults = {f.name: f.default for f in fields(options)}
    values = PROFILES.get(method, {}).get(profile, {})
    return replace(options, **{name: value for name, value in values.items()
                               if getattr(options, name) == defaults[name]})


def profile_label(method: str, options) -> str:
    """The profile whose procedure ``options`` follow (``reference``: every profiled field but the
    :data:`SCALE_FIELDS` at its default), or ``custom``."""
    defaults = {f.name: f.default for f in fields(options)}
    profiled = {name for values in PROFILES.get(method, {}).values() for name in values} - SCALE_FIELDS
    if all(getattr(options, name) == defaults[name] for name in profiled):
        return REFERENCE
    for name, values in PROFILES.get(method, {}).items():
        if all(getattr(options, field) == values.get(field, defaults[field]) for field in profiled):
            return name
    return "custom"

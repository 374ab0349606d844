"""Judging synthetic sets beyond one top-1: DD-Ranking's label- and augmentation-robust scores."""

"""`vlatune data check`: every problem of a dataset, one line each, with file, episode and key.

The checks are those of the shared validation pass (`vlatune.data.validate`, also run by
`data convert` and `train` before any work), here with every frame of every camera decoded:
missing keys, length mismatches between actions / states / images / extras, NaN or inf,
dtypes, channel counts, shapes that differ between episodes, data present but not declared
(it would be dropped), actions outside the declared range, empty episodes, unreadable frames,
missing instructions.

    >>> problems = check_dataset(open_dataset("data/x"))
    >>> for p in problems: print(p)
"""

from __future__ import annotations

from collections.abc import Callable

from vlatune.data.episode import DatasetReader
from vlatune.data.validate import Problem, validate_dataset

__all__ = ["Problem", "check_dataset", "check_episode"]


def check_episode(reader: DatasetReader, i: int) -> list[Problem]:
    """The problems of episode `i` alone (no cross-episode shape comparison)."""
    return validate_dataset(reader, episodes=[i], images="all").problems


def check_dataset(
    reader: DatasetReader, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    return validate_dataset(reader, images="all", progress=progress).problems

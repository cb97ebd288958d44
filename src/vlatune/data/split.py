"""Deterministic train/test split by episode, stratified by task (instruction).

Each task's episodes are shuffled with a generator seeded by (seed, task) and the first
round(fraction * n) go to test; a task with 2 or more episodes gives at least one to test when
the fraction is above 0, so every task is evaluated.

    >>> split = split_episodes(reader, test_fraction=0.05, seed=0)
    >>> split["train"][:3], split["test"][:3]
    >>> held_out_warning(split, "--test-fraction 0")   # a sentence when a small set loses a lot

On a small dataset the one-per-task minimum can hold out far more than the fraction asks
(4 episodes of 2 tasks at 0.05: 2 of 4); `held_out_warning` says so, and `data split` and
training print it with the flag that changes it.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from vlatune.data.episode import DatasetReader


def split_episodes(reader: DatasetReader, test_fraction: float, seed: int = 0) -> dict[str, Any]:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    by_task: dict[str, list[int]] = {}
    for i in range(len(reader)):
        by_task.setdefault(reader.instruction(i), []).append(i)
    train: list[int] = []
    test: list[int] = []
    per_task = {}
    for task in sorted(by_task):
        eps = by_task[task]
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        order = [eps[j] for j in rng.permutation(len(eps))]
        n_test = int(np.floor(test_fraction * len(eps) + 0.5))
        if test_fraction > 0 and n_test == 0 and len(eps) >= 2:
            n_test = 1
        test += order[:n_test]
        train += order[n_test:]
        per_task[task] = {"train": len(eps) - n_test, "test": n_test}
    return {
        "seed": seed,
        "test_fraction": test_fraction,
        "train": sorted(train),
        "test": sorted(test),
        "tasks": per_task,
    }


def held_out_warning(split: dict[str, Any], flag: str) -> str | None:
    """A warning when the held-out share is much larger than asked (small datasets), else None.

    `flag` is the setting that keeps every episode (`--test-fraction 0`, `data.val_fraction=0`).
    """
    n_test = len(split["test"])
    n = n_test + len(split["train"])
    asked = float(split["test_fraction"])
    if n == 0 or n_test == 0:
        return None
    share = n_test / n
    if share < max(2.0 * asked, 0.10):
        return None
    tasks = len(split.get("tasks", {})) or 1
    return (
        f"holding out {n_test} of {n} episodes ({100 * share:.0f}%) for testing although the "
        f"fraction asked is {asked:g}: every task with 2 or more episodes gives at least one "
        f"({tasks} task{'s' if tasks != 1 else ''}). Use {flag} to keep them all for training, "
        f"or record more episodes."
    )

"""Deterministic train/test split by episode, stratified by task (instruction).

Each task's episodes are shuffled with a generator seeded by (seed, task) and the first
round(fraction * n) go to test; a task with 2 or more episodes gives at least one to test when
the fraction is above 0, so every task is evaluated.

    >>> split = split_episodes(reader, test_fraction=0.05, seed=0)
    >>> split["train"][:3], split["test"][:3]
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

"""`vlatune data check`: every problem of a dataset, one line each, with file, episode and key.

Checks: missing keys, length mismatches between actions / states / images / extras, NaN or inf,
actions outside the declared range, empty episodes, unreadable frames, missing instructions.

    >>> problems = check_dataset(open_dataset("data/x"))
    >>> for p in problems: print(p)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlatune.data.episode import DataError, DatasetReader


@dataclass(frozen=True)
class Problem:
    file: str
    episode: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: episode {self.episode}: key '{self.key}': {self.message}"


def _finite(arr: np.ndarray) -> np.ndarray:
    return np.isfinite(arr) if np.issubdtype(arr.dtype, np.floating) else np.ones(arr.shape, bool)


def check_episode(reader: DatasetReader, i: int) -> list[Problem]:
    src = reader.episode_source(i)
    out: list[Problem] = []

    def add(key: str, msg: str) -> None:
        out.append(Problem(src, i, key, msg))

    try:
        ep = reader.load_episode(i, cameras=[])
    except (DataError, KeyError, OSError, ValueError) as e:
        add(getattr(e, "key", None) or "episode", f"unreadable: {getattr(e, 'detail', e)}")
        return out
    T = ep.length
    if T == 0:
        add("action", "empty episode (0 frames)")
        return out
    if not ep.instruction.strip():
        add("instruction", "missing language instruction")
    bad = ~_finite(ep.actions)
    if bad.any():
        add(
            "action",
            f"{int(bad.any(axis=tuple(range(1, bad.ndim))).sum())} frame(s) with NaN or inf",
        )
    rng = reader.info.action_range
    if rng is not None:
        finite = (
            ep.actions[np.isfinite(ep.actions).all(axis=-1)]
            if np.issubdtype(ep.actions.dtype, np.floating)
            else ep.actions
        )
        if finite.size and (finite.min() < rng[0] - 1e-6 or finite.max() > rng[1] + 1e-6):
            add(
                "action",
                f"values in [{finite.min():.4g}, {finite.max():.4g}], outside the declared range [{rng[0]:g}, {rng[1]:g}]",
            )
    if ep.states is not None:
        if len(ep.states) != T:
            add("state", f"{len(ep.states)} frames but {T} actions")
        if (~_finite(ep.states)).any():
            add("state", "NaN or inf values")
    for name, arr in ep.extras.items():
        if len(arr) != T:
            add(name, f"{len(arr)} frames but {T} actions")
    for cam in reader.info.cameras:
        try:
            frames = reader.load_episode(i, cameras=[cam]).images[cam]
        except (DataError, KeyError, OSError, ValueError) as e:
            add(
                getattr(e, "key", None) or f"image.{cam}",
                f"unreadable frames: {getattr(e, 'detail', e)}",
            )
            continue
        if len(frames) != T:
            add(f"image.{cam}", f"{len(frames)} frames but {T} actions")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            add(
                f"image.{cam}",
                f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}",
            )
    return out


def check_dataset(
    reader: DatasetReader, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    problems: list[Problem] = []
    if len(reader) == 0:
        problems.append(
            Problem(str(reader.info.path), -1, "episodes", "the dataset has no episodes")
        )
    for i in range(len(reader)):
        problems += check_episode(reader, i)
        if progress is not None:
            progress(i)
    return problems

"""Per-feature statistics in one streaming pass: mean, std, min, max, q01, q99.

mean/std/min/max are exact (Chan et al.'s parallel update in float64). Quantiles are exact while
a feature has at most `max_rows` rows (2 million frames by default: all of LIBERO's 273k), and
from a uniform reservoir sample of that many rows beyond, whose rank error is far below 0.5%.
Image statistics are per channel in [0, 1], from every pixel of a subsample of frames (at most
`image_frames_per_episode` per episode, evenly spaced), as LeRobot computes them.

    >>> acc = StatsAccumulator(); acc.update("action", actions); acc.result()["action"]["q99"]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlatune.data.episode import DatasetReader

QUANTILES = {"q01": 0.01, "q99": 0.99}


class RunningStats:
    def __init__(self, max_rows: int = 2_000_000, seed: int = 0, quantiles: bool = True):
        self.max_rows = max_rows
        self.quantiles = quantiles
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self._kept: list[np.ndarray] = []
        self._reservoir: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
        n = x.shape[0]
        if n == 0:
            return
        bmean = x.mean(axis=0)
        bm2 = ((x - bmean) ** 2).sum(axis=0)
        if self.mean is None:
            self.mean, self.m2 = bmean, bm2
            self.min, self.max = x.min(axis=0), x.max(axis=0)
        else:
            total = self.count + n
            delta = bmean - self.mean
            self.mean = self.mean + delta * n / total
            self.m2 = self.m2 + bm2 + delta**2 * self.count * n / total
            self.min = np.minimum(self.min, x.min(axis=0))
            self.max = np.maximum(self.max, x.max(axis=0))
        if self.quantiles:
            self._keep(x)
        self.count += n

    def _keep(self, x: np.ndarray) -> None:
        if self._reservoir is None:
            kept = sum(len(k) for k in self._kept)
            room = self.max_rows - kept
            if len(x) <= room:
                self._kept.append(x.copy())
                return
            self._kept.append(x[:room].copy())
            self._reservoir = np.concatenate(self._kept)
            self._kept = []
            seen = self.count + room
            x = x[room:]
        else:
            seen = self.count
        # Algorithm R, vectorised: row j (0-based overall index seen + j) replaces a random slot
        idx = seen + np.arange(len(x))
        slots = (self.rng.random(len(x)) * (idx + 1)).astype(np.int64)
        take = slots < self.max_rows
        self._reservoir[slots[take]] = x[take]

    def result(self) -> dict[str, Any]:
        if self.count == 0:
            raise ValueError("no values")
        out = {
            "mean": self.mean,
            "std": np.sqrt(self.m2 / self.count),
            "min": self.min,
            "max": self.max,
            "count": np.array([self.count]),
        }
        if self.quantiles:
            values = self._reservoir if self._reservoir is not None else np.concatenate(self._kept)
            for name, q in QUANTILES.items():
                out[name] = np.quantile(values, q, axis=0)
        return out


class StatsAccumulator:
    """RunningStats per named feature."""

    def __init__(self, max_rows: int = 2_000_000):
        self.max_rows = max_rows
        self.stats: dict[str, RunningStats] = {}

    def update(self, name: str, values: np.ndarray, quantiles: bool = True) -> None:
        if name not in self.stats:
            self.stats[name] = RunningStats(self.max_rows, quantiles=quantiles)
        self.stats[name].update(values)

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        return {k: v.result() for k, v in self.stats.items()}


def sample_frame_indices(length: int, max_frames: int) -> np.ndarray:
    if length <= max_frames:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, max_frames).round().astype(np.int64))


def image_channel_values(frames: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n*H*W, 3) float in [0, 1] for per-channel statistics."""
    return frames.reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0


def episode_stats(
    ep_arrays: dict[str, np.ndarray], image_frames: int = 100
) -> dict[str, dict[str, np.ndarray]]:
    """Statistics of one episode's per-frame arrays (images per channel, in [0, 1])."""
    out = {}
    for name, arr in ep_arrays.items():
        if arr.dtype == np.uint8 and arr.ndim == 4:
            rs = RunningStats(quantiles=False)
            rs.update(image_channel_values(arr[sample_frame_indices(len(arr), image_frames)]))
        else:
            rs = RunningStats()
            rs.update(arr)
        out[name] = rs.result()
    return out


def dataset_stats(
    reader: DatasetReader,
    images: bool = False,
    image_frames_per_episode: int = 20,
    progress=None,
    episodes=None,
) -> dict[str, dict[str, Any]]:
    """Statistics of every low-dim feature (and, with `images`, of each camera) of a dataset,
    over all episodes or the given ones (training statistics come from training episodes)."""
    acc = StatsAccumulator()
    cams = reader.info.cameras if images else []
    for i in range(len(reader)) if episodes is None else episodes:
        ep = reader.load_episode(i, cameras=[])
        acc.update("action", ep.actions)
        if ep.states is not None:
            acc.update("state", ep.states)
        for k, v in ep.extras.items():
            if np.issubdtype(v.dtype, np.number):
                acc.update(k, v)
        for cam in cams:
            idx = sample_frame_indices(ep.length, image_frames_per_episode)
            acc.update(
                f"image.{cam}",
                image_channel_values(reader.read_frames(i, cam, idx)),
                quantiles=False,
            )
        if progress is not None:
            progress(i)
    return to_json(acc.result())


def to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}

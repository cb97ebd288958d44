"""One model of robot data: episodes of equal-length per-frame arrays, behind one reader interface.

Every format (LIBERO HDF5, any HDF5 with a key mapping, LeRobot v2.1 and v3.0) is read through a
`DatasetReader`: cheap metadata (`info`, lengths, instructions) without touching frames, then
whole episodes (`load_episode`) or just the frames a training sample needs (`read_frames`).

Arrays keep the dataset's own conventions (image orientation, gripper sign); the dataset
*declares* them in `DatasetInfo` and the training view converts to the env convention once.

    >>> from vlatune.data import open_dataset
    >>> ds = open_dataset("data/libero_object")          # format auto-detected
    >>> ep = ds.load_episode(0)
    >>> ep.actions.shape, ep.images["agentview"].shape   # (T, 7), (T, H, W, 3)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad or unreadable data; the message names the file, the episode and the key."""

    def __init__(
        self,
        message: str,
        file: str | Path | None = None,
        episode: int | str | None = None,
        key: str | None = None,
    ):
        self.file, self.episode, self.key, self.detail = file, episode, key, message
        where = ", ".join(
            p
            for p in (
                str(file) if file is not None else "",
                f"episode {episode}" if episode is not None else "",
                f"key '{key}'" if key is not None else "",
            )
            if p
        )
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Episode:
    """One demonstration. Every per-frame array has the same first dimension T."""

    actions: np.ndarray  # (T, A)
    instruction: str
    states: np.ndarray | None = None  # (T, S) proprio, e.g. LIBERO's 8-d state
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (T, H, W, 3) uint8
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # other per-frame arrays (T, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able, e.g. task name, init state

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    def per_frame(self) -> dict[str, np.ndarray]:
        """Every per-frame array by name ("action", "state", "image.<cam>", "<extra>")."""
        out: dict[str, np.ndarray] = {"action": self.actions}
        if self.states is not None:
            out["state"] = self.states
        out.update({f"image.{c}": v for c, v in self.images.items()})
        out.update(self.extras)
        return out


@dataclass(frozen=True)
class FeatureSpec:
    shape: tuple[int, ...]  # per frame
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass
class DatasetInfo:
    """What a dataset holds and which conventions it declares; read from metadata only."""

    format: str
    path: Path
    fps: float
    num_episodes: int
    num_frames: int
    cameras: list[str]
    features: dict[str, FeatureSpec]
    image_orientation: str  # "raw" (LIBERO renders, rotated 180 degrees) or "upright"
    gripper: str  # "-1_open", "1_open", "0_1_open"
    orientation_source: str = "declared"  # "declared" in the files, or "assumed" (format default)
    action_range: tuple[float, float] | None = (-1.0, 1.0)

    def to_json(self, tasks: dict[str, int]) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "episodes": self.num_episodes,
            "frames": self.num_frames,
            "fps": self.fps,
            "tasks": [{"instruction": k, "episodes": v} for k, v in tasks.items()],
            "cameras": self.cameras,
            "features": {k: v.to_json() for k, v in self.features.items()},
            "image_orientation": self.image_orientation,
            "image_orientation_source": self.orientation_source,
            "gripper": self.gripper,
            "action_range": list(self.action_range) if self.action_range else None,
        }


class DatasetReader(ABC):
    """Random access to the episodes of one dataset, whatever its format."""

    format: str = ""

    @property
    @abstractmethod
    def info(self) -> DatasetInfo: ...

    def __len__(self) -> int:
        return self.info.num_episodes

    @abstractmethod
    def episode_length(self, i: int) -> int: ...

    @abstractmethod
    def instruction(self, i: int) -> str: ...

    @abstractmethod
    def load_episode(self, i: int, cameras: Sequence[str] | None = None) -> Episode:
        """Episode `i` with the given cameras (None: all; []: no images, fast)."""

    def read_frames(self, i: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        """(n, H, W, 3) uint8 frames of one camera; formats override this with cheaper access."""
        return self.load_episode(i, cameras=[camera]).images[camera][np.asarray(frames)]

    def episode_source(self, i: int) -> str:
        """The file that holds episode `i` (for error messages)."""
        return str(self.info.path)

    def tasks(self) -> dict[str, int]:
        """instruction -> number of episodes."""
        counts: dict[str, int] = {}
        for i in range(len(self)):
            text = self.instruction(i)
            counts[text] = counts.get(text, 0) + 1
        return counts

    def close(self) -> None:  # noqa: B027  (optional hook)
        pass

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The one validation pass that `vlatune data check`, `data convert` and `train` run before any work.

Each problem is one line naming the file, the episode, the key and the expectation
(`<file>: episode <i>: key '<key>': <what is wrong; what was expected>`). What is checked, per
episode, vectorised with numpy:

- readable: the episode loads (actions, state, extras) and each camera's frames decode;
- finite numbers: no NaN or inf in actions, states or floating-point extras;
- dtypes and shapes: actions (T, A) numeric; frames (T, H, W, 3) uint8 (float frames only when
  their value range is declared, and then converted by the reader); 3 channels per camera;
- consistency across episodes: each key has the same per-frame shape in every episode (the
  most common shape is taken as the expectation), no camera or column present in the data but
  missing from the dataset's declared features (it would be silently dropped);
- length agreement: states, extras and every camera have as many frames as actions;
- required features: what the dataset declares (state, extras, cameras) is present in every
  episode; the dataset has episodes; no episode is empty.

Problems either block (`train` and `convert` refuse to start, or skip those episodes when asked
to) or only warn (actions outside the declared action range, a missing instruction): `data
check` prints both and exits 1 on any.

Cost: `images="sample"` (train, convert) reads each episode's low-dimensional arrays and the
first and last frame of each camera (plus the stored frame count where the format keeps one);
`images="all"` (`data check`) decodes every frame.

    >>> report = validate_dataset(open_dataset("data/x"), images="sample")
    >>> report.raise_if_blocking("train")        # DataError listing every problem, one per line
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from vlatune.data.episode import DataError, DatasetInfo, DatasetReader, Episode

ImageMode = Literal["none", "sample", "all"]
READ_ERRORS = (DataError, KeyError, OSError, ValueError, IndexError, RuntimeError, TypeError)


@dataclass(frozen=True)
class Problem:
    file: str
    episode: int  # reader index; -1: the dataset as a whole
    key: str
    message: str
    blocking: bool = True

    def __str__(self) -> str:
        where = f"episode {self.episode}: " if self.episode >= 0 else ""
        return f"{self.file}: {where}key '{self.key}': {self.message}"


@dataclass
class ValidationReport:
    problems: list[Problem] = field(default_factory=list)
    episodes_checked: int = 0

    @property
    def blocking(self) -> list[Problem]:
        return [p for p in self.problems if p.blocking]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.blocking]

    @property
    def bad_episodes(self) -> list[int]:
        """Episodes with a blocking problem (the ones `--skip-bad-episodes` leaves out)."""
        return sorted({p.episode for p in self.blocking if p.episode >= 0})

    @property
    def dataset_level(self) -> list[Problem]:
        """Blocking problems of the dataset as a whole: skipping episodes cannot fix them."""
        return [p for p in self.blocking if p.episode < 0]

    def lines(self, problems: Iterable[Problem] | None = None, limit: int = 30) -> str:
        items = list(self.problems if problems is None else problems)
        text = [str(p) for p in items[:limit]]
        if len(items) > limit:
            text.append(f"... and {len(items) - limit} more (vlatune data check lists them all)")
        return "\n".join(text)

    def raise_if_blocking(self, what: str, skip_hint: str) -> None:
        """DataError listing every blocking problem, when there is one."""
        bad = self.blocking
        if not bad:
            return
        eps = self.bad_episodes
        hint = (
            f"; fix the data, or {skip_hint} to leave out the {len(eps)} bad episode(s) "
            f"{_short_list(eps)}"
            if eps and not self.dataset_level
            else "; fix the data"
        )
        raise DataError(
            f"{what} refused: {len(bad)} problem(s) in the data (nothing was written){hint}:\n"
            + self.lines(bad)
        )


def _short_list(items: Sequence[int], n: int = 10) -> str:
    head = ", ".join(map(str, items[:n]))
    return f"[{head}{', ...' if len(items) > n else ''}]"


def _is_float(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)


def _nonfinite(arr: np.ndarray) -> str | None:
    """'N frame(s) with NaN or inf (first: frame t, index j)', or None when all finite."""
    if not _is_float(arr) or arr.size == 0:
        return None
    bad = ~np.isfinite(arr)
    per_frame = bad.reshape(len(arr), -1).any(axis=1) if arr.ndim > 1 else bad
    frames = np.flatnonzero(per_frame)
    if not len(frames):
        return None
    t = int(frames[0])
    where = f"frame {t}"
    if arr.ndim > 1:
        j = np.argwhere(bad[t])[0]
        where += f", index {tuple(int(x) for x in j) if len(j) > 1 else int(j[0])}"
        where += f": {arr[t][tuple(j)]}"
    return f"{len(frames)} frame(s) with NaN or inf (first: {where}); expected finite numbers"


class _Checker:
    def __init__(self, reader: DatasetReader, images: ImageMode):
        self.reader = reader
        self.info: DatasetInfo = reader.info
        self.images = images
        self.problems: list[Problem] = []
        # key -> {episode: per-frame shape}, for the cross-episode consistency check
        self.shapes: dict[str, dict[int, tuple[int, ...]]] = {}
        self.sources: dict[int, str] = {}

    def add(self, i: int, key: str, msg: str, blocking: bool = True) -> None:
        self.problems.append(
            Problem(self.sources.get(i, str(self.info.path)), i, key, msg, blocking)
        )

    def shape(self, key: str, i: int, shape: tuple[int, ...]) -> None:
        self.shapes.setdefault(key, {})[i] = tuple(int(s) for s in shape)

    def episode(self, i: int) -> None:
        reader = self.reader
        try:
            self.sources[i] = reader.episode_source(i)
        except READ_ERRORS:
            self.sources[i] = str(self.info.path)
        try:
            ep = reader.load_episode(i, cameras=[])
        except READ_ERRORS as e:
            key = getattr(e, "key", None) or "episode"
            self.add(i, key, f"unreadable: {getattr(e, 'detail', e)}")
            return
        for key, msg in getattr(reader, "undeclared", lambda i: [])(i):
            self.add(i, key, msg)
        T = ep.length
        try:
            declared = int(reader.episode_length(i))
        except READ_ERRORS:
            declared = T
        if declared != T:
            self.add(
                i,
                "length",
                f"the metadata says {declared} frames but the data has {T} actions; "
                "expected the same (training indexes frames by the metadata)",
            )
        if T == 0:
            self.add(i, "action", "empty episode (0 frames); expected at least 1")
            return
        if not ep.instruction.strip():
            self.add(i, "instruction", "missing language instruction", blocking=False)
        self.lowdim(i, ep, T)
        if self.images != "none":
            for cam in self.info.cameras:
                self.camera(i, cam, T)

    def lowdim(self, i: int, ep: Episode, T: int) -> None:
        a = np.asarray(ep.actions)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            self.add(i, "action", f"expected a (T, A) numeric array, got {a.shape} {a.dtype}")
        else:
            self.shape("action", i, a.shape[1:])
        msg = _nonfinite(a)
        if msg:
            self.add(i, "action", msg)
        rng = self.info.action_range
        if rng is not None and a.size and np.issubdtype(a.dtype, np.number):
            fin = a[np.isfinite(a)] if _is_float(a) else a
            if fin.size and (fin.min() < rng[0] - 1e-6 or fin.max() > rng[1] + 1e-6):
                self.add(
                    i,
                    "action",
                    f"values in [{fin.min():.4g}, {fin.max():.4g}], outside the declared range "
                    f"[{rng[0]:g}, {rng[1]:g}]",
                    blocking=False,
                )
        if ep.states is None:
            if "state" in self.info.features:
                self.add(i, "state", "missing in this episode; the dataset declares a state")
        else:
            s = np.asarray(ep.states)
            if len(s) != T:
                self.add(i, "state", f"{len(s)} frames but {T} actions; expected {T}")
            self.shape("state", i, s.shape[1:])
            msg = _nonfinite(s)
            if msg:
                self.add(i, "state", msg)
        declared_extras = {
            k
            for k in self.info.features
            if k not in ("action", "state") and not k.startswith("image.")
        }
        for name in sorted(declared_extras - set(ep.extras)):
            self.add(i, name, "missing in this episode; the dataset declares it")
        for name, arr in ep.extras.items():
            arr = np.asarray(arr)
            if arr.ndim == 0 or len(arr) != T:
                self.add(
                    i,
                    name,
                    f"{arr.shape[0] if arr.ndim else 0} frames but {T} actions; expected {T}",
                )
                continue
            self.shape(name, i, arr.shape[1:])
            msg = _nonfinite(arr)
            if msg:
                self.add(i, name, msg)

    def camera(self, i: int, cam: str, T: int) -> None:
        key = f"image.{cam}"
        try:
            if self.images == "all":
                frames = self.reader.load_episode(i, cameras=[cam]).images[cam]
                count: int | None = len(frames)
            else:
                count = getattr(self.reader, "frame_count", lambda i, c: None)(i, cam)
                frames = self.reader.read_frames(i, cam, sorted({0, T - 1}))
        except READ_ERRORS as e:
            self.add(
                i, getattr(e, "key", None) or key, f"unreadable frames: {getattr(e, 'detail', e)}"
            )
            return
        frames = np.asarray(frames)
        if count is not None and count != T:
            self.add(i, key, f"{count} frames but {T} actions; expected {T}")
        if frames.ndim != 4:
            self.add(i, key, f"expected (T, H, W, 3) frames, got shape {frames.shape}")
            return
        if frames.shape[-1] != 3:
            self.add(
                i,
                key,
                f"{frames.shape[-1]} channels; expected 3 (RGB) like the other cameras "
                "(convert the frames to RGB)",
            )
        if frames.dtype != np.uint8:
            self.add(i, key, f"{frames.dtype} frames; expected uint8 (0-255)")
        self.shape(key, i, frames.shape[1:])

    def consistency(self) -> None:
        for key, per_ep in self.shapes.items():
            counts = Counter(per_ep.values())
            if len(counts) < 2:
                continue
            declared = self.info.features.get(key)
            top = counts.most_common()
            expected = top[0][0]
            if len(top) > 1 and top[0][1] == top[1][1] and declared is not None:
                expected = tuple(declared.shape) if tuple(declared.shape) in counts else expected
            n_expected = counts[expected]
            for i, shape in sorted(per_ep.items()):
                if shape != expected:
                    self.add(
                        i,
                        key,
                        f"per-frame shape {shape}, but {n_expected} other episode(s) have "
                        f"{expected}; every episode needs the same shape",
                    )


def validate_dataset(
    reader: DatasetReader,
    episodes: Sequence[int] | None = None,
    images: ImageMode = "sample",
    progress: Callable[[int], None] | None = None,
) -> ValidationReport:
    """Every problem of `episodes` (default: all) of `reader`, dataset-level ones included."""
    c = _Checker(reader, images)
    if len(reader) == 0:
        c.add(-1, "episodes", "the dataset has no episodes")
    for file, key, msg in getattr(reader, "dataset_problems", lambda: [])():
        c.problems.append(Problem(str(file), -1, key, msg))
    eps = list(range(len(reader))) if episodes is None else [int(e) for e in episodes]
    for n, i in enumerate(eps):
        c.episode(i)
        if progress is not None:
            progress(n)
    c.consistency()
    c.problems.sort(key=lambda p: (p.episode, p.key))
    return ValidationReport(c.problems, len(eps))


class SubsetReader(DatasetReader):
    """A reader that shows only some episodes of another one (renumbered 0..n-1)."""

    def __init__(self, reader: DatasetReader, episodes: Sequence[int]):
        import dataclasses

        self.base = reader
        self.format = reader.format
        self.episodes = [int(e) for e in episodes]
        info = reader.info
        self._info = dataclasses.replace(
            info,
            num_episodes=len(self.episodes),
            num_frames=int(sum(reader.episode_length(e) for e in self.episodes)),
        )

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def episode_length(self, i: int) -> int:
        return self.base.episode_length(self.episodes[i])

    def instruction(self, i: int) -> str:
        return self.base.instruction(self.episodes[i])

    def load_episode(self, i: int, cameras: Sequence[str] | None = None) -> Episode:
        return self.base.load_episode(self.episodes[i], cameras)

    def read_frames(self, i: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        return self.base.read_frames(self.episodes[i], camera, frames)

    def episode_source(self, i: int) -> str:
        return self.base.episode_source(self.episodes[i])

    def close(self) -> None:
        self.base.close()


def describe(report: ValidationReport) -> dict[str, Any]:
    """A JSON-able summary (problems as lines)."""
    return {
        "episodes_checked": report.episodes_checked,
        "problems": [str(p) for p in report.blocking],
        "warnings": [str(p) for p in report.warnings],
        "bad_episodes": report.bad_episodes,
    }

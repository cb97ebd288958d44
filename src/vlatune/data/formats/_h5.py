"""Shared by the two HDF5 readers: files opened once per reader and closed together, and
image frames brought to uint8 (float or 16-bit frames only with a declared value range).

    >>> files = H5Files(); f = files.open(Path("episode_0.hdf5")); files.close()
    >>> frames_to_uint8(np.ones((2, 4, 4, 3), np.float32), (0.0, 1.0), where)   # -> 255s
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from vlatune.data.episode import DataError


class H5Files:
    def __init__(self) -> None:
        self._files: dict[Path, h5py.File] = {}

    def open(self, fp: Path) -> h5py.File:
        f = self._files.get(fp)
        if f is None:
            try:
                f = self._files[fp] = h5py.File(fp, "r")
            except OSError as e:
                raise DataError(
                    f"cannot open as HDF5: the file is truncated, corrupt or not HDF5 ({e})",
                    file=fp,
                ) from None
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def frames_to_uint8(
    frames: np.ndarray,
    value_range: Sequence[float] | None,
    where: dict,
    how_to_declare: str,
) -> np.ndarray:
    """uint8 frames as stored, or converted from a declared value range [lo, hi] -> [0, 255].

    Undeclared float / 16-bit frames are refused (reading [0, 1] floats as 0-255 would give
    black images); values outside the declared range are refused too. `where` holds the
    DataError's file / episode / key.
    """
    if frames.dtype == np.uint8:
        return frames
    if not (np.issubdtype(frames.dtype, np.floating) or np.issubdtype(frames.dtype, np.integer)):
        raise DataError(f"{frames.dtype} frames; expected uint8 images", **where)
    if value_range is None:
        raise DataError(
            f"{frames.dtype} frames with no declared value range; expected uint8, or declare "
            f"the range ({how_to_declare}: [0, 1] or [0, 255])",
            **where,
        )
    lo, hi = float(value_range[0]), float(value_range[1])
    if frames.size:
        fmin, fmax = float(np.min(frames)), float(np.max(frames))
        if not (np.isfinite(fmin) and np.isfinite(fmax)):
            raise DataError("frames with NaN or inf values; expected finite values", **where)
        tol = 1e-6 * max(1.0, abs(hi - lo))
        if fmin < lo - tol or fmax > hi + tol:
            raise DataError(
                f"frame values in [{fmin:.4g}, {fmax:.4g}], outside the declared range "
                f"[{lo:g}, {hi:g}]",
                **where,
            )
    scaled = (frames.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

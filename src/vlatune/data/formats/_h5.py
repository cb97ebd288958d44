"""Open HDF5 files once per reader and close them together (shared by the two HDF5 readers)."""

from __future__ import annotations

from pathlib import Path

import h5py

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
                raise DataError(f"cannot open as HDF5 ({e})", file=fp) from None
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

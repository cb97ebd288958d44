"""Open any dataset vlatune reads, with its format detected from the path.

>>> from vlatune.data import open_dataset
>>> ds = open_dataset("datasets/libero_object")              # libero_hdf5
>>> ds = open_dataset("datasets/mine", mapping="mine.yaml")   # any HDF5 layout
"""

from __future__ import annotations

from pathlib import Path

from vlatune.data.episode import DataError, DatasetReader

FORMATS = ("libero_hdf5", "hdf5", "lerobot_v21", "lerobot_v30", "rlds")


def detect_format(path: str | Path) -> str:
    from vlatune.data.formats.lerobot import detect_version
    from vlatune.data.formats.libero_hdf5 import is_libero_hdf5

    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", file=path)
    if path.is_dir():
        version = detect_version(path)
        if version is not None:
            return "lerobot_v21" if version == "v2.1" else "lerobot_v30"
        if (path / "meta").is_dir():
            raise DataError(
                "looks like a LeRobot dataset but meta/info.json is missing or has no codebase_version",
                file=path,
            )
    from vlatune.data.formats.rlds import is_rlds

    if is_rlds(path):
        return "rlds"
    _refuse_unreadable_hdf5(path)
    if is_libero_hdf5(path):
        return "libero_hdf5"
    if (
        path.is_file()
        and path.suffix in (".hdf5", ".h5")
        or path.is_dir()
        and any(path.glob("*.h*5"))
    ):
        return "hdf5"
    raise DataError(f"cannot tell the format; pass --format ({', '.join(FORMATS)})", file=path)


def _refuse_unreadable_hdf5(path: Path) -> None:
    """A truncated or non-HDF5 `.hdf5` / `.h5` file is a corrupt file, not a layout that needs
    a key mapping: say so, naming the file (each file's superblock is opened; no data read)."""
    import h5py

    if path.is_file():
        files = [path] if path.suffix in (".hdf5", ".h5") else []
    else:
        files = sorted(p for p in path.glob("*.h*5") if p.suffix in (".hdf5", ".h5"))
    for fp in files:
        try:
            with h5py.File(fp, "r"):
                pass
        except OSError as e:
            raise DataError(
                f"unreadable HDF5 file: truncated, corrupt or not HDF5 ({e}); replace it",
                file=fp,
            ) from None


def open_dataset(
    path: str | Path, format: str = "auto", mapping: str | Path | None = None, **options
) -> DatasetReader:
    """A reader for `path`; `format` one of auto, libero_hdf5, hdf5, lerobot_v21, lerobot_v30."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "libero_hdf5":
        from vlatune.data.formats.libero_hdf5 import LiberoHDF5Reader

        return LiberoHDF5Reader(path, **options)
    if fmt == "hdf5":
        from vlatune.data.formats.hdf5 import HDF5Reader

        return HDF5Reader(path, mapping=mapping)
    if fmt in ("lerobot_v21", "lerobot_v30"):
        from vlatune.data.formats.lerobot import LeRobotReader

        reader = LeRobotReader(path)
        if reader.format != fmt:
            raise DataError(f"asked for {fmt} but the dataset is {reader.format}", file=path)
        return reader
    if fmt == "rlds":
        from vlatune.data.formats.rlds import RLDSReader

        return RLDSReader(path, mapping=mapping)
    raise DataError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}", file=path)

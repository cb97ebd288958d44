"""`vlatune data convert`: any format to LeRobot v2.1 / v3.0 or LIBERO-style HDF5, atomically.

Everything is written to a temporary folder next to DST and renamed at the end, so a failed
conversion leaves nothing half-written; an existing DST is never touched.

    >>> report = convert("data/libero_object", "data/libero_object_lerobot", to="lerobot")
    >>> report["psnr_db"]     # per camera, video codec loss (inf for lossless HDF5)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlatune.conventions import to_upright
from vlatune.data.episode import DataError, DatasetReader

TARGETS = {
    "lerobot": "lerobot_v21",
    "lerobot-v21": "lerobot_v21",
    "lerobot-v3": "lerobot_v30",
    "lerobot-v30": "lerobot_v30",
    "hdf5": "libero_hdf5",
}


def write_libero_hdf5(
    reader: DatasetReader,
    out: Path,
    image_orientation: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    from vlatune.data.formats.libero_hdf5 import LiberoHDF5Writer

    src = reader.info.image_orientation
    orient = image_orientation or src
    writer = LiberoHDF5Writer(
        out, image_orientation=orient, fps=reader.info.fps, gripper=reader.info.gripper
    )
    try:
        for i in range(len(reader)):
            ep = reader.load_episode(i)
            if orient != src:
                ep.images = {c: to_upright(v) for c, v in ep.images.items()}
            writer.add(ep)
            if progress is not None:
                progress(i)
    finally:
        counts = writer.close()
    lossless = not reader.info.format.startswith("lerobot")
    return {
        "episodes": sum(counts.values()),
        "frames": reader.info.num_frames,
        "files": len(counts),
        "psnr_db": {c: float("inf") if lossless else None for c in reader.info.cameras},
        "image_orientation": orient,
        "rotated": orient != src,
    }


def convert(
    reader: DatasetReader,
    dst: str | Path,
    to: str,
    codec: str = "h264",
    image_orientation: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}; got '{to}'")
    dst = Path(dst)
    if dst.exists():
        raise DataError(
            "destination already exists; choose a new folder (nothing was written)", file=dst
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if TARGETS[to] == "libero_hdf5":
            report = write_libero_hdf5(reader, tmp, image_orientation, progress)
        else:
            from vlatune.data.formats.lerobot import write_lerobot

            version = "v2.1" if TARGETS[to] == "lerobot_v21" else "v3.0"
            report = write_lerobot(
                reader,
                tmp,
                version=version,
                codec=codec,
                image_orientation=image_orientation,
                progress=progress,
            )
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["format"] = TARGETS[to]
    report["path"] = str(dst)
    return report

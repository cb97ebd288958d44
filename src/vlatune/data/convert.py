"""`vlatune data convert`: any format to LeRobot v2.1 / v3.0 or LIBERO-style HDF5, atomically.

Before any work the source goes through the shared validation pass (`vlatune.data.validate`):
a problem refuses the conversion (one line per problem: file, episode, key, expectation), or,
with `skip_bad_episodes`, leaves those episodes out and reports which. Everything is written to
a temporary folder next to DST (`.vlatune-tmp.<name>.<host>.<pid>`) and renamed at the end, so
a failed conversion (a full disk included) leaves nothing half-written; an existing DST is never
touched; temporaries of killed conversions are removed at the next start.

    >>> report = convert("data/libero_object", "data/libero_object_lerobot", to="lerobot")
    >>> report["psnr_db"]     # per camera, video codec loss (inf for lossless HDF5)
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlatune.conventions import to_upright
from vlatune.data.episode import DataError, DatasetReader
from vlatune.fsutil import clean_stale_temporaries, tmp_path, with_final_name

log = logging.getLogger("vlatune")

TARGETS = {
    "lerobot": "lerobot_v21",
    "lerobot-v21": "lerobot_v21",
    "lerobot-v3": "lerobot_v30",
    "lerobot-v30": "lerobot_v30",
    "hdf5": "libero_hdf5",
    "rlds": "rlds",
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
    except BaseException:
        writer.abort()  # closes the files even on a full disk (no crash at exit)
        raise
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
    skip_bad_episodes: bool = False,
    validate: bool = True,
    check_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Convert every episode of `reader` to `dst` in format `to` (see TARGETS); the report has
    episodes, frames, per-camera PSNR and `skipped_episodes` (with `skip_bad_episodes`)."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}; got '{to}'")
    dst = Path(dst)
    if dst.exists():
        raise DataError(
            "destination already exists; choose a new folder (nothing was written)", file=dst
        )
    skipped: list[int] = []
    warnings: list[str] = []
    if validate:
        from vlatune.data.validate import SubsetReader, validate_dataset

        check = validate_dataset(reader, images="sample", progress=check_progress)
        warnings = [str(p) for p in check.warnings]
        if check.blocking and (not skip_bad_episodes or check.dataset_level):
            check.raise_if_blocking("conversion", "pass --skip-bad-episodes")
        if check.blocking:
            skipped = check.bad_episodes
            log.warning(
                "skipping %d bad episode(s) %s:\n%s",
                len(skipped),
                skipped,
                check.lines(check.blocking),
            )
            keep = [i for i in range(len(reader)) if i not in set(skipped)]
            if not keep:
                raise DataError(
                    "every episode has a problem: nothing to convert", file=reader.info.path
                )
            reader = SubsetReader(reader, keep)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dst.parent)
    tmp = tmp_path(dst)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if TARGETS[to] == "libero_hdf5":
            report = write_libero_hdf5(reader, tmp, image_orientation, progress)
        elif TARGETS[to] == "rlds":
            from vlatune.data.formats.rlds import write_rlds

            report = write_rlds(
                reader, tmp, name=dst.name, image_orientation=image_orientation, progress=progress
            )
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise with_final_name(e, tmp, dst) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["format"] = TARGETS[to]
    report["path"] = str(dst)
    report["skipped_episodes"] = skipped
    report["warnings"] = warnings
    return report

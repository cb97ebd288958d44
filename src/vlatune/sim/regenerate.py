"""`vlatune sim regenerate`: LIBERO demos replayed at a new resolution, no-ops dropped, failures out.

As openvla-oft's `regenerate_libero_dataset.py`: each raw demo is restored to its initial state,
settled, and its actions replayed, except no-ops, which are skipped (not executed). A no-op is an
action with `||a[:6]||_2 < 1e-4` whose gripper equals the previous *kept* action's gripper (the
first action: the norm test alone). Demos whose replay does not succeed are dropped. Output:
LIBERO HDF5 (one file per task, raw orientation like the source), `<suite>_metainfo.json` (per
demo: success, kept and dropped frames, initial state) and `regenerate_summary.json` (per task:
demos kept; a warning when a task keeps none, the known libero_90 trap: openvla#316, LIBERO#120).
Files are processed in parallel and each task file appears only when finished, so an
interrupted run resumes where it stopped.

    >>> keep = noop_keep_mask(actions)          # which transitions a regeneration keeps
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NOOP_THRESHOLD = 1e-4


def noop_keep_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """Boolean mask of the transitions a regeneration keeps (False = no-op, dropped)."""
    actions = np.asarray(actions, dtype=np.float64)
    keep = np.zeros(len(actions), dtype=bool)
    prev = None
    for t, a in enumerate(actions):
        still = np.linalg.norm(a[:6]) < threshold
        noop = still if prev is None else still and a[-1] == prev[-1]
        if not noop:
            keep[t] = True
            prev = a
    return keep


def _task_id(suite: str, task_name: str) -> int:
    from vlatune.sim.setup import import_libero

    import_libero()
    from libero.libero.benchmark.libero_suite_task_map import libero_task_map

    names = libero_task_map[suite]
    if task_name not in names:
        raise ValueError(
            f"task '{task_name}' is not in {suite} (file names must be <task>_demo.hdf5)"
        )
    return names.index(task_name)


def regenerate_file(src_file: str, dst_dir: str, suite: str, resolution: int) -> dict[str, Any]:
    """Regenerate one task file; writes `<dst>/<task>_demo.hdf5` atomically; returns its metainfo."""
    from vlatune.data.formats.libero_hdf5 import (
        LiberoHDF5Reader,
        LiberoHDF5Writer,
        task_name_from_file,
    )
    from vlatune.sim.env import LiberoEnv
    from vlatune.sim.synth import record_replay

    src = Path(src_file)
    task = task_name_from_file(src)
    env = LiberoEnv(suite, _task_id(suite, task), resolution=resolution, render=True)
    reader = LiberoHDF5Reader(src)
    tmp = Path(dst_dir) / f".{task}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    writer = LiberoHDF5Writer(tmp, image_orientation="raw")
    info: dict[str, Any] = {}
    try:
        for i in range(len(reader)):
            ep = reader.load_episode(i, cameras=[])
            name = ep.meta["source"].split(":")[-1]
            init = ep.meta.get("init_state")
            if init is None:
                init = ep.extras["states"][0] if "states" in ep.extras else None
            if init is None:
                info[name] = {
                    "success": False,
                    "error": "no init_state attribute and no states dataset",
                }
                continue
            keep = noop_keep_mask(ep.actions)
            kept = ep.actions[keep]
            success, new = record_replay(env, init, kept, init_is_state=True)
            info[name] = {
                "success": bool(success),
                "kept_frames": int(keep.sum()),
                "dropped_noops": int((~keep).sum()),
                "initial_state": np.asarray(init).tolist(),
            }
            if success:
                new.meta["task_name"] = task
                writer.add(new)
    finally:
        counts = writer.close()
        env.close()
        reader.close()
    out = Path(dst_dir) / f"{task}_demo.hdf5"
    if counts:
        os.replace(tmp / f"{task}_demo.hdf5", out)
    (tmp / "metainfo.json").write_text(json.dumps(info))
    os.replace(tmp / "metainfo.json", Path(dst_dir) / f".{task}.metainfo.json")
    tmp.rmdir() if not any(tmp.iterdir()) else None
    return {"task": task, "demos": info}


def _regenerate_job(job: tuple) -> dict[str, Any]:
    return regenerate_file(*job)


def regenerate(
    src: str | Path,
    dst: str | Path,
    suite: str,
    resolution: int = 256,
    workers: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Regenerate every `<task>_demo.hdf5` of `src` into `dst` (files already done are kept);
    `progress(done, total, task)` after each file."""
    from vlatune.conventions import resolve_suite

    suite = resolve_suite(suite)
    src, dst = Path(src), Path(dst)
    files = sorted(src.glob("*_demo.hdf5")) if src.is_dir() else [src]
    if not files:
        raise ValueError(f"{src}: no <task>_demo.hdf5 files")
    dst.mkdir(parents=True, exist_ok=True)
    from vlatune.data.formats.libero_hdf5 import task_name_from_file

    todo = [
        f for f in files if not (dst / f".{task_name_from_file(f)}.metainfo.json").is_file()
    ]  # resume
    jobs = [(str(f), str(dst), suite, resolution) for f in todo]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("forkserver").Pool(min(workers, len(jobs))) as pool:
            for i, r in enumerate(pool.imap_unordered(_regenerate_job, jobs)):
                if progress:
                    progress(i + 1, len(jobs), r["task"])
    else:
        for i, job in enumerate(jobs):
            r = regenerate_file(*job)
            if progress:
                progress(i + 1, len(jobs), r["task"])
    metainfo, summary = {}, {}
    for f in files:
        task = task_name_from_file(f)
        demos = json.loads((dst / f".{task}.metainfo.json").read_text())
        metainfo[task] = demos
        kept = sum(1 for d in demos.values() if d.get("success"))
        summary[task] = {
            "demos": len(demos),
            "kept": kept,
            "dropped_noops": sum(d.get("dropped_noops", 0) for d in demos.values()),
            "warning": "every demo of this task was dropped" if kept == 0 else None,
        }
    (dst / f"{suite}_metainfo.json").write_text(json.dumps(metainfo))
    (dst / "regenerate_summary.json").write_text(json.dumps(summary, indent=2))
    return summary

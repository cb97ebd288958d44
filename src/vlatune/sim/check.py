"""`vlatune sim check`: prove LIBERO runs here, headless, and show what the policy will see.

Creates one task's environment, restores init state 0, runs the settle steps, saves both cameras
as upright PNGs and reports how long each stage took.

    >>> result = run_sim_check("libero_object", 0, 128, Path("outputs/sim_check"))
    >>> result.pngs["agentview"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vlatune.conventions import CAMERAS, NUM_STEPS_WAIT, SETTLE_ACTION
from vlatune.sim.env import LiberoEnv


@dataclass
class SimCheckResult:
    suite: str
    task_id: int
    task_name: str
    instruction: str
    resolution: int
    timings: dict[str, float]
    pngs: dict[str, Path]
    upright: dict[str, np.ndarray] = field(repr=False)
    raw: dict[str, np.ndarray] = field(repr=False)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 image as PNG, atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    Image.fromarray(np.ascontiguousarray(image)).save(tmp)
    tmp.replace(path)
    return path


def run_sim_check(suite: str, task_id: int, resolution: int, out_dir: Path) -> SimCheckResult:
    cameras = tuple(CAMERAS)
    t0 = time.perf_counter()
    env = LiberoEnv(suite, task_id, resolution=resolution, cameras=cameras, seed=0)
    t_create = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        env.restore(0)
        t_reset = time.perf_counter() - t0
        step_times = []
        obs = None
        for _ in range(NUM_STEPS_WAIT):
            t0 = time.perf_counter()
            obs, _, _ = env.step(SETTLE_ACTION)
            step_times.append(time.perf_counter() - t0)
        raw = {c: env.last_raw[f"{CAMERAS[c]}_image"].copy() for c in cameras}
        upright = obs["images"]
        pngs = {c: save_png(upright[c], out_dir / f"{c}.png") for c in cameras}
    finally:
        env.close()
    return SimCheckResult(
        suite=env.suite,
        task_id=task_id,
        task_name=env.task.name,
        instruction=env.instruction,
        resolution=resolution,
        timings={
            "env_creation_s": t_create,
            "reset_and_init_state_s": t_reset,
            "settle_steps": float(NUM_STEPS_WAIT),
            "step_mean_s": float(np.mean(step_times)),
            "steps_per_s": float(1.0 / np.mean(step_times)),
        },
        pngs=pngs,
        upright=upright,
        raw=raw,
    )

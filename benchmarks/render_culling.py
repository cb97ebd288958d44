"""Frustum culling (`vlatune.sim.render.FrustumCulling`, LiberoEnv's default): milliseconds per
camera image with and without it, the same frames, and a pixel comparison of every pair.

Per suite (its task 0 by default): the arm moves through `--steps` random actions from init
state 0; at each step both cameras render culled and whole, alternating which goes first so that
a busy machine slows both alike. One process, one llvmpipe thread (as a recording worker).

    $ .venv/bin/python benchmarks/render_culling.py [--steps 40] [--resolution 128]
          [--suites libero_object,libero_spatial,libero_goal,libero_10]

Prints a table and writes benchmarks/results/render_culling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}


def measure(suite: str, task: int, steps: int, resolution: int) -> dict:
    from vlatune.sim.env import LiberoEnv

    env = LiberoEnv(suite, task, resolution=resolution)
    try:
        env.reset(0)
        sim = env.sim.sim
        times: dict[tuple[str, bool], list[float]] = {}
        identical = True
        actions = np.clip(np.random.default_rng(0).normal(0, 0.5, (steps, 7)), -1, 1)
        for k, action in enumerate(actions):
            env.step(action, render=False)
            culling = sim._render_context_offscreen._vlatune_culling
            for cam, name in CAMERAS.items():
                images = {}
                for cull in (True, False) if k % 2 else (False, True):
                    culling.enabled = cull
                    t0 = time.perf_counter()
                    images[cull] = sim.render(resolution, resolution, camera_name=name).copy()
                    times.setdefault((cam, cull), []).append(time.perf_counter() - t0)
                culling.enabled = True
                identical &= bool(np.array_equal(images[True], images[False]))
        stats = dict(env.render_stats)
    finally:
        env.close()
    row = {"suite": suite, "task": task, "identical": identical, "culling": stats}
    for cam in CAMERAS:
        whole = float(np.median(times[(cam, False)]) * 1000)
        culled = float(np.median(times[(cam, True)]) * 1000)
        row[cam] = {"whole_ms": round(whole, 1), "culled_ms": round(culled, 1)}
    row["mean_hidden_per_render"] = round(stats["geoms_hidden"] / max(1, stats["renders"]), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="libero_object,libero_spatial,libero_goal,libero_10")
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/render_culling.json"))
    args = ap.parse_args()
    os.environ.setdefault("LP_NUM_THREADS", "1")
    from vlatune.versions import version_block

    rows = [measure(s, args.task, args.steps, args.resolution) for s in args.suites.split(",")]
    print(f"{'suite':16s} {'camera':10s} {'whole ms':>9s} {'culled ms':>10s} {'saved':>6s}  same")
    for r in rows:
        for cam in CAMERAS:
            w, c = r[cam]["whole_ms"], r[cam]["culled_ms"]
            print(
                f"{r['suite']:16s} {cam:10s} {w:9.1f} {c:10.1f} {1 - c / w:6.0%}  {r['identical']}"
            )
    result = {
        "what": "median ms per camera image, culled vs drawn whole, the same frames; identical: "
        "every pair equal pixel for pixel",
        "steps": args.steps,
        "resolution": args.resolution,
        "rows": rows,
        "versions": version_block(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    if not all(r["identical"] for r in rows):
        raise SystemExit("culled and whole images differ: frustum culling changed a pixel")


if __name__ == "__main__":
    main()

"""Evaluation throughput: env steps/s, episodes/hour and where the time goes (physics,
rendering, policy), at 128 and 256 px, for 1 and 2 worker processes.

The policy is the scripted expert made to ask for images (so both cameras are rendered every
step, as for a learned policy); its own compute is measured separately and is negligible.

    $ .venv/bin/python benchmarks/eval_throughput.py [--steps 60] [--episodes 4]

Prints a table and writes benchmarks/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlatune.eval.policies import ScriptedPolicy  # noqa: E402


class RenderedScripted(ScriptedPolicy):
    needs_images = True


def rendered_scripted() -> RenderedScripted:
    return RenderedScripted()


def step_split(steps: int) -> list[dict]:
    """Seconds per env step without rendering and with two cameras at 128 / 256 px."""
    from vlatune.sim.env import LiberoEnv
    from vlatune.sim.expert import ScriptedExpert

    rows = []
    for render, res in ((False, 0), (True, 128), (True, 256)):
        env = LiberoEnv("libero_object", 0, resolution=res or 128, render=render)
        expert = ScriptedExpert(env)
        env.reset(0)
        t_policy = t_step = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            a = expert.act()
            t1 = time.perf_counter()
            env.step(a)
            t2 = time.perf_counter()
            t_policy += t1 - t0
            t_step += t2 - t1
        env.close()
        rows.append(
            {
                "render": render,
                "resolution": res,
                "step_s": t_step / steps,
                "policy_s": t_policy / steps,
            }
        )
    return rows


def episodes_per_hour(workers: int, resolution: int, episodes: int) -> dict:
    from vlatune.eval.runner import EvalSpec, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        spec = EvalSpec(
            policy="benchmarks.eval_throughput:rendered_scripted",
            tasks=[0],
            trials=episodes,
            workers=workers,
            video="none",
            resolution=resolution,
            out=Path(tmp),
        )
        t0 = time.perf_counter()
        summary = evaluate(spec)
        wall = time.perf_counter() - t0
        steps = [
            json.loads(line)["steps"]
            for line in (Path(tmp) / "episodes.jsonl").read_text().splitlines()
        ]
    return {
        "workers": workers,
        "resolution": resolution,
        "episodes": episodes,
        "wall_s": round(wall, 1),
        "episodes_per_hour": round(3600 * episodes / wall, 1),
        "env_steps_per_s": round(sum(steps) / wall, 2),
        "success_rate": summary["overall"]["success_rate"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "eval_throughput.json"
    )
    args = ap.parse_args()
    split = step_split(args.steps)
    physics = split[0]["step_s"]
    for r in split:
        r["render_s"] = max(0.0, r["step_s"] - physics) if r["render"] else 0.0
        label = f"{r['resolution']} px" if r["render"] else "no render"
        print(
            f"{label:<10} step {1000 * r['step_s']:7.1f} ms (physics {1000 * physics:.1f}, rendering {1000 * r['render_s']:.1f}, policy {1000 * r['policy_s']:.2f})",
            flush=True,
        )
    runs = []
    for res in (128, 256):
        for workers in (1, 2):
            row = episodes_per_hour(workers, res, args.episodes)
            runs.append(row)
            print(
                f"{res} px, workers={workers}: {row['episodes_per_hour']:.0f} episodes/h, {row['env_steps_per_s']:.1f} env steps/s",
                flush=True,
            )
    result = {
        "benchmark": "eval_throughput",
        "machine": {"cpus": os.cpu_count(), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")},
        "step_split": split,
        "runs": runs,
        "notes": "EGL through Mesa's software renderer; OSMesa (libosmesa6) is not installed on these machines.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

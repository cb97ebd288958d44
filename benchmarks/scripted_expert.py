"""Scripted expert success rate per task, over the fixed LIBERO init states (rendering off).

Target (Simulation issue): >= 80% of the 50 init states of each supported task.

    $ .venv/bin/python benchmarks/scripted_expert.py [--suites libero_object,libero_spatial] [--inits 50] [--workers 2]

Prints a table and writes benchmarks/results/scripted_expert.json, merging rows by (suite, task)
into what the file holds (written after each task), so tasks can be measured in separate runs.
Episodes reset softly (same observations as LIBERO's hard reset, 1.5 s less each).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path


def run_task(args: tuple[str, int, int]) -> dict:
    suite, task_id, inits = args
    from vlatune.sim.env import LiberoEnv
    from vlatune.sim.expert import UnsupportedTask, run_expert_episode

    env = LiberoEnv(suite, task_id, render=False, hard_reset=False)
    t0 = time.perf_counter()
    ok, steps = [], []
    try:
        for i in range(inits):
            success, _, n = run_expert_episode(env, i)
            ok.append(bool(success))
            if success:
                steps.append(n)
    except UnsupportedTask as e:
        return {
            "suite": suite,
            "task_id": task_id,
            "task": env.task.name,
            "supported": False,
            "reason": str(e),
        }
    finally:
        env.close()
    return {
        "suite": suite,
        "task_id": task_id,
        "task": env.task.name,
        "supported": True,
        "episodes": len(ok),
        "successes": sum(ok),
        "success_rate": sum(ok) / len(ok),
        "failed_inits": [i for i, s in enumerate(ok) if not s],
        "mean_steps": sum(steps) / len(steps) if steps else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="libero_object,libero_spatial")
    ap.add_argument("--tasks", default=None, help="comma-separated task ids (default: all 10)")
    ap.add_argument("--inits", type=int, default=50)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "scripted_expert.json"
    )
    args = ap.parse_args()
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else list(range(10))
    jobs = [(s, t, args.inits) for s in args.suites.split(",") for t in tasks]
    old = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    merged = {(r["suite"], r["task_id"]): r for r in old}
    with mp.get_context("forkserver").Pool(args.workers) as pool:
        for row in pool.imap(run_task, jobs):
            merged[(row["suite"], row["task_id"])] = row
            write(args.out, sorted(merged.values(), key=lambda r: (r["suite"], r["task_id"])))
            if row["supported"]:
                print(
                    f"{row['suite']:<15} task {row['task_id']}  {row['successes']:>2}/{row['episodes']}  ({100 * row['success_rate']:5.1f}%)  {row['task']}",
                    flush=True,
                )
            else:
                print(
                    f"{row['suite']:<15} task {row['task_id']}  unsupported: {row['reason']}",
                    flush=True,
                )
    print(f"wrote {args.out}")


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "scripted_expert", "target": 0.8, "rows": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

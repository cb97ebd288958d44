"""Demo success vs training time: `vlatune demo` at several budgets, for two tasks.

For each task the demonstrations are recorded once (the first budget's run) and shared by the
other budgets through a symlinked data folder; each budget trains from scratch and is evaluated
on the same held-out init states.

    $ .venv/bin/python benchmarks/demo.py [--tasks 0,1] [--minutes 5,10,15,30] [--trials 20]

Prints a table and writes benchmarks/results/demo.json (about 2.5 hours on 2 cores with the
defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlatune.demo import run_demo  # noqa: E402
from vlatune.versions import version_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--tasks", default="0,1")
    ap.add_argument("--minutes", default="5,10,15,30")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_demo"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo.json")
    args = ap.parse_args()
    rows = []
    for task in [int(t) for t in args.tasks.split(",")]:
        shared = None
        for minutes in [float(m) for m in args.minutes.split(",")]:
            out = args.work / f"task{task}" / f"m{minutes:g}"
            out.mkdir(parents=True, exist_ok=True)
            if shared is not None and not (out / "data").exists():
                (out / "data").symlink_to(shared.resolve(), target_is_directory=True)
            t0 = time.perf_counter()
            r = run_demo(
                out,
                suite=args.suite,
                task=task,
                episodes=args.episodes,
                minutes=minutes,
                trials=args.trials,
                progress=False,
            )
            shared = shared or out / "data"
            rows.append(
                {
                    "suite": args.suite,
                    "task": task,
                    "minutes": minutes,
                    "steps": r["steps"],
                    "success_rate": r["success_rate"],
                    "ci95": r["ci95"],
                    "trials": r["trials"],
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'task':>4} {'minutes':>7} {'steps':>6} {'success':>8} {'95% CI':>14}")
    for r in rows:
        lo, hi = r["ci95"]
        print(
            f"{r['task']:4d} {r['minutes']:7g} {r['steps']:6d} {100 * (r['success_rate'] or 0):7.0f}% "
            f"[{100 * lo:4.0f}, {100 * hi:4.0f}]%"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"versions": version_block(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Demo success vs training time: `vlatune demo` evaluated after 5, 10, 15 and 30 minutes of
training, for two tasks.

For each task the demonstrations are recorded once; one training run then grows through the
budgets: `run_demo` is called again on the same folder with the next increment of minutes, the
trainer resumes exactly from its last checkpoint (same data order, optimiser and schedule
state), and each budget's final checkpoint is evaluated on the same held-out init states (its
own eval folder). The minutes are those of the training loop, summed over the resumed parts;
each resume costs start-up time on top (reloading, decoding the frames again).

    $ .venv/bin/python benchmarks/demo.py [--tasks 0,2] [--minutes 5,10,15,30] [--trials 20]
          [--episodes 45] [--data TASK=DIR ...]

`--data 0=outputs/demo/data` reuses the recordings of an earlier demo of that task. Rows are
merged into benchmarks/results/demo.json by (suite, task, minutes), so budgets can be run in
separate sessions: a task whose work folder holds a run ending at a measured budget resumes
from it and only trains the budgets above. About 50 minutes per task on 2 cores with the defaults.
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


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of an existing results file updated with `rows` (same suite, task and minutes)."""
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    key = lambda r: (r["suite"], r["task"], float(r["minutes"]))  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    return sorted(merged.values(), key=key)


def minutes_done(path: Path, suite: str, task: int, run_dir: Path) -> float:
    """Training minutes already behind the run in `run_dir`: those of the measured row whose
    checkpoint is the run's latest, so a later session resumes exactly where one stopped."""
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        return 0.0
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    for r in old:
        if (r["suite"], r["task"], r["checkpoint"]) == (suite, task, ckpts[-1].name):
            return float(r["minutes"])
    raise SystemExit(
        f"{run_dir}: its latest checkpoint {ckpts[-1].name} is not a measured budget in {path} "
        "(a run stopped between budgets); delete that run/ folder to train this task again"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--tasks", default="0,2")
    ap.add_argument("--minutes", default="5,10,15,30", help="cumulative training budgets")
    ap.add_argument("--episodes", type=int, default=45)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--data", action="append", default=[], help="TASK=DIR: reuse recordings")
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_demo"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo.json")
    args = ap.parse_args()
    reuse = {int(k): Path(v) for k, v in (d.split("=", 1) for d in args.data)}
    budgets = sorted(float(m) for m in args.minutes.split(","))
    rows = []
    for task in [int(t) for t in args.tasks.split(",")]:
        out = args.work / f"task{task}"
        out.mkdir(parents=True, exist_ok=True)
        if task in reuse and not (out / "data").exists():
            (out / "data").symlink_to(reuse[task].resolve(), target_is_directory=True)
        done = minutes_done(args.out, args.suite, task, out / "run")
        if done:
            print(f"task {task}: resuming after {done:g} measured minutes", flush=True)
        for minutes in [m for m in budgets if m > done]:
            t0 = time.perf_counter()
            r = run_demo(
                out,
                suite=args.suite,
                task=task,
                episodes=args.episodes,
                minutes=minutes - done,
                trials=args.trials,
                # budgets are minutes; a constant lr (the recipe's cosine decays to 0 at
                # max_steps, meaningless here), as results/demo.json was measured with
                overrides=[
                    "eval.video_trials=1",
                    "train.max_steps=1000000",
                    "optim.schedule=constant",
                ],
                progress=False,
            )
            done = minutes
            rows.append(
                {
                    "suite": args.suite,
                    "task": task,
                    "minutes": minutes,
                    "episodes": args.episodes,
                    "steps": r["steps"],
                    "success_rate": r["success_rate"],
                    "ci95": r["ci95"],
                    "successes": r["successes"],
                    "trials": r["trials"],
                    "checkpoint": Path(r["checkpoint"]).name,
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            # written after every budget: a stopped run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            merged = merge_rows(args.out, rows)
            args.out.write_text(
                json.dumps({"versions": version_block(), "rows": merged}, indent=2) + "\n"
            )
    print(f"{'task':>4} {'minutes':>7} {'steps':>6} {'success':>8} {'95% CI':>14}")
    for r in merge_rows(args.out, rows):
        lo, hi = r["ci95"]
        print(
            f"{r['task']:4d} {r['minutes']:7g} {r['steps']:6d} {100 * (r['success_rate'] or 0):7.0f}% "
            f"[{100 * lo:4.0f}, {100 * hi:4.0f}]%"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

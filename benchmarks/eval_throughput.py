"""Evaluation throughput: env steps/s, episodes/hour and where the time goes (physics,
rendering, policy), at 128 and 256 px, for 1 and 2 worker processes.

The policy is the scripted expert made to ask for images (so both cameras are rendered every
step, as for a learned policy); its own compute is measured separately and is negligible.

    $ .venv/bin/python benchmarks/eval_throughput.py [--steps 60] [--episodes 4]

Prints a table and writes benchmarks/results/eval_throughput.json.

`--server` instead compares, for N env workers, (a) one copy of a learned policy per worker
(what a `package.module:factory` policy does) with (b) one batched `vlatune serve` process
answering N client workers (what `vlatune eval --workers N` does with a checkpoint folder):
episodes per hour, policy queries per second, and the peak resident memory (RSS) summed over
every process of each set-up, with the same tiny checkpoint (the demo recipe, trained a few
steps on a small recording unless `--policy` names one) on the same task and init states.

    $ .venv/bin/python benchmarks/eval_throughput.py --server [--workers 1,2] [--episodes 4]

writes benchmarks/results/eval_throughput_server.json.
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


# ------------------------------------------------------------------------------ --server
def own_copy():
    """(a): each worker loads its own copy of the checkpoint (a factory, not a folder, so the
    runner does not start a server for it)."""
    from vlatune.eval.policies import load_policy

    return load_policy(os.environ["VLATUNE_BENCH_POLICY"])


def tiny_checkpoint(root: Path) -> Path:
    """The demo recipe's policy (configs demo/tiny), trained 4 steps on a small recording."""
    import subprocess

    from tests.data_fixtures import make_libero_hdf5

    data = make_libero_hdf5(root / "data", demos=4, T=16, res=128)
    run = root / "run"
    cmd = [
        sys.executable, "-m", "vlatune", "train", "demo/tiny", "--no-progress",
        f"data.path={data}", "data.format=auto", "data.batch_size=8",
        f"train.output_dir={run}", "train.max_steps=4", "train.save_every=4",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return run / "checkpoint-4"


def _rss_tree(root_pid: int) -> dict[int, tuple[str, int]]:
    """pid -> (role, RSS bytes) of `root_pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            names[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [(root_pid, "main (this process)")]
    while todo:
        pid, role = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = (role, int(line.split()[1]) * 1024)
        except OSError:
            pass
        for child in children.get(pid, []):
            todo.append((child, _role(names.get(child, ""), role)))
    return out


class PeakRSS:
    """Samples the summed RSS of this process tree every `every` s; keeps the peak."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.peak, self.at_peak = every, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = _rss_tree(os.getpid())
            total = sum(r for _, r in tree.values())
            if total > self.peak:
                self.peak, self.at_peak = total, tree
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _role(cmd: str, parent_role: str) -> str:
    """What a child process is, from its command line and its parent's role."""
    if " serve " in cmd:
        return "policy server"
    if parent_role == "forkserver":  # forked by the forkserver: an env worker
        return "env workers"
    if "forkserver" in cmd:
        return "forkserver"
    if "resource_tracker" in cmd:
        return "resource tracker"
    return "other"


def server_mode_run(setup: str, policy: str, workers: int, episodes: int, args) -> dict:
    from vlatune.eval.runner import EvalSpec, evaluate, read_episodes
    from vlatune.serving import LocalServer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            spec_kw = dict(
                tasks=[0], trials=episodes, workers=workers, video="none",
                resolution=args.resolution, max_steps=args.max_steps, out=Path(tmp),
            )  # fmt: skip
            if setup == "server":
                with LocalServer(policy, max_batch=workers) as url:
                    summary = evaluate(EvalSpec(policy=url, **spec_kw))
            else:
                os.environ["VLATUNE_BENCH_POLICY"] = policy
                summary = evaluate(
                    EvalSpec(policy="benchmarks.eval_throughput:own_copy", **spec_kw)
                )
        wall = time.perf_counter() - t0
        eps = read_episodes(Path(tmp) / "episodes.jsonl")
    queries = sum(e.get("queries") or 0 for e in eps)
    steps = sum(e.get("steps") or 0 for e in eps)
    by_role: dict[str, int] = {}
    for role, r in rss.at_peak.values():
        by_role[role] = by_role.get(role, 0) + r
    return {
        "setup": "one batched server" if setup == "server" else "one policy per worker",
        "workers": workers,
        "episodes": episodes,
        "errors": sum(1 for e in eps if e.get("error")),
        "wall_s": round(wall, 1),
        "episodes_per_hour": round(3600 * episodes / wall, 1),
        "policy_queries_per_s": round(queries / wall, 2),
        "env_steps_per_s": round(steps / wall, 2),
        "queries": queries,
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_rss_mb_by_role": {k: round(v / 2**20, 1) for k, v in sorted(by_role.items())},
        "processes_at_peak": len(rss.at_peak),
        "success_rate": summary["overall"]["success_rate"],
    }


def policy_rss_mb(policy: str) -> dict[str, float]:
    """Resident memory one copy of the policy adds to a process that has imported torch and
    vlatune (measured in a fresh process): what N workers pay N times in set-up (a)."""
    import subprocess

    code = (
        "import re, sys, torch, vlatune.eval.policies as p\n"
        "def rss():\n"
        "    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "a = rss(); m = p.load_policy(sys.argv[1]); b = rss(); print(a, b)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, policy], check=True, capture_output=True, text=True
    ).stdout.split()
    before, after = (int(x) / 1024 for x in out[-2:])
    return {"process_with_torch_mb": round(before, 1), "policy_copy_mb": round(after - before, 1)}


def server_mode(args) -> None:
    import torch

    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy or str(tiny_checkpoint(Path(tmp)))
        from vlatune.eval.policies import load_policy

        model = load_policy(policy)
        params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        del model
        copy_rss = policy_rss_mb(policy)
        print(f"one policy copy: {copy_rss}", flush=True)
        rows = []
        for r in range(args.rounds):  # odd rounds run (b) before (a): no order advantage
            for n in workers:
                order = ("per-worker", "server") if r % 2 == 0 else ("server", "per-worker")
                for setup in order:
                    row = {"round": r, **server_mode_run(setup, policy, n, args.episodes * n, args)}
                    rows.append(row)
                    print(
                        f"round {r} workers={n} {row['setup']:<22} {row['episodes_per_hour']:7.1f} episodes/h "
                        f"{row['policy_queries_per_s']:6.2f} queries/s  peak RSS {row['peak_rss_mb']:8.1f} MB "
                        f"{row['peak_rss_mb_by_role']}",
                        flush=True,
                    )
    result = {
        "benchmark": "eval_throughput --server",
        "machine": {"cpus": os.cpu_count(), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")},
        "policy": args.policy or "demo/tiny recipe, 4 training steps (tiny_checkpoint)",
        "policy_parameters_mb": round(params_mb, 2),
        "policy_copy_rss": copy_rss,
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "suite": "libero_object",
            "task": 0,
            "resolution": args.resolution,
            "max_steps": args.max_steps,
            "replan": 8,
            "episodes_per_worker": args.episodes,
        },  # fmt: skip
        "runs": rows,
        "notes": args.note,
    }
    out = args.out or Path(__file__).parent / "results" / "eval_throughput_server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--server", action="store_true", help="Per-worker copies vs one server.")
    ap.add_argument("--workers", default="1,2", help="--server: worker counts to compare.")
    ap.add_argument("--policy", default=None, help="--server: a checkpoint folder.")
    ap.add_argument("--resolution", type=int, default=128, help="--server: render size.")
    ap.add_argument("--max-steps", type=int, default=64, help="--server: steps per episode.")
    ap.add_argument("--note", default="", help="--server: a note stored in the JSON.")
    ap.add_argument("--rounds", type=int, default=2, help="--server: repetitions.")
    args = ap.parse_args()
    if args.server:
        server_mode(args)
        return
    args.out = args.out or Path(__file__).parent / "results" / "eval_throughput.json"
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

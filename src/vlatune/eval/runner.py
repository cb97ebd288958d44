"""`vlatune eval`: run a policy on LIBERO tasks, resumably, in parallel worker processes.

Episode i of task t uses init state `trial % 50`, the 10 settle steps, then at most the suite's
standard number of policy steps; it ends at success (the env's done flag) or at the step limit.
Action chunks run open loop for `replan` steps before the policy is asked again.

- Results are appended per episode to `OUT/episodes.jsonl`; running the same command again skips
  finished episodes. `--shard i/n` runs every n-th episode; `merge` combines shard folders.
- Workers: N processes (started through forkserver, so no GL or FFmpeg state is inherited), each
  owning its environments (one per task, reused), episodes handed out one at a time. A worker
  that dies (segfault in MuJoCo, GL failure) is replaced and its episode retried once, then
  recorded as an error, never as a failure. N = 1 runs in this process.
- Outputs: episodes.jsonl, results.json / results.csv (Wilson 95% intervals), success_rates.png,
  run.json (the versions block, the policy's description and config hash, the settings) and
  videos/<suite>_t<task>_trial<k>_<success|failure>.mp4 (both cameras side by side).

    >>> summary = evaluate(EvalSpec(policy="scripted", suite="libero_object", tasks=[0], trials=5, out=Path("out")))
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlatune.conventions import NUM_INIT_STATES, SUITES, resolve_suite
from vlatune.eval.policies import EpisodeContext, check_conventions, config_hash, load_policy
from vlatune.eval.results import summarize, write_results


@dataclass
class EvalSpec:
    policy: str
    suite: str = "libero_object"
    out: Path = Path("outputs/eval")
    tasks: list[int] | None = None
    trials: int = 50
    seed: int = 7
    workers: int = 1
    video: str = "failures"  # none | failures | all
    # record videos of trials < video_trials only (None: every trial). The other episodes render
    # only the frames the policy is given: with --replan 8 an eighth of them, and rendering is
    # most of the simulation time on CPU.
    video_trials: int | None = None
    max_steps: int | None = None
    replan: int = 8
    resolution: int = 256
    shard: tuple[int, int] = (0, 1)
    first_init: int = 0  # trial k uses init state (first_init + k) % 50; held-out states for a demo
    cameras: tuple[str, ...] = ("agentview", "wrist")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.suite = resolve_suite(self.suite)
        self.out = Path(self.out)
        if self.video not in ("none", "failures", "all"):
            raise ValueError("--video must be none, failures or all")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")
        if self.video_trials is not None and self.video_trials < 0:
            raise ValueError(f"--video-trials must be at least 0, got {self.video_trials}")
        if self.trials < 1 or self.workers < 1 or self.replan < 1:
            raise ValueError("--trials, --workers and --replan must be at least 1")
        n_tasks = SUITES[self.suite].num_tasks
        bad = [t for t in (self.tasks or []) if not 0 <= t < n_tasks]
        if bad:
            raise ValueError(f"{self.suite} has tasks 0..{n_tasks - 1}; got {bad}")

    @classmethod
    def from_config(cls, ev, **kwargs) -> EvalSpec:
        """A spec with a run config's `eval` section (video, replan, resolution, max steps,
        seed) and the rest from `kwargs` (policy, suite, tasks, trials, workers, out, ...)."""
        fields = ("video", "video_trials", "replan", "resolution", "max_steps", "seed")
        return cls(**{f: getattr(ev, f) for f in fields}, **kwargs)

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d.pop("shard")
        d.pop("workers")
        return d


def plan(spec: EvalSpec) -> list[dict[str, Any]]:
    tasks = spec.tasks if spec.tasks is not None else list(range(SUITES[spec.suite].num_tasks))
    eps = []
    for t in tasks:
        for k in range(spec.trials):
            eps.append(
                {
                    "id": f"{spec.suite}/t{t}/trial{k}",
                    "suite": spec.suite,
                    "task_id": t,
                    "trial": k,
                    "init_index": (spec.first_init + k) % NUM_INIT_STATES,
                }
            )
    i, n = spec.shard
    return [e for j, e in enumerate(eps) if j % n == i]


def read_episodes(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):  # only the last line can be cut by a kill mid-write; it runs again
                raise ValueError(f"{path}: line {n} is not valid JSON") from None
    return out


class _EnvCache:
    def __init__(self, spec: EvalSpec, render: bool):
        self.spec, self.render, self.envs = spec, render, {}

    def get(self, suite: str, task_id: int):
        from vlatune.sim.env import LiberoEnv

        key = (suite, task_id)
        if key not in self.envs:
            self.envs[key] = LiberoEnv(
                suite,
                task_id,
                resolution=self.spec.resolution,
                cameras=self.spec.cameras,
                seed=self.spec.seed,
                render=self.render,
            )
        return self.envs[key]

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def run_episode(spec: EvalSpec, policy, envs: _EnvCache, ep: dict[str, Any]) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    env = envs.get(ep["suite"], ep["task_id"])
    episode_seed = spec.seed * 1_000_003 + ep["trial"]
    np.random.seed(episode_seed % 2**32)
    torch.manual_seed(episode_seed)
    # render only what is looked at: every frame of a recorded episode, otherwise the frames
    # the policy is given (the first of each chunk), none for a policy without cameras
    record = (
        spec.video != "none"
        and envs.render
        and (spec.video_trials is None or ep["trial"] < spec.video_trials)
    )
    sees = bool(getattr(policy, "needs_images", True))
    obs = env.reset(ep["init_index"], render=record or sees)
    ctx = EpisodeContext(
        suite=env.suite,
        task_id=ep["task_id"],
        task_name=env.task.name,
        instruction=env.instruction,
        trial=ep["trial"],
        init_index=ep["init_index"],
        init_state=env.init_states[ep["init_index"]],
        env=env,
    )
    policy.reset(ctx)
    max_steps = spec.max_steps or env.max_steps
    frames: list[np.ndarray] = []
    steps, success = 0, False
    while steps < max_steps and not success:
        chunk = np.asarray(policy.predict(obs), dtype=np.float64)
        if chunk.ndim == 1:
            chunk = chunk[None]
        todo = chunk[: spec.replan]
        for i, a in enumerate(todo):
            if record:
                frames.append(np.concatenate([obs["images"][c] for c in env.cameras], axis=1))
            obs, success, _ = env.step(a, render=record or (sees and i == len(todo) - 1))
            steps += 1
            if success or steps >= max_steps:
                break
    result = {
        **{k: ep[k] for k in ("id", "suite", "task_id", "trial", "init_index")},
        "task_name": env.task.name,
        "instruction": env.instruction,
        "seed": spec.seed,
        "success": bool(success),
        "steps": steps,
        "wall_s": round(time.perf_counter() - t0, 3),
        "error": None,
        "video": None,
    }
    if record and (spec.video == "all" or not success) and frames:
        from vlatune.data.video import encode_video

        frames.append(np.concatenate([obs["images"][c] for c in env.cameras], axis=1))
        name = f"{ep['suite']}_t{ep['task_id']}_trial{ep['trial']}_{'success' if success else 'failure'}.mp4"
        path = spec.out / "videos" / name
        tmp = path.with_name(f".{path.stem}.tmp.mp4")
        encode_video(np.stack(frames), tmp, fps=20)
        os.replace(tmp, path)
        result["video"] = f"videos/{name}"
    return result


def one_render_thread() -> None:
    """In a simulator worker process: Mesa's software rasteriser (llvmpipe) starts one thread
    per core in every process; with one worker per core they contend. One thread each made
    2-worker evaluation about 25% faster on our 2 cores. A user's own setting is kept."""
    os.environ.setdefault("LP_NUM_THREADS", "1")


def _worker(spec: EvalSpec, render: bool, tasks: mp.Queue, results: mp.Queue) -> None:
    one_render_thread()
    policy = load_policy(spec.policy)
    envs = _EnvCache(spec, render)
    try:
        while True:
            ep = tasks.get()
            if ep is None:
                return
            try:
                results.put(("done", os.getpid(), run_episode(spec, policy, envs, ep)))
            except Exception as e:  # a Python error in an episode: recorded, the worker goes on
                results.put(
                    (
                        "error",
                        os.getpid(),
                        {
                            **ep,
                            "error": f"{type(e).__name__}: {e}",
                            "trace": traceback.format_exc(limit=5),
                        },
                    )
                )
    finally:
        envs.close()


def _error_record(ep: dict[str, Any], spec: EvalSpec, message: str) -> dict[str, Any]:
    return {
        **{k: ep[k] for k in ("id", "suite", "task_id", "trial", "init_index")},
        "task_name": ep.get("task_name"),
        "instruction": ep.get("instruction"),
        "seed": spec.seed,
        "success": None,
        "steps": None,
        "wall_s": None,
        "error": message,
        "video": None,
    }


def evaluate(
    spec: EvalSpec, progress: Callable[[dict[str, Any], int, int], None] | None = None
) -> dict[str, Any]:
    from vlatune.versions import version_block

    policy = load_policy(spec.policy)
    check_conventions(policy)
    declared = policy.conventions.get("cameras")
    if declared:  # render only what the policy reads (rendering dominates the cost)
        spec.cameras = tuple(declared)
    description = policy.describe()
    settings = json.loads(json.dumps(spec.settings()))  # as it reads back from run.json
    meta = {
        "versions": version_block(),
        "policy": description,
        "policy_config_hash": config_hash(description),
        "settings": settings,
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "videos").mkdir(exist_ok=True)
    run_file = spec.out / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if (
            previous.get("policy_config_hash") != meta["policy_config_hash"]
            or previous.get("settings") != meta["settings"]
        ):
            raise ValueError(
                f"{spec.out} holds results of another policy or other settings; use a new --out folder"
            )
    else:
        run_file.write_text(json.dumps(meta, indent=2) + "\n")
    log = spec.out / "episodes.jsonl"
    done = {e["id"] for e in read_episodes(log)}
    todo = [e for e in plan(spec) if e["id"] not in done]
    render = bool(policy.needs_images or spec.video != "none")
    total = len(todo)

    with log.open("a") as f:
        count = [0]

        def record(result: dict[str, Any]) -> None:
            result.pop("trace", None)
            f.write(json.dumps(result) + "\n")
            f.flush()
            os.fsync(f.fileno())
            count[0] += 1
            if progress is not None:
                progress(result, count[0], total)

        inflight: dict[int, dict[str, Any]] = {}
        pending = list(todo)
        if spec.workers == 1:
            envs = _EnvCache(spec, render)
            try:
                while pending:
                    ep = pending.pop(0)
                    try:
                        record(run_episode(spec, policy, envs, ep))
                    except Exception as e:
                        record(_error_record(ep, spec, f"{type(e).__name__}: {e}"))
            finally:
                envs.close()
        else:
            _run_workers(spec, render, pending, inflight, record)
    episodes = [e for e in read_episodes(log) if e["id"] in {p["id"] for p in plan(spec)}]
    summary = summarize(episodes)
    write_results(spec.out, summary, meta)
    return summary


def _run_workers(spec: EvalSpec, render: bool, pending: list, inflight: dict, record) -> None:
    ctx = mp.get_context("forkserver")
    results = ctx.Queue()
    workers: dict[int, tuple[Any, Any]] = {}  # pid -> (process, its task queue)
    retries: dict[str, int] = {}

    def start() -> None:
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(spec, render, q, results), daemon=True)
        p.start()
        workers[p.pid] = (p, q)

    for _ in range(min(spec.workers, len(pending))):
        start()
    idle = list(workers)
    try:
        while pending or inflight:
            while idle and pending:
                pid = idle.pop()
                if pid not in workers:
                    continue
                ep = pending.pop(0)
                inflight[pid] = ep
                workers[pid][1].put(ep)
            try:
                _kind, pid, result = results.get(timeout=0.5)
            except queue.Empty:
                result = None
            if result is not None:
                inflight.pop(pid, None)
                if retries.get(result["id"]):
                    result["retries"] = retries[result["id"]]
                record(result)
                idle.append(pid)
            for dead_pid, (p, _) in list(workers.items()):
                if p.is_alive():
                    continue
                # crashed (segfault, GL failure): replace it and retry its episode once
                del workers[dead_pid]
                ep = inflight.pop(dead_pid, None)
                if ep is not None:
                    retries[ep["id"]] = retries.get(ep["id"], 0) + 1
                    if retries[ep["id"]] <= 1:
                        pending.insert(0, ep)
                    else:
                        record(
                            _error_record(
                                ep, spec, f"worker crashed twice (exit code {p.exitcode})"
                            )
                        )
                if pending or inflight:
                    start()
                    idle.append(list(workers)[-1])
    finally:
        for _, q in workers.values():
            q.put(None)
        for p, _ in workers.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def merge(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Combine shard folders into `out` (episodes.jsonl, results, videos)."""
    import shutil

    metas, seen = [], {}
    for d in dirs:
        run = d / "run.json"
        if not run.is_file():
            raise ValueError(f"{d} is not an eval output folder (no run.json)")
        metas.append(json.loads(run.read_text()))
        for e in read_episodes(d / "episodes.jsonl"):
            if e["id"] in seen and seen[e["id"]] != e:
                raise ValueError(f"episode {e['id']} appears in two shards with different results")
            seen[e["id"]] = e
        for v in (d / "videos").glob("*.mp4"):
            (out / "videos").mkdir(parents=True, exist_ok=True)
            shutil.copy2(v, out / "videos" / v.name)
    hashes = {m["policy_config_hash"] for m in metas}
    if len(hashes) != 1:
        raise ValueError("the folders were made by different policies or configs; not merging")
    out.mkdir(parents=True, exist_ok=True)
    episodes = sorted(seen.values(), key=lambda e: (e["suite"], e["task_id"], e["trial"]))
    (out / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    meta = dict(metas[0])
    meta["merged_from"] = [str(d) for d in dirs]
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    summary = summarize(episodes)
    write_results(out, summary, meta)
    return summary

"""`vlatune eval`: run a policy on LIBERO tasks, resumably, in parallel worker processes.

Episode i of task t uses init state `trial % 50`, the 10 settle steps, then at most the suite's
standard number of policy steps; it ends at success (the env's done flag) or at the step limit.
Action chunks run open loop for `replan` steps before the policy is asked again.

- Results are appended per episode to `OUT/episodes.jsonl`; running the same command again skips
  finished episodes. `--shard i/n` runs every n-th episode; `merge` combines shard folders.
- Counting (docs/evaluation.md, `results.COUNTING_RULE`): an exception raised by the policy
  (load, reset, predict) or the simulator inside an episode is a *failure* of that episode,
  recorded with its stage, message and traceback (`exception`); the run goes on. A worker that
  dies (segfault in MuJoCo, GL failure) is replaced and its episode retried once; a second death,
  or an environment that cannot be built, is an *error*, counted as a failure in the success
  rate and re-run by the next run of the same command. N = 1 runs in this process.
  With N > 1 and a learned policy (a folder), one policy server process holds the model and
  the N workers are its clients (`vlatune.serving`, docs/serving.md). A policy server that is
  gone (`ws://` policies) makes the running episode an error (`ConnectionError`), not a failure.
- Settings travel with the policy: a policy may carry `eval_settings` (a training checkpoint
  carries its config's `eval` section: resolution, replan); they are used unless a flag gives
  another value, which run.json records (`settings_source`, `overrides`) and a warning states.
- Image history: a policy with `image_history` = n > 1 (RDT: 2 frames; a served one says so in
  its hello) also gets the last n - 1 env steps before each query rendered, passed as
  `obs["image_history"]` {camera: [frames oldest first]}; at an episode's first query there is
  none (the frames before the episode's start, as in training). Steps and videos are unchanged.
- Fallbacks: a policy may count the queries it answered by a fallback (`fallbacks()`, see
  `eval/policies.py`); each episode records its queries and the fallbacks taken in it.
- `episodes.jsonl` tolerates a torn last line (a run killed mid-write): it is moved to
  `episodes.jsonl.torn` and that episode runs again. The folder is relocatable: run.json stores
  no output path.
- Outputs: episodes.jsonl, results.json / results.csv (Wilson 95% intervals), success_rates.png,
  run.json (the versions block, the policy's description and config hash, the settings) and
  videos/<suite>_t<task>_trial<k>_<success|failure>.mp4 (both cameras side by side).

    >>> summary = evaluate(EvalSpec(policy="scripted", suite="libero_object", tasks=[0], trials=5, out=Path("out")))
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import queue
import sys
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
from vlatune.fsutil import atomic_file, write_bytes, write_json, write_text
from vlatune.sim.render import one_render_thread


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
    # None: the policy's training setting (`eval_settings`), else DEFAULT_SETTINGS
    replan: int | None = None
    resolution: int | None = None
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
        if self.trials < 1 or self.workers < 1 or (self.replan is not None and self.replan < 1):
            raise ValueError("--trials, --workers and --replan must be at least 1")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be at least 8 pixels, got {self.resolution}")
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
        """What decides the episodes' outcomes (run.json): no output path (the folder is
        relocatable), no shard or worker count (they do not change an episode)."""
        d = asdict(self)
        for k in ("out", "shard", "workers"):
            d.pop(k)
        return d


# Settings a policy is trained for, and the values used when neither it nor a flag gives one.
DEFAULT_SETTINGS = {"resolution": 256, "replan": 8}


def resolve_settings(spec: EvalSpec, policy, warn: Callable[[str], None]) -> dict[str, Any]:
    """Fill `spec.resolution` / `spec.replan`: an explicit value, else the policy's training
    setting (`policy.eval_settings`), else DEFAULT_SETTINGS. Returns where each came from and
    the overrides that differ from training (each one warned about)."""
    trained = getattr(policy, "eval_settings", None) or {}
    source: dict[str, str] = {}
    overrides = []
    for key, default in DEFAULT_SETTINGS.items():
        given, seen = getattr(spec, key), trained.get(key)
        if given is None:
            setattr(spec, key, default if seen is None else seen)
            source[key] = "default" if seen is None else "policy"
            continue
        source[key] = "flag"
        if seen is not None and given != seen:
            overrides.append({"setting": key, "value": given, "trained": seen})
            why = (
                "the policy saw other images in training; the success rate may not be comparable"
                if key == "resolution"
                else "chunks run differently from training"
            )
            warn(
                f"--{key} {given} overrides the policy's training setting {key} = {seen} "
                f"({why}); drop the flag to use {seen}"
            )
    return {"settings_source": source, "overrides": overrides}


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
    """The records of an episodes.jsonl; a torn last line (a run killed mid-write) is left out
    (`repair_log` sets it aside before a run appends); a bad line elsewhere is an error."""
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
            if n != len(lines):
                raise ValueError(
                    f"{path}: line {n} is not valid JSON (only the last line can be cut by a "
                    "kill); move that line out of the file to re-run its episode"
                ) from None
    return out


def latest_episodes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per episode id, the last one written (an error re-run by a later run)."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id.pop(r["id"], None)
        by_id[r["id"]] = r
    return list(by_id.values())


def repair_log(path: Path) -> str | None:
    """Set a torn last line of an append-only JSON-lines log aside into `<name>.torn` (appended,
    never lost) and cut it from the log, so the next record starts on a line of its own.
    A complete last record that only lacks its newline gets it. Returns a sentence saying what
    was done, or None when the log was whole."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        last_start = data.rstrip(b"\n").rfind(b"\n") + 1
        tail = data[last_start:].strip()
        if not tail:
            return None
        try:
            json.loads(tail)
            return None
        except ValueError:
            pass
    else:
        last_start = data.rfind(b"\n") + 1
        tail = data[last_start:]
        try:
            json.loads(tail)
        except ValueError:
            pass
        else:  # whole record, cut before its newline
            with path.open("ab") as f:
                f.write(b"\n")
            return None
    side = path.with_name(path.name + ".torn")
    with side.open("ab") as f:
        f.write(data[last_start:].rstrip(b"\n") + b"\n")
    write_bytes(path, data[:last_start])
    return (
        f"{path}: the last line was cut by an interrupted run ({len(data) - last_start} bytes); "
        f"moved to {side.name}, its episode runs again"
    )


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


def _base_record(spec: EvalSpec, ep: dict[str, Any]) -> dict[str, Any]:
    """Every field an episode record has (a failure or an error leaves some None)."""
    return {
        **{k: ep[k] for k in ("id", "suite", "task_id", "trial", "init_index")},
        "task_name": ep.get("task_name"),
        "instruction": ep.get("instruction"),
        "seed": spec.seed,
        "success": None,
        "steps": None,
        "queries": 0,
        "fallbacks": {},
        "wall_s": None,
        "error": None,
        "exception": None,
        "video": None,
    }


def _exception(stage: str, e: BaseException) -> dict[str, str]:
    return {
        "stage": stage,
        "message": f"{type(e).__name__}: {e}",
        "traceback": traceback.format_exc(limit=-12),
    }


def read_fallbacks(policy) -> dict[str, int]:
    """The policy's cumulative fallback counters ({} for a policy without `fallbacks()`)."""
    get = getattr(policy, "fallbacks", None)
    if get is None:
        return {}
    counts = get()
    if not isinstance(counts, dict):
        raise TypeError(f"policy.fallbacks() returned {type(counts).__name__}, not a dict")
    return {str(k): int(v) for k, v in counts.items()}


def _check_chunk(chunk: np.ndarray) -> np.ndarray:
    if chunk.ndim == 1:
        chunk = chunk[None]
    if chunk.ndim != 2 or chunk.shape[1] != 7 or len(chunk) == 0:
        raise ValueError(
            f"policy returned actions of shape {chunk.shape}; expected (H, 7) or (7,) "
            "(xyz, axis-angle rotation, gripper)"
        )
    if not np.all(np.isfinite(chunk)):
        raise ValueError("policy returned non-finite actions (NaN or inf)")
    return chunk


def failed_record(spec: EvalSpec, ep: dict[str, Any], exception: dict[str, str]) -> dict:
    """A failure that happened before the episode could start (policy.load in a worker)."""
    return {**_base_record(spec, ep), "success": False, "steps": 0, "exception": exception}


def run_episode(spec: EvalSpec, policy, envs: _EnvCache, ep: dict[str, Any]) -> dict[str, Any]:
    """One episode's record. An exception from the policy or the simulator once the environment
    exists makes the episode a failure (recorded with stage, message and traceback); only an
    environment that cannot be built raises (the caller records an error)."""
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
    # consecutive frames the policy reads: the steps before each query are rendered too
    history = max(1, int(getattr(policy, "image_history", 1) or 1)) if sees else 1
    window: list[tuple[int, dict[str, np.ndarray]]] = []  # (step, images) of rendered steps
    result = _base_record(spec, ep)
    result.update(task_name=env.task.name, instruction=env.instruction)
    frames: list[np.ndarray] = []
    steps, queries, success, obs = 0, 0, False, None
    stage = "policy.fallbacks"
    before: dict[str, int] = {}
    try:
        before = read_fallbacks(policy)
        stage = "env.reset"
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
        stage = "policy.reset"
        policy.reset(ctx)
        max_steps = spec.max_steps or env.max_steps
        if history > 1:
            window.append((0, obs["images"]))
        while steps < max_steps and not success:
            stage = "policy.predict"
            queries += 1
            query = obs
            if history > 1:
                query = {**obs, "image_history": _image_history(window, steps, history)}
            chunk = _check_chunk(np.asarray(policy.predict(query), dtype=np.float64))
            todo = chunk[: spec.replan]
            stage = "env.step"
            for i, a in enumerate(todo):
                if record:
                    frames.append(np.concatenate([obs["images"][c] for c in env.cameras], axis=1))
                rendered = record or (sees and i >= len(todo) - history)
                obs, success, _ = env.step(a, render=rendered)
                steps += 1
                if history > 1 and rendered:
                    window = [*window[-(history - 1) :], (steps, obs["images"])]
                if success or steps >= max_steps:
                    break
        stage = "policy.fallbacks"
        after = read_fallbacks(policy)
        result["fallbacks"] = {k: v - before.get(k, 0) for k, v in after.items()}
    except ConnectionError as e:  # the policy server is gone (vlatune.serving): infrastructure
        return _error_record(ep, spec, f"{type(e).__name__}: {e}")
    except Exception as e:  # the policy or the simulator raised: a failure of this episode
        result["exception"] = _exception(stage, e)
        success = False
    result.update(
        success=bool(success),
        steps=steps,
        queries=queries,
        wall_s=round(time.perf_counter() - t0, 3),
    )
    if record and (spec.video == "all" or not success) and frames:
        from vlatune.data.video import encode_video

        if obs is not None and "images" in obs:
            frames.append(np.concatenate([obs["images"][c] for c in env.cameras], axis=1))
        name = f"{ep['suite']}_t{ep['task_id']}_trial{ep['trial']}_{'success' if success else 'failure'}.mp4"
        path = spec.out / "videos" / name
        with atomic_file(path, keep_suffix=True) as tmp:
            encode_video(np.stack(frames), tmp, fps=20)
        result["video"] = f"videos/{name}"
    return result


def _image_history(
    window: list[tuple[int, dict[str, np.ndarray]]], step: int, history: int
) -> dict[str, list[np.ndarray]]:
    """The images of steps step - history + 1 .. step - 1 (those after the episode's start),
    oldest first, per camera, from the rendered `window`."""
    wanted = range(max(0, step - history + 1), step)
    by_step = dict(window)
    missing = [s for s in wanted if s not in by_step]
    if missing:  # every step within `history` of a query is rendered: a bug if not
        raise RuntimeError(f"image history: steps {missing} before step {step} were not rendered")
    cameras = by_step[step].keys() if step in by_step else []
    return {c: [by_step[s][c] for s in wanted] for c in cameras}


def episode_outcome(spec: EvalSpec, policy, envs: _EnvCache, ep: dict[str, Any]) -> dict:
    """`run_episode`, with an environment that cannot be built recorded as an error: whatever
    happens, a complete record (the same fields in every process)."""
    try:
        return run_episode(spec, policy, envs, ep)
    except Exception as e:
        return _error_record(ep, spec, f"environment not built: {type(e).__name__}: {e}", e)


def _worker(
    spec: EvalSpec, render: bool, tasks: mp.Queue, results: mp.Queue, policy_factory=None
) -> None:
    """An env worker: loads its policy (`policy_factory()` when given, e.g. a client of a
    policy server; else `load_policy(spec.policy)`) and runs the episodes it is handed."""
    one_render_thread()
    policy, load_failure = None, None
    try:
        policy = policy_factory() if policy_factory is not None else load_policy(spec.policy)
    except Exception as e:  # every episode of this worker fails with the reason
        load_failure = _exception("policy.load", e)
    envs = _EnvCache(spec, render)
    try:
        while True:
            ep = tasks.get()
            if ep is None:
                return
            if load_failure is not None:
                result = failed_record(spec, ep, load_failure)
            else:
                result = episode_outcome(spec, policy, envs, ep)
            results.put(("done", os.getpid(), result))
    finally:
        envs.close()


def _error_record(
    ep: dict[str, Any], spec: EvalSpec, message: str, exc: BaseException | None = None
) -> dict[str, Any]:
    rec = {**_base_record(spec, ep), "error": message}
    if exc is not None:
        rec["exception"] = _exception("env.build", exc)
    return rec


def _default_warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def evaluate(
    spec: EvalSpec,
    progress: Callable[[dict[str, Any], int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the episodes of `spec` not yet in OUT/episodes.jsonl, then write the results.
    `progress(record, done, total)` after each episode; `warn(sentence)` for what a user must
    know (overridden training settings, a torn log line, errors, fallbacks above 1%).
    With workers > 1 and a learned policy (a folder), the policy is loaded once, in a policy
    server process (`vlatune.serving.local`), and the workers are its clients."""
    from vlatune.serving.local import server_for_workers

    with server_for_workers(spec) as served:
        return _evaluate(spec, progress, warn, served)


def _evaluate(spec: EvalSpec, progress, warn, served: str | None) -> dict[str, Any]:
    from vlatune.eval.results import warnings_for
    from vlatune.versions import version_block

    warn = warn or _default_warn
    policy = load_policy(served or spec.policy)  # served: the URL of this run's policy server
    check_conventions(policy)
    declared = policy.conventions.get("cameras")
    if declared:  # render only what the policy reads (rendering dominates the cost)
        spec.cameras = tuple(declared)
    resolved = resolve_settings(spec, policy, warn)
    description = policy.describe()
    settings = json.loads(json.dumps(spec.settings()))  # as it reads back from run.json
    meta = {
        "versions": version_block(),
        "policy": description,
        "policy_config_hash": config_hash(description),
        "settings": settings,
        **resolved,
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "videos").mkdir(exist_ok=True)
    run_file = spec.out / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        before = dict(previous.get("settings") or {})
        before.pop("out", None)  # written by earlier versions; the folder may have moved
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if previous.get("policy_config_hash") != meta["policy_config_hash"]:
            changed.insert(0, "policy")
        if changed:
            detail = ", ".join(
                f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now"
                for k in changed
                if k != "policy"
            )
            raise ValueError(
                f"{spec.out} holds results of another policy or other settings "
                f"({', '.join(changed)}{'; ' + detail if detail else ''}); use a new --out folder"
            )
    else:
        write_json(run_file, meta)
    log = spec.out / "episodes.jsonl"
    torn = repair_log(log)
    if torn:
        warn(torn)
    planned = plan(spec)
    # finished episodes are kept; errors (infrastructure) run again
    done = {e["id"] for e in latest_episodes(read_episodes(log)) if e.get("error") is None}
    todo = [e for e in planned if e["id"] not in done]
    render = bool(policy.needs_images or spec.video != "none")
    total = len(todo)

    with log.open("a") as f:
        count = [0]

        def record(result: dict[str, Any]) -> None:
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
                    record(episode_outcome(spec, policy, envs, pending.pop(0)))
            finally:
                envs.close()
        else:
            factory = functools.partial(load_policy, served) if served else None
            _run_workers(spec, render, pending, inflight, record, policy_factory=factory)
    ids = {p["id"] for p in planned}
    episodes = [e for e in latest_episodes(read_episodes(log)) if e["id"] in ids]
    summary = summarize(episodes)
    write_results(spec.out, summary, meta)
    for line in warnings_for(summary):
        warn(line)
    return summary


def _run_workers(
    spec: EvalSpec, render: bool, pending: list, inflight: dict, record, policy_factory=None
) -> None:
    ctx = mp.get_context("forkserver")
    results = ctx.Queue()
    workers: dict[int, tuple[Any, Any]] = {}  # pid -> (process, its task queue)
    retries: dict[str, int] = {}

    def start() -> None:
        q = ctx.Queue()
        p = ctx.Process(
            target=_worker, args=(spec, render, q, results, policy_factory), daemon=True
        )
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
                        rec = _error_record(
                            ep, spec, f"worker crashed twice (exit code {p.exitcode})"
                        )
                        rec["retries"] = retries[ep["id"]] - 1
                        record(rec)
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
        for e in latest_episodes(read_episodes(d / "episodes.jsonl")):
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
    write_text(out / "episodes.jsonl", "".join(json.dumps(e) + "\n" for e in episodes))
    meta = dict(metas[0])
    meta["merged_from"] = [str(d) for d in dirs]
    write_json(out / "run.json", meta)
    summary = summarize(episodes)
    write_results(out, summary, meta)
    return summary

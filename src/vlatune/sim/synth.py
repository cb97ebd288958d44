"""`vlatune sim synth`: scripted demonstrations recorded as LIBERO HDF5.

For each task, the expert runs with rendering off (physics speed, about 5 s an episode) on
init states `first_init, first_init + 1, ...` until `episodes` succeed; each successful action
sequence is then replayed from the same init state with cameras on and recorded, and kept only
if the replay succeeds too. Files follow LIBERO's layout and attributes, raw orientation (the
renders as they come out of MuJoCo) and the env gripper convention, one `<task>_demo.hdf5` per
task. Episodes start after the 10 settle steps, as evaluation episodes do.

    >>> report = synthesize("libero_object", [0], episodes=10, out="data/synth", resolution=128)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlatune.conventions import NUM_INIT_STATES, libero_state
from vlatune.data.episode import DataError, Episode
from vlatune.data.formats.libero_hdf5 import LiberoHDF5Writer
from vlatune.fsutil import atomic_dir
from vlatune.sim.env import LiberoEnv, get_task
from vlatune.sim.expert import ExpertParams, run_expert_episode


def _robot_states(raw: dict[str, Any]) -> np.ndarray:
    # LIBERO's robot_states: gripper qpos (2), eef pos (3), eef quat (4)
    return np.concatenate(
        [raw["robot0_gripper_qpos"], raw["robot0_eef_pos"], raw["robot0_eef_quat"]]
    )


def record_replay(
    env: LiberoEnv,
    init,
    actions: np.ndarray | None,
    init_is_state: bool = False,
    params=None,
    noise_seed: int = 0,
) -> tuple[bool, Episode]:
    """Replay `actions` from init state `init` (an index, or with `init_is_state` a flattened
    MuJoCo state) after the settle steps, recording every frame. With `actions=None` the
    scripted expert acts (and is recorded) directly, until success or the suite's step limit."""
    if init_is_state:
        env.restore_state(init, render=False)
        env.settle()
        init_state = np.asarray(init, dtype=np.float64)
    else:
        env.reset(init)
        init_state = env.init_states[init % len(env.init_states)]
    cams = {"agentview": "agentview_image", "wrist": "robot0_eye_in_hand_image"}
    frames: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    states8, joints, sim_states, robot_states = [], [], [], []
    success = False
    if actions is None:
        from vlatune.sim.expert import ScriptedExpert

        expert = ScriptedExpert(env, params)
        source = (expert.act() for _ in range(env.max_steps))
    else:
        source = iter(actions)
    taken = []
    noise = getattr(params, "noise", 0.0) if actions is None else 0.0
    rng = np.random.default_rng([noise_seed, 11])
    for a in source:
        taken.append(a)  # the label: the expert's clean action
        raw = env.last_raw
        for c in env.cameras:
            frames[c].append(raw[cams[c]].copy())  # raw orientation, as LIBERO stores it
        states8.append(libero_state(raw))  # the one definition of the 8-d state
        joints.append(np.asarray(raw["robot0_joint_pos"], dtype=np.float64))
        sim_states.append(env.sim.sim.get_state().flatten())
        robot_states.append(_robot_states(raw))
        if noise > 0:  # DART: execute a perturbed action, record the clean one
            std = expert.noise_std()  # the expert's phase may scale it (grasp_noise_scale)
            a = np.asarray(a, dtype=np.float64).copy()
            a[:3] = np.clip(a[:3] + std * rng.normal(0.0, 1.0, 3), -1.0, 1.0)
        _, success, _ = env.step(a)
        if success and actions is None:
            break
    actions = np.asarray(taken)
    T = len(actions)
    rewards = np.zeros(T, dtype=np.uint8)
    rewards[-1] = int(success)
    ep = Episode(
        actions=np.asarray(actions, dtype=np.float64),
        instruction=env.instruction,
        states=np.asarray(states8, dtype=np.float32),
        images={c: np.stack(v) for c, v in frames.items()},
        extras={
            "states": np.asarray(sim_states),
            "robot_states": np.asarray(robot_states),
            "rewards": rewards,
            "dones": rewards.copy(),
            "obs/joint_states": np.asarray(joints),
        },
        meta={
            "task_name": env.task.name,
            "init_state": init_state.tolist(),
            **({} if init_is_state else {"init_index": init}),
        },
    )
    return success, ep


def task_file_attrs(task, env_name: str) -> dict[str, Any]:
    """The per-file attributes LIBERO writes: problem info, BDDL file and content, env args."""
    return {
        "problem_info": {
            "problem_name": env_name.lower(),
            "domain_name": "robosuite",
            "language_instruction": task.bddl_instruction,
        },
        "bddl_file_name": f"{task.suite}/{task.bddl_file.name}",
        "bddl_file_content": task.bddl_file.read_text(),
        "env_args": {
            "type": 1,
            "env_name": env_name,
            "bddl_file": task.bddl_file.name,
            "suite": task.suite,
        },
    }


def synthesize(
    suite: str,
    tasks: Sequence[int],
    episodes: int,
    out: str | Path,
    resolution: int = 128,
    first_init: int = 0,
    params: ExpertParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write `episodes` successful scripted demonstrations per task to `out` (LIBERO HDF5).
    `progress(kept, tried)` after each attempt, counted over all tasks so far."""
    out = Path(out)
    if out.exists():
        raise DataError(
            "destination already exists; choose a new folder (nothing was written)", file=out
        )
    if not 0 < episodes <= NUM_INIT_STATES:
        raise ValueError(f"episodes per task must be in 1..{NUM_INIT_STATES}, got {episodes}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    report: dict[str, Any] = {
        "suite": suite,
        "resolution": resolution,
        "expert": dataclasses.asdict(params or ExpertParams()),
        "tasks": {},
    }
    t_start = time.perf_counter()
    try:
        writer = None
        kept_before = tried_before = 0
        for task_id in tasks:
            fast = LiberoEnv(suite, task_id, render=False, hard_reset=False)
            cam = LiberoEnv(suite, task_id, resolution=resolution, render=True, hard_reset=False)
            if writer is None:
                writer = LiberoHDF5Writer(tmp, image_orientation="raw")
            task = fast.task
            writer.file_attrs[task.name] = task_file_attrs(task, fast.sim.__class__.__name__)
            kept, tried, replay_failed, steps = [], 0, 0, []
            init = first_init
            try:
                while len(kept) < episodes and init < first_init + NUM_INIT_STATES:
                    tried += 1
                    ok, actions, n = run_expert_episode(fast, init, params=params)
                    if ok:
                        ok2, ep = record_replay(cam, init, actions)
                        if ok2:
                            writer.add(ep)
                            kept.append(init)
                            steps.append(n)
                        else:
                            replay_failed += 1
                    if progress is not None:  # (kept, tried) over all tasks so far
                        progress(kept_before + len(kept), tried_before + tried)
                    init += 1
            finally:
                fast.close()
                cam.close()
            report["tasks"][task.name] = {
                "task_id": task_id,
                "instruction": task.instruction,
                "kept": len(kept),
                "tried": tried,
                "expert_success_rate": (len(kept) + replay_failed) / tried if tried else 0.0,
                "replay_failed": replay_failed,
                "init_indices": kept,
                "mean_steps": float(np.mean(steps)) if steps else None,
            }
            kept_before += len(kept)
            tried_before += tried
        if writer is not None:
            writer.close()
        report["episodes"] = sum(t["kept"] for t in report["tasks"].values())
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        (tmp / "synth_report.json").write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _record_task(pool, workers, setting, episodes, first_seed, tick):
    """One task's successful demonstrations, seeds first_seed, first_seed + 1, ... in the pool's
    workers (`setting`: suite, task, resolution, cameras, msaa, expert params): (kept sorted by
    seed, tried, solved, the workers' render counts: `FrustumCulling.stats`)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    kept: list[tuple[int, Episode]] = []
    tried, solved, next_seed = 0, 0, first_seed
    render: dict[str, int] = {}
    limit = 3 * episodes + 10  # attempts before giving up on an expert that rarely succeeds
    # one job per seed, at most one per worker and never more than the successes still needed:
    # nothing is recorded after the last one needed came in
    running: set = set()
    while len(kept) < episodes and (running or next_seed - first_seed < limit):
        while (
            len(running) < workers
            and len(kept) + len(running) < episodes
            and next_seed - first_seed < limit
        ):
            job = (*setting[:5], [next_seed], setting[5])
            running.add(pool.submit(_sampled_worker, job))
            next_seed += 1
        finished, running = wait(running, return_when=FIRST_COMPLETED)
        for fut in finished:
            results, counts = fut.result()
            for k, v in counts.items():
                render[k] = render.get(k, 0) + v
            for s, ok, ep in results:
                tried += 1
                solved += int(ok)
                if ok and len(kept) < episodes:
                    kept.append((s, ep))
                tick(len(kept), tried)
    for fut in running:  # started before the last success came in: not needed
        fut.cancel()
    kept.sort(key=lambda x: x[0])
    return kept, tried, solved, render


_WORKER_ENVS: dict[tuple, LiberoEnv] = {}  # per worker process: environments are slow to build


def _sampled_worker(job: tuple) -> tuple[list[tuple[int, bool, Episode | None]], dict]:
    """In a worker process: record the expert from the sampled initial state of each seed;
    also this job's render counts (frustum culling)."""
    suite, task_id, resolution, cameras, msaa, seeds, params = job
    key = (suite, task_id, resolution, cameras, msaa)
    if key not in _WORKER_ENVS:
        from vlatune.sim.render import one_render_thread

        one_render_thread()
        _WORKER_ENVS[key] = LiberoEnv(
            suite,
            task_id,
            resolution=resolution,
            cameras=cameras,
            render=True,
            hard_reset=False,
            msaa=msaa,
        )
    env = _WORKER_ENVS[key]
    before = dict(env.render_stats)
    out = []
    for seed in seeds:
        state = env.sample_init_state(seed)
        ok, ep = record_replay(env, state, None, init_is_state=True, params=params, noise_seed=seed)
        ep.meta["init_seed"] = seed
        out.append((seed, ok, ep if ok else None))
    return out, {k: v - before.get(k, 0) for k, v in env.render_stats.items()}


def synthesize_sampled(
    suite: str,
    task_id: int | Sequence[int],
    episodes: int,
    out: str | Path,
    resolution: int = 128,
    cameras: Sequence[str] = ("agentview", "wrist"),
    workers: int = 2,
    seed: int = 0,
    params: ExpertParams | None = None,
    progress: Callable[[int, int], None] | None = None,
    msaa: int | None = None,
) -> dict[str, Any]:
    """`episodes` successful expert demonstrations of each task (one index or several) from
    *sampled* initial states, recorded directly while the expert acts, in `workers` processes.
    The i-th task listed uses seeds seed*10000 + i*1000 + k (so one task's recording does not
    depend on the tasks beside it, and a single task's is what it always was). None of LIBERO's
    50 fixed init states is used, so all of them stay held out for evaluation. Each demo stores
    its initial MuJoCo state (`init_state`) and seed. `progress(kept, tried)` counts over all
    tasks. `msaa`: the renderer's anti-aliasing samples (`LiberoEnv`; None: LIBERO's 4x)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    out = Path(out)
    task_ids = [task_id] if isinstance(task_id, int) else list(task_id)
    if out.exists():
        raise DataError(
            "destination already exists; choose a new folder (nothing was written)", file=out
        )
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    if not task_ids or len(set(task_ids)) != len(task_ids):
        raise ValueError(f"tasks must be distinct task indices, at least one; got {task_ids}")
    t_start = time.perf_counter()
    workers = max(1, workers)
    counts = [0, 0]  # kept, tried over all tasks, for `progress`

    def tick(kept: int, tried: int) -> None:
        if progress is not None:
            progress(counts[0] + kept, counts[1] + tried)

    ctx = mp.get_context("forkserver")
    task_reports: dict[str, Any] = {}
    with atomic_dir(out, overwrite=False) as tmp:
        writer = LiberoHDF5Writer(tmp, image_orientation="raw")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for i, tid in enumerate(task_ids):
                first = seed * 10_000 + i * 1_000
                kept, tried, solved, render = _record_task(
                    pool, workers, (suite, tid, resolution, tuple(cameras), msaa, params),
                    episodes, first, tick,
                )  # fmt: skip
                counts[0] += len(kept)
                counts[1] += tried
                env_probe = get_task(suite, tid)
                writer.file_attrs[env_probe.name] = task_file_attrs(
                    env_probe, "Libero_Tabletop_Manipulation"
                )
                for _, ep in kept:
                    writer.add(ep)
                if not kept:
                    writer.close()
                    raise DataError(
                        f"the scripted expert solved none of {tried} sampled initial states of "
                        f"{suite} task {tid}",
                        file=out,
                    )
                task_reports[env_probe.name] = {
                    "task_id": tid,
                    "instruction": env_probe.instruction,
                    "kept": len(kept),
                    "tried": tried,
                    "solved": solved,
                    "expert_success_rate": solved / tried if tried else 0.0,
                    "init_seeds": [s for s, _ in kept],
                    "mean_steps": float(np.mean([ep.length for _, ep in kept])),
                    # renders that hid geoms out of view, and those drawn whole (and why)
                    "frustum_culling": render,
                }
        writer.close()
        report = {
            "suite": suite,
            "resolution": resolution,
            "cameras": list(cameras),
            # offscreen anti-aliasing samples; null: the model's own (MuJoCo's 4, as LIBERO)
            "msaa": msaa,
            "init": "sampled",
            "expert": dataclasses.asdict(params or ExpertParams()),  # what recorded these demos
            "tasks": task_reports,
            "episodes": counts[0],
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        (tmp / "synth_report.json").write_text(json.dumps(report, indent=2))
    return report

"""One LIBERO task environment in vlatune's conventions, reused across episodes.

Observations come out upright (both cameras), with the 8-d state and the instruction; actions go
in the env convention (7-d, gripper -1 open / +1 close). `reset(i)` restores fixed initial state
`i % 50` and runs the 10 settle steps, as every peer evaluation does. Creating the environment
costs 8-16 s on CPU, so keep one per task and call `reset` for each episode.

    >>> env = LiberoEnv("libero_object", task_id=0, resolution=128)
    >>> obs = env.reset(0)
    >>> obs, success, info = env.step(np.zeros(7))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlatune import keys
from vlatune.conventions import (
    ACTION_DIM,
    CAMERAS,
    NUM_STEPS_WAIT,
    SETTLE_ACTION,
    SUITES,
    libero_state,
    resolve_suite,
    to_upright,
)
from vlatune.sim.setup import import_libero, load_init_states


@dataclass(frozen=True)
class LiberoTask:
    suite: str
    task_id: int
    name: str
    instruction: str  # the prompt peers use: LIBERO's task.language, from the task's file name
    bddl_instruction: (
        str  # the BDDL's own wording, which differs for some tasks ("pick" vs "pick up")
    )
    bddl_file: Path
    init_states_file: Path


def get_task(suite: str, task_id: int) -> LiberoTask:
    """Task `task_id` of `suite` in the standard order (LIBERO's task_order_index=0)."""
    suite = resolve_suite(suite)
    libero_pkg = import_libero()
    from libero.libero.benchmark import task_maps
    from libero.libero.benchmark.libero_suite_task_map import libero_task_map

    names = libero_task_map[suite]
    if not 0 <= task_id < len(names):
        raise ValueError(f"{suite} has tasks 0..{len(names) - 1}; got task {task_id}")
    name = names[task_id]
    root = Path(os.path.dirname(libero_pkg.__file__))
    bddl = root / "bddl_files" / suite / f"{name}.bddl"
    from libero.libero.envs.bddl_utils import get_problem_info

    return LiberoTask(
        suite=suite,
        task_id=task_id,
        name=name,
        # openvla-oft, openpi and LeRobot's LIBERO datasets all prompt with task.language
        instruction=task_maps[suite][name].language,
        bddl_instruction=get_problem_info(str(bddl))["language_instruction"],
        bddl_file=bddl,
        init_states_file=root / "init_files" / suite / f"{name}.pruned_init",
    )


class LiberoEnv:
    """A LIBERO task at a chosen resolution, observations in vlatune's convention."""

    def __init__(
        self,
        suite: str,
        task_id: int,
        resolution: int = 256,
        cameras: Sequence[str] = ("agentview", "wrist"),
        seed: int = 0,
        render: bool = True,
        hard_reset: bool = True,
        msaa: int | None = None,
        cull: bool = True,
    ):
        """`hard_reset=False` resets episodes without rebuilding the MuJoCo model (0.3 s instead
        of 1.8 s here), for recording demonstrations. LIBERO's own evaluation rebuilds it
        (robosuite `hard_reset=True`, the default here). A soft reset leaves the gripper's
        command smoothing state from the previous episode behind; it is cleared, and the
        observations then match a hard reset's exactly (tested).

        `msaa`: samples of the offscreen multisample anti-aliasing. None keeps the model's
        setting (MuJoCo's 4, what LIBERO's images and every evaluation here use); 0 renders
        without it, about 40% less render time on a CPU, edges aliased (about 14% of the pixels
        of a 128-px image differ, mean 1.7 of 255): `vlatune demo --msaa 0`, opt-in (a policy
        trained on such frames kept less margin, docs/demo.md).

        `cull`: hide, for each camera image, the geoms wholly outside that camera's view
        (`vlatune.sim.render.FrustumCulling`): the same pixels (tested), the wrist image about
        25% cheaper. Counts in `render_stats`."""
        if msaa is not None and msaa < 0:
            raise ValueError(f"msaa must be None or >= 0 samples, got {msaa}")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; valid: {sorted(CAMERAS)}")
        self.task = get_task(suite, task_id)
        self.suite = self.task.suite
        self.max_steps = SUITES[self.suite].max_steps
        self.resolution = resolution
        self.cameras = tuple(cameras) if render else ()
        self.seed = seed
        self.init_states = load_init_states(self.task.init_states_file)
        from libero.libero.envs import OffScreenRenderEnv

        kwargs: dict[str, Any] = {"bddl_file_name": str(self.task.bddl_file)}
        if render:
            kwargs.update(
                camera_names=[CAMERAS[c] for c in self.cameras],
                camera_heights=resolution,
                camera_widths=resolution,
            )
        else:
            kwargs.update(use_camera_obs=False, has_offscreen_renderer=False)
        self._env = OffScreenRenderEnv(**kwargs)
        self._env.seed(seed)
        self.hard_reset = hard_reset
        self._env.env.hard_reset = hard_reset
        self.last_raw: dict[str, Any] | None = None
        self._rendering = bool(self.cameras)
        self.msaa = msaa
        self.cull = cull
        self.render_stats: dict[str, int] = {}
        self._apply_render_options()

    def _apply_render_options(self) -> None:
        """Give the offscreen render context `self.msaa` samples and frustum culling (a hard
        reset builds a new simulator and context: applied again after each)."""
        ctx = getattr(self.sim.sim, "_render_context_offscreen", None) if self.cameras else None
        if ctx is None:
            return
        if self.cull:
            from vlatune.sim.render import FrustumCulling

            FrustumCulling.install(self.sim.sim, self.render_stats)
        if self.msaa is None:
            return
        if getattr(ctx, "_vlatune_msaa", None) == self.msaa:
            return
        quality = ctx.model._model.vis.quality
        if quality.offsamples != self.msaa:
            quality.offsamples = self.msaa
            ctx.gl_ctx.make_current()
            ctx.con.free()
            ctx._set_mujoco_context_and_buffers()  # robosuite's own rebuild (as on a resize)
        ctx._vlatune_msaa = self.msaa

    def set_rendering(self, on: bool) -> None:
        """Render the cameras for the following steps and restores, or not.

        Rendering dominates simulation cost here (software GL: ~56 ms per camera image, physics
        and control 16.5 ms per step; benchmarks/eval_throughput.py), and a policy that
        replans every K steps only looks at every K-th observation. Switching robosuite's
        camera observables off skips their renders; their sampling clock stops with them and
        restarts in the same phase, so a rendered step returns exactly the image it returns
        with the cameras always on (tested). An observation from a step without rendering has
        no images."""
        on = bool(on) and bool(self.cameras)
        if on == self._rendering:
            return
        for c in self.cameras:
            self.sim.modify_observable(f"{CAMERAS[c]}_image", "enabled", on)
        self._rendering = on

    @property
    def instruction(self) -> str:
        return self.task.instruction

    @property
    def sim(self):
        """The underlying robosuite environment (privileged state: scripted expert, tests)."""
        return self._env.env

    def observation(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw robosuite observations -> {images (upright), state (8,), instruction}."""
        images = {
            c: to_upright(raw[f"{CAMERAS[c]}_image"])
            for c in self.cameras
            if f"{CAMERAS[c]}_image" in raw
        }
        return {
            keys.IMAGES: images,
            keys.STATE: libero_state(raw),
            keys.INSTRUCTION: self.instruction,
        }

    def restore(self, init_index: int, render: bool = True) -> dict[str, Any]:
        """Reset and set fixed initial state `init_index % N` (no settle steps)."""
        return self.restore_state(self.init_states[init_index % len(self.init_states)], render)

    def restore_state(self, state: np.ndarray, render: bool = True) -> dict[str, Any]:
        """Reset and set a flattened MuJoCo state (a demo's `init_state`), no settle steps."""
        self.set_rendering(render)
        self._reset()
        raw = self._env.set_init_state(np.asarray(state, dtype=np.float64))
        self.last_raw = raw
        return self.observation(raw)

    def sample_init_state(self, seed: int, joint_noise: float = 0.02) -> np.ndarray:
        """A new initial state like LIBERO's 50 fixed ones: objects placed in the task's BDDL
        regions by the env's sampler, arm joints perturbed with Gaussian noise of `joint_noise`
        rad (LIBERO's fixed states show a 0.02 rad spread per arm joint; robosuite's reset
        alone adds none). Demonstrations from sampled states leave all 50 benchmark states held
        out for evaluation."""
        self._env.seed(seed)
        self.set_rendering(False)
        self._reset()
        sim = self.sim.sim
        robot = self.sim.robots[0]
        idx = robot._ref_joint_pos_indexes
        rng = np.random.default_rng([seed, 7])
        sim.data.qpos[idx] = sim.data.qpos[idx] + rng.normal(0.0, joint_noise, len(idx))
        sim.forward()
        state = np.asarray(sim.get_state().flatten(), dtype=np.float64)
        self._env.seed(self.seed)
        return state

    def _reset(self) -> None:
        if not self.hard_reset:  # what a rebuilt gripper model would start from
            for robot in self.sim.robots:
                if robot.has_gripper:
                    robot.gripper.current_action = np.zeros(robot.gripper.dof)
        self._env.reset()
        self._apply_render_options()

    def settle(self, steps: int = NUM_STEPS_WAIT, render: bool = True) -> dict[str, Any]:
        """The dummy steps peers run after set_init_state so objects come to rest; with
        `render`, only the last one renders (the observation returned)."""
        obs = None
        for i in range(steps):
            obs, _, _ = self.step(SETTLE_ACTION, render=render and i == steps - 1)
        return obs if obs is not None else self.observation(self.last_raw)

    def reset(self, init_index: int, render: bool = True) -> dict[str, Any]:
        """Restore initial state `init_index` and run the settle steps: the first policy input."""
        steps = NUM_STEPS_WAIT
        self.restore(init_index, render=render and steps == 0)
        return self.settle(steps, render=render)

    def step(
        self, action: np.ndarray, render: bool = True
    ) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        """One 20 Hz control step. Returns (observation, success, info); the observation has
        images only with `render` (see `set_rendering`)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(
                f"LIBERO actions are {ACTION_DIM}-d (env convention); got shape {action.shape}"
            )
        self.set_rendering(render)
        raw, _reward, done, info = self._env.step(action)
        self.last_raw = raw
        return self.observation(raw), bool(done), info

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

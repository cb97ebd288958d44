"""A scripted pick-and-place expert from privileged simulator state (object and target poses).

For LIBERO tasks of the form "pick up X and place it in/on Y" (libero_object, libero_spatial):
the task's `obj_of_interest` names X and Y; heights come from each object's collision geometry.
OSC_POSE delta actions from a proportional controller, `a[:3] = clip(gain * (goal - eef), -1, 1)`,
no rotation, through the phases approach (above X) -> descend -> close -> lift -> carry (above
Y) -> lower -> release. Used to synthesise demonstrations (`vlatune sim synth`) and as the
`scripted` policy of `vlatune eval`. It reads the simulator, so it is not a learned policy and
its success rate says nothing about one.

    >>> expert = ScriptedExpert(env)        # env: vlatune.sim.env.LiberoEnv
    >>> obs = env.reset(0); expert.reset()
    >>> action = expert.act()               # (7,) env convention
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlatune.conventions import GRIPPER_CLOSE_ENV, GRIPPER_OPEN_ENV


class UnsupportedTask(ValueError):
    """The scripted expert has no strategy for this task."""


@dataclass
class ExpertParams:
    gain: float = 10.0
    approach_height: float = 0.10  # above the grasp point
    grasp_depth: float = 0.035  # grasp this far below the object's top (capped at mid-height)
    close_steps: int = 12
    lift_clearance: float = 0.12  # carried object's bottom this far above the target's top
    place_clearance: float = (
        0.03  # release with the object's bottom this far above the target's top
    )
    release_steps: int = 20
    release_rise: float = 0.002
    tolerance: float = 0.008
    max_grip_width: float = 0.075  # wider objects are grasped by their rim
    rim_inset: float = 0.008  # rim grasp: this far inside the object's outer edge
    rim_depth: float = 0.02  # rim grasp: this far below the top
    phase_timeout: int = 80
    # DART-style noise injection (Laskey et al. 2017): the env executes the expert's action plus
    # Gaussian noise of this std on x, y, z, the dataset records the expert's clean action; the
    # closed-loop expert then demonstrates recoveries from the perturbed states a learned policy
    # drifts into. 0: none.
    noise: float = 0.0


def object_z_extent(sim_env, name: str) -> tuple[float, float]:
    """World z range (bottom, top) of an object's collision geoms."""
    lo, hi = object_extent(sim_env, name)
    return float(lo[2]), float(hi[2])


def object_extent(sim_env, name: str) -> tuple[np.ndarray, np.ndarray]:
    """World axis-aligned box (low xyz, high xyz) of an object's collision geoms."""
    obj = sim_env.objects_dict.get(name) or sim_env.fixtures_dict.get(name)
    if obj is None:
        raise UnsupportedTask(f"object '{name}' not found in the scene")
    m, d = sim_env.sim.model._model, sim_env.sim.data._data
    root = m.body(obj.root_body).id
    lows, highs = [], []
    for g in range(m.ngeom):
        b = m.geom_bodyid[g]
        while b not in (0, root):
            b = m.body_parentid[b]
        if b != root or m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0:
            continue
        half = m.geom_aabb[g][3:]
        R = d.geom_xmat[g].reshape(3, 3)
        center = d.geom_xpos[g] + R @ m.geom_aabb[g][:3]
        ext = np.abs(R) @ half
        lows.append(center - ext)
        highs.append(center + ext)
    if not lows:
        raise UnsupportedTask(f"object '{name}' has no collision geometry")
    return np.min(lows, axis=0), np.max(highs, axis=0)


class ScriptedExpert:
    PHASES = ("approach", "descend", "close", "lift", "carry", "lower", "release", "done")

    def __init__(self, env, params: ExpertParams | None = None):
        self.env = env
        self.p = params or ExpertParams()
        names = list(getattr(env.sim, "obj_of_interest", []))
        if len(names) != 2 or not env.instruction.startswith(("pick up", "pick")):
            raise UnsupportedTask(
                f"the scripted expert handles 'pick up X and place it in/on Y' tasks; "
                f"{env.suite} task {env.task.task_id} is '{env.instruction}'"
            )
        self.obj, self.target = names
        self.reset()

    def reset(self) -> None:
        self.phase = "approach"
        self.t_phase = 0
        self.goal: np.ndarray | None = None
        self._grasp_offset: float | None = None
        self._obj_height: float | None = None

    def _pos(self, name: str) -> np.ndarray:
        return np.asarray(self.env.last_raw[f"{name}_pos"], dtype=np.float64)

    def _next(self, phase: str) -> None:
        self.phase, self.t_phase, self.goal = phase, 0, None

    def act(self) -> np.ndarray:
        raw = self.env.last_raw
        eef = np.asarray(raw["robot0_eef_pos"], dtype=np.float64)
        p = self.p
        obj = self._pos(self.obj)
        if self._grasp_offset is None:
            lo, hi = object_extent(self.env.sim, self.obj)
            bottom, top = float(lo[2]), float(hi[2])
            height = top - bottom
            grasp_z = (
                max(top - p.grasp_depth, bottom + 0.5 * height)
                if height > 2 * p.grasp_depth
                else bottom + 0.5 * height
            )
            # fingers close along world y (the hand points down, rotated 180 degrees about x);
            # an object wider than the opening (a bowl) is pinched by its wall on the -y side
            self._xy_offset = np.zeros(2)
            half_y = 0.5 * float(hi[1] - lo[1])
            if (
                min(hi[0] - lo[0], hi[1] - lo[1]) > p.max_grip_width
            ):  # round and wide, not a rotated box
                center = 0.5 * (lo[:2] + hi[:2])
                self._xy_offset = center - obj[:2] + np.array([0.0, -(half_y - p.rim_inset)])
                grasp_z = top - p.rim_depth
            self._grasp_offset = grasp_z - obj[2]  # relative to the object's origin, which moves
            self._bottom_offset = bottom - obj[2]
            self._obj_height = height
            t_bottom, t_top = object_z_extent(self.env.sim, self.target)
            self._target_top_offset = t_top - self._pos(self.target)[2]
        grasp = obj + np.array([*self._xy_offset, self._grasp_offset])
        # carry so the object's origin, not the grasp point, ends above the target's
        target = self._pos(self.target) + np.array([*self._xy_offset, 0.0])
        target_top = target[2] + self._target_top_offset
        # the eef sits this far above the held object's bottom
        hold = self._grasp_offset - self._bottom_offset
        gripper = GRIPPER_OPEN_ENV
        if self.phase == "approach":
            goal = grasp + np.array([0, 0, p.approach_height])
            done = np.linalg.norm(goal - eef) < 2 * p.tolerance
        elif self.phase == "descend":
            goal = grasp
            done = np.linalg.norm(goal - eef) < p.tolerance
        elif self.phase == "close":
            goal, gripper = grasp, GRIPPER_CLOSE_ENV
            done = self.t_phase >= p.close_steps
        elif self.phase == "lift":
            z = target_top + p.lift_clearance + hold
            goal, gripper = np.array([eef[0], eef[1], max(z, eef[2])]), GRIPPER_CLOSE_ENV
            done = eef[2] > z - 2 * p.tolerance
        elif self.phase == "carry":
            z = target_top + p.lift_clearance + hold
            goal, gripper = np.array([target[0], target[1], z]), GRIPPER_CLOSE_ENV
            done = np.linalg.norm((goal - eef)[:2]) < p.tolerance
        elif self.phase == "lower":
            z = target_top + p.place_clearance + hold
            goal, gripper = np.array([target[0], target[1], z]), GRIPPER_CLOSE_ENV
            done = np.linalg.norm(goal - eef) < 1.5 * p.tolerance
        elif self.phase == "release":
            # rise 1 mm a step while opening: a still robot would make these steps no-ops, which
            # regeneration (and OFT-style training data) drops, and the release would never happen
            goal, gripper = eef + np.array([0.0, 0.0, p.release_rise]), GRIPPER_OPEN_ENV
            done = self.t_phase >= p.release_steps
        else:  # done: move up and away, gripper open
            goal, gripper, done = eef + np.array([0, 0, 0.05]), GRIPPER_OPEN_ENV, False
        self.t_phase += 1
        if (done or self.t_phase > p.phase_timeout) and self.phase != "done":
            self._next(self.PHASES[self.PHASES.index(self.phase) + 1])
        action = np.zeros(7)
        action[:3] = np.clip(p.gain * (goal - eef), -1.0, 1.0)
        action[6] = gripper
        return action


def run_expert_episode(
    env, init_index: int, max_steps: int | None = None, params: ExpertParams | None = None
):
    """One episode from init state `init_index` (after the settle steps). Returns
    (success, actions (T, 7), steps). The settle steps are not part of the returned actions."""
    expert = ScriptedExpert(env, params)
    env.reset(init_index)
    limit = max_steps or env.max_steps
    actions = []
    success = False
    for _ in range(limit):
        a = expert.act()
        actions.append(a)
        _, success, _ = env.step(a)
        if success:
            break
    return success, np.asarray(actions), len(actions)

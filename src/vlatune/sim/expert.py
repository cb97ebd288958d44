"""A scripted pick-and-place expert from privileged simulator state (object and target poses).

For LIBERO tasks of the form "pick up X and place it in/on Y" (libero_object, libero_spatial):
the task's `obj_of_interest` names X and Y; heights come from each object's collision geometry.
OSC_POSE delta actions from a proportional controller, `a[:3] = clip(gain * (goal - eef), -1, 1)`,
no rotation, through the phases approach (above X) -> descend -> close -> lift -> carry (above
Y) -> lower -> release (with `descend_radius` > 0, carry and lower are one funnel-shaped
motion). Used to synthesise demonstrations (`vlatune sim synth`) and as the `scripted` policy
of `vlatune eval`. It reads the simulator, so it is not a learned policy and
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
    # turn the hand about the vertical (up to 90 degrees) when, grasping straight, it would hit
    # a neighbouring object taller than the grasp point; the grasped object must still fit
    # between the fingers. 0: never turn.
    max_yaw_deg: float = 90.0
    hand_clearance: float = 0.01  # wanted gap between the hand and a neighbour (m)
    # DART-style noise injection (Laskey et al. 2017): the env executes the expert's action plus
    # Gaussian noise of this std on x, y, z, the dataset records the expert's clean action; the
    # closed-loop expert then demonstrates recoveries from the perturbed states a learned policy
    # drifts into. 0: none.
    noise: float = 0.0
    # carry and lower as one funnel (> 0, m): within this xy distance of the spot above the
    # target the hand's height goal falls linearly with the distance, from the carry height to
    # the release height at a third of it, where it releases (2 cm for 0.06: inside a basket's
    # opening, on a plate); the expert's action is then a continuous function of where the hand
    # is, and the DART noise does not keep it hovering for an exact spot. 0: carry at
    # height until within `tolerance` of the spot, then lower (a jump from ~0 to full speed down
    # that a learned policy must time from pixels: it learned to hover there, issue 19).
    descend_radius: float = 0.0
    # DART noise during the descend and close phases, as a multiple of `noise` (>= 0). With noise
    # of ~1 cm a step the close criterion (within `tolerance` of the grasp point) becomes a wait:
    # the expert hovers 20-80 steps and closes 2-12 mm above the point. Without noise there it
    # descends in 18 steps and closes 6-8 mm above the point every time, yet a policy trained on
    # such demos drifts off in xy during its descent and lands on the object's top: recording
    # seed 1 gave 2/20 with 0, 7/20 with 0.5, 17/20 with 1 at the last checkpoint (docs/demo.md,
    # session 12). The recoveries the noise demonstrates in the grasp are needed; more than 1 is
    # not measured yet. 1 (the same noise throughout) is the demo's setting.
    grasp_noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.descend_radius < 0 or self.noise < 0:
            raise ValueError(
                f"ExpertParams: descend_radius ({self.descend_radius}) and noise ({self.noise}) "
                "must be >= 0 (0 turns each off)"
            )
        if self.grasp_noise_scale < 0:
            raise ValueError(
                f"ExpertParams: grasp_noise_scale ({self.grasp_noise_scale}) must be >= 0 "
                "(a multiple of `noise` during the descend and close phases)"
            )


def object_z_extent(sim_env, name: str) -> tuple[float, float]:
    """World z range (bottom, top) of an object's collision geoms."""
    lo, hi = object_extent(sim_env, name)
    return float(lo[2]), float(hi[2])


def object_extent(sim_env, name: str) -> tuple[np.ndarray, np.ndarray]:
    """World axis-aligned box (low xyz, high xyz) of an object's collision geoms."""
    obj = sim_env.objects_dict.get(name) or sim_env.fixtures_dict.get(name)
    if obj is None:
        raise UnsupportedTask(f"object '{name}' not found in the scene")
    m = sim_env.sim.model._model
    root = m.body(obj.root_body).id
    return _geoms_extent(sim_env, name, _body_geoms(m, root))


def _body_geoms(m, root: int) -> list[int]:
    """Collision geoms of body `root` and its descendants."""
    out = []
    for g in range(m.ngeom):
        b = m.geom_bodyid[g]
        while b not in (0, root):
            b = m.body_parentid[b]
        if b == root and not (m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0):
            out.append(g)
    return out


def _geoms_extent(sim_env, name: str, geoms: list[int]) -> tuple[np.ndarray, np.ndarray]:
    m, d = sim_env.sim.model._model, sim_env.sim.data._data
    lows, highs = [], []
    for g in geoms:
        half = m.geom_aabb[g][3:]
        R = d.geom_xmat[g].reshape(3, 3)
        center = d.geom_xpos[g] + R @ m.geom_aabb[g][:3]
        ext = np.abs(R) @ half
        lows.append(center - ext)
        highs.append(center + ext)
    if not lows:
        raise UnsupportedTask(f"object '{name}' has no collision geometry")
    return np.min(lows, axis=0), np.max(highs, axis=0)


def _separation(poly: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Gap (m) between a convex polygon (k, 2) and an axis-aligned rectangle in the plane, by
    separating axes: > 0 apart (a lower bound of the distance), <= 0 overlapping."""
    box = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    edges = np.roll(poly, -1, axis=0) - poly
    axes = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    axes += [np.array([-e[1], e[0]]) / (np.linalg.norm(e) + 1e-12) for e in edges]
    best = -np.inf
    for ax in axes:
        p, q = poly @ ax, box @ ax
        best = max(best, q.min() - p.max(), p.min() - q.max())
    return float(best)


def _yaw(quat_xyzw: np.ndarray) -> float:
    """Heading of the hand's x axis in the world's horizontal plane (rad)."""
    x, y, z, w = quat_xyzw
    return float(np.arctan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z)))


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
        self.yaw: float = 0.0  # chosen hand turn about the vertical for the grasp (rad)
        self._carry_z: float | None = None
        self._yaw0: float | None = None
        self.acted_in: str | None = None  # the phase of the last action (noise_std)

    def _pos(self, name: str) -> np.ndarray:
        return np.asarray(self.env.last_raw[f"{name}_pos"], dtype=np.float64)

    def noise_std(self) -> float:
        """DART noise std for the action `act` just returned (`noise`, scaled in the grasp)."""
        grasping = self.acted_in in ("descend", "close")
        return self.p.noise * (self.p.grasp_noise_scale if grasping else 1.0)

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
            # an object wider than the opening (a bowl) is pinched by its wall
            rim = min(hi[0] - lo[0], hi[1] - lo[1]) > p.max_grip_width  # round and wide
            if rim:
                grasp_z = top - p.rim_depth
            self._yaw0 = _yaw(np.asarray(raw["robot0_eef_quat"], dtype=np.float64))
            xy, self.yaw = self._choose_grasp(lo, hi, obj[:2], grasp_z, eef, rim)
            self._xy_offset = xy - obj[:2]
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
        turn = 0.0
        if self.yaw:  # angle still to turn (rad), wrapped to [-pi, pi)
            now = _yaw(np.asarray(raw["robot0_eef_quat"], dtype=np.float64))
            turn = (self._yaw0 + self.yaw - now + np.pi) % (2 * np.pi) - np.pi
        if self.phase == "approach":
            goal = grasp + np.array([0, 0, p.approach_height])
            done = np.linalg.norm(goal - eef) < 2 * p.tolerance and abs(turn) < np.radians(3)
        elif self.phase == "descend":
            goal = grasp
            done = np.linalg.norm(goal - eef) < p.tolerance
        elif self.phase == "close":
            goal, gripper = grasp, GRIPPER_CLOSE_ENV
            done = self.t_phase >= p.close_steps
        elif self.phase == "lift":
            if self._carry_z is None:  # clear the target, and what the object stood on
                self._carry_z = max(target_top + p.lift_clearance + hold, eef[2] + p.lift_clearance)
            z = self._carry_z
            goal, gripper = np.array([eef[0], eef[1], max(z, eef[2])]), GRIPPER_CLOSE_ENV
            done = eef[2] > z - 2 * p.tolerance
        elif self.phase == "carry" and p.descend_radius > 0:
            z_low = target_top + p.place_clearance + hold
            d = float(np.linalg.norm((target - eef)[:2]))
            inner = p.descend_radius / 3  # fully lowered (and released) within this
            f = np.clip((d - inner) / (p.descend_radius - inner), 0.0, 1.0)
            goal = np.array([target[0], target[1], z_low + f * (self._carry_z - z_low)])
            gripper = GRIPPER_CLOSE_ENV
            done = d < inner and eef[2] - z_low < 2 * p.tolerance
        elif self.phase == "carry":
            z = self._carry_z
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
        self.acted_in = self.phase  # the phase whose goal gave this action (noise_std)
        self.t_phase += 1
        funnel = self.phase == "carry" and p.descend_radius > 0  # carries and lowers: skip lower
        timeout = (2 if funnel else 1) * p.phase_timeout
        if (done or self.t_phase > timeout) and self.phase != "done":
            self._next("release" if funnel else self.PHASES[self.PHASES.index(self.phase) + 1])
        action = np.zeros(7)
        action[:3] = np.clip(p.gain * (goal - eef), -1.0, 1.0)
        # OSC_POSE: a[5] = 1 asks for 0.5 rad about the world's z axis; half the error a step
        action[5] = np.clip(turn, -1.0, 1.0)
        action[6] = gripper
        return action

    def _choose_grasp(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        origin: np.ndarray,
        grasp_z: float,
        eef: np.ndarray,
        rim: bool,
    ) -> tuple[np.ndarray, float]:
        """Where (world xy) and with which turn of the hand about the vertical (rad) to grasp.

        A box or bottle is grasped at its origin, the hand straight, unless the hand lowered
        there would come closer than `hand_clearance` to a neighbour rising above the grasp
        point: then the turn (multiples of 15 degrees, up to `max_yaw_deg`) that keeps the most
        room and still fits the object between the fingers. A bowl (wider than the opening) is
        pinched by its wall, on the side (-y, +y with the hand straight; -x, +x turned 90
        degrees) nearest the robot's base among those with room for the hand (the arm need not
        reach across the bowl: a bowl standing high and far to the side, on the cabinet, is
        out of the straight hand's comfortable reach on its far wall); when every side is
        crowded, the side with the most room."""
        p = self.p
        center, half = 0.5 * (lo[:2] + hi[:2]), 0.5 * (hi[:2] - lo[:2])
        room = self._room_fn(grasp_z, eef)
        if rim:
            wall = half - p.rim_inset
            sides = [(np.array([0.0, -wall[1]]), 0.0), (np.array([0.0, wall[1]]), 0.0)]
            if p.max_yaw_deg >= 90:
                sides += [
                    (np.array([-wall[0], 0.0]), np.pi / 2),
                    (np.array([wall[0], 0.0]), np.pi / 2),
                ]
            sim_env = self.env.sim
            m, d = sim_env.sim.model._model, sim_env.sim.data._data
            base = d.xpos[m.body(sim_env.robots[0].robot_model.root_body).id][:2]
            free = [sd for sd in sides if room(center + sd[0], sd[1]) >= p.hand_clearance]
            if free:
                xy, yaw = min(free, key=lambda sd: float(np.linalg.norm(center + sd[0] - base)))
            else:
                xy, yaw = max(sides, key=lambda sd: room(center + sd[0], sd[1]))
            return center + xy, yaw
        size = hi[:2] - lo[:2]

        def fits(yaw: float) -> bool:
            return abs(size[0] * np.sin(yaw)) + abs(size[1] * np.cos(yaw)) <= p.max_grip_width

        straight = room(origin, 0.0)
        if straight >= p.hand_clearance or not fits(0.0) or p.max_yaw_deg <= 0:
            return origin.copy(), 0.0
        steps = int(p.max_yaw_deg // 15)
        candidates = [np.radians(15 * k * sgn) for k in range(1, steps + 1) for sgn in (1, -1)]
        scored = [(room(origin, y), -abs(y), y) for y in candidates if fits(y)]
        best = max(scored, default=None)
        yaw = float(best[2]) if best is not None and best[0] > straight else 0.0
        return origin.copy(), yaw

    def _room_fn(self, grasp_z: float, eef: np.ndarray):
        """room(xy, yaw): the gap (m) between the hand's footprint, lowered at xy turned by
        yaw, and the nearest neighbour rising above the grasp point (inf: none)."""
        sim_env = self.env.sim
        m = sim_env.sim.model._model
        gripper = sim_env.robots[0].gripper
        hand_lo, hand_hi = _geoms_extent(
            sim_env, "gripper", _body_geoms(m, m.body(gripper.root_body).id)
        )
        hand = (
            np.array(  # footprint corners around the eef, world axes, the hand as it starts
                [
                    [hand_lo[0], hand_lo[1]],
                    [hand_hi[0], hand_lo[1]],
                    [hand_hi[0], hand_hi[1]],
                    [hand_lo[0], hand_hi[1]],
                ]
            )
            - eef[:2]
        )
        obstacles = []
        for name in [*sim_env.objects_dict, *sim_env.fixtures_dict]:
            if name == self.obj:
                continue
            # an object as one box; a fixture (cabinet, drawer, stove) geom by geom: its walls,
            # not the box around all of it, which would also hold what stands in or on it
            if name in sim_env.fixtures_dict:
                root = m.body(sim_env.fixtures_dict[name].root_body).id
                boxes = [_geoms_extent(sim_env, name, [g]) for g in _body_geoms(m, root)]
            else:
                try:
                    boxes = [object_extent(sim_env, name)]
                except UnsupportedTask:
                    continue
            for o_lo, o_hi in boxes:
                if o_hi[2] > grasp_z + 0.005:  # rises above the fingertips at the grasp
                    obstacles.append((o_lo[:2], o_hi[:2]))

        def room(xy: np.ndarray, yaw: float) -> float:
            c, s = np.cos(yaw), np.sin(yaw)
            poly = hand @ np.array([[c, s], [-s, c]]) + xy
            return min((_separation(poly, a, b) for a, b in obstacles), default=np.inf)

        return room


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

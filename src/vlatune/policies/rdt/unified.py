"""LIBERO in RDT's 128-d unified state / action space: a readable, changeable table.

RDT (thu-ml/RoboticsDiffusionTransformer `configs/state_vec.py`) gives every physical quantity
of every robot a fixed slot in one 128-d vector, used for both the proprioceptive state and the
actions, with a 0/1 mask of the slots a dataset fills. `STATE_VEC_IDX` below is that table
(names and indices as upstream; the single arm of a one-arm robot is the "right" arm).

LIBERO (Franka Panda, OSC_POSE, 20 Hz; see `vlatune.conventions`) goes in as `LiberoUnified`
says, by default:

| LIBERO                                  | slots (names)                                  | why |
|---|---|---|
| action[0:3] delta eef position          | 39-41 `eef_vel_x/y/z`                          | a per-step delta is an end-effector velocity; RDT's delta-EEF datasets (berkeley_cable_routing, dobbe, sawyer wrist cam) fill these |
| action[3:6] delta eef axis-angle        | 42-44 `eef_angular_vel_roll/pitch/yaw`         | the same for rotation |
| action[6] gripper, -1 open / +1 close   | 10 `right_gripper_open`, 1 open / 0 closed     | RDT's gripper slot and convention (`open = (1 - g) / 2`, exactly invertible) |
| state[0:3] eef position                 | 30-32 `eef_pos_x/y/z`                          | RDT's end-effector position slots |
| state[3:6] eef axis-angle               | 33-38 `eef_angle_0..5`                         | RDT's 6-D rotation: first two columns of the rotation matrix (`rotation_matrix_to_ortho6d`) |
| state[6:8] finger qpos (+0.04, -0.04 open) | 10 `right_gripper_open`                     | RDT shares the gripper slot between state and action: `(q0 - q1) / (2 * 0.04)`, clipped to [0, 1] |

The mask is the union of the slots used (RDT has one mask per sample for the state and the
action chunk). The control frequency is LIBERO's 20 Hz (`ctrl_freq`). Images: RDT's 2 frames x 3
camera slots [exterior, right wrist, left wrist]; LIBERO fills the exterior slot with `agentview`
and the right-wrist slot with the wrist camera; the left-wrist slot and the history frame before
an episode's start are missing and, as upstream does, are given the background image (the
processor's image mean), not an attention mask (upstream passes no image mask).

Every field is a config value (`policy.unified` once the family is registered): change `action`
to put the actions elsewhere (for example into the position slots 30-35 for absolute targets).

    >>> m = LiberoUnified()
    >>> u = m.action_to_unified(actions)   # (..., 7) -> (..., 128); m.unified_to_action(u) == actions
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

STATE_VEC_LEN = 128


def _build_state_vec() -> dict[str, int]:
    idx: dict[str, int] = {}

    def run(fmt: str, start: int, n: int) -> None:
        for i in range(n):
            idx[fmt.format(i)] = start + i

    for side, off in (("right_", 0), ("left_", 50)):
        run(side + "arm_joint_{}_pos", 0 + off, 10)
        run(side + "gripper_joint_{}_pos", 10 + off, 5)
        run(side + "arm_joint_{}_vel", 15 + off, 10)
        run(side + "gripper_joint_{}_vel", 25 + off, 5)
        idx[side + "gripper_open"] = 10 + off
        idx[side + "gripper_open_vel"] = 25 + off
        for j, a in enumerate("xyz"):
            idx[f"{side}eef_pos_{a}"] = 30 + off + j
            idx[f"{side}eef_vel_{a}"] = 39 + off + j
        run(side + "eef_angle_{}", 33 + off, 6)
        for j, a in enumerate(("roll", "pitch", "yaw")):
            idx[f"{side}eef_angular_vel_{a}"] = 42 + off + j
    # Unprefixed names are the right arm's (upstream aliases).
    for k, v in list(idx.items()):
        if k.startswith("right_"):
            idx[k[len("right_") :]] = v
    idx.update(base_vel_x=100, base_vel_y=101, base_angular_vel=102)
    return idx


STATE_VEC_IDX: dict[str, int] = _build_state_vec()


class LiberoUnified(BaseModel):
    """Where LIBERO's 7-d action and 8-d state go in the 128-d vector (see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    action: list[str] = [
        "eef_vel_x", "eef_vel_y", "eef_vel_z",
        "eef_angular_vel_roll", "eef_angular_vel_pitch", "eef_angular_vel_yaw",
        "right_gripper_open",
    ]  # fmt: skip
    # The action dim holding LIBERO's gripper (-1 open / +1 close), stored as open in [0, 1];
    # None stores it unchanged.
    gripper_action_dim: int | None = 6
    state_position: list[str] = ["eef_pos_x", "eef_pos_y", "eef_pos_z"]
    state_rotation_6d: list[str] = [f"eef_angle_{i}" for i in range(6)]
    state_gripper: str | None = "right_gripper_open"
    finger_open_qpos: float = 0.04  # Panda finger joint travel: qpos (+0.04, -0.04) fully open
    ctrl_freq: float = 20.0  # vlatune.conventions.CONTROL_HZ
    camera_slots: list[str | None] = ["agentview", "wrist", None]
    img_history_size: int = 2

    @model_validator(mode="after")
    def _known(self) -> LiberoUnified:
        names = [*self.action, *self.state_position, *self.state_rotation_6d]
        names += [self.state_gripper] if self.state_gripper else []
        unknown = [n for n in names if n not in STATE_VEC_IDX]
        if unknown:
            raise ValueError(
                f"unknown unified-vector slot name(s) {unknown}: use names of RDT's "
                f"configs/state_vec.py, e.g. eef_pos_x, eef_angle_0, right_gripper_open"
            )
        slots = [STATE_VEC_IDX[n] for n in self.action]
        if len(set(slots)) != len(slots):
            raise ValueError(f"action slots {self.action} map two LIBERO dims to one index")
        if len(self.state_position) != 3 or len(self.state_rotation_6d) != 6:
            raise ValueError("state_position needs 3 names and state_rotation_6d needs 6")
        if self.gripper_action_dim is not None and not 0 <= self.gripper_action_dim < len(
            self.action
        ):
            raise ValueError(f"gripper_action_dim {self.gripper_action_dim} is not an action dim")
        return self

    # ---- indices ----
    @property
    def action_indices(self) -> list[int]:
        return [STATE_VEC_IDX[n] for n in self.action]

    @property
    def state_indices(self) -> list[int]:
        names = [*self.state_position, *self.state_rotation_6d]
        names += [self.state_gripper] if self.state_gripper else []
        return [STATE_VEC_IDX[n] for n in names]

    def mask(self) -> np.ndarray:
        """(128,) float32, 1 at every slot the state or the actions fill."""
        m = np.zeros(STATE_VEC_LEN, dtype=np.float32)
        m[self.action_indices + self.state_indices] = 1.0
        return m

    # ---- actions: exactly invertible ----
    def action_to_unified(self, action: np.ndarray) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        if a.shape[-1] != len(self.action):
            raise ValueError(f"expected LIBERO actions (..., {len(self.action)}), got {a.shape}")
        a = a.copy()
        if self.gripper_action_dim is not None:
            g = self.gripper_action_dim
            a[..., g] = (1.0 - a[..., g]) / 2.0
        out = np.zeros((*a.shape[:-1], STATE_VEC_LEN), dtype=np.float64)
        out[..., self.action_indices] = a
        return out

    def unified_to_action(self, unified: np.ndarray) -> np.ndarray:
        u = np.asarray(unified, dtype=np.float64)
        if u.shape[-1] != STATE_VEC_LEN:
            raise ValueError(f"expected unified vectors (..., {STATE_VEC_LEN}), got {u.shape}")
        a = u[..., self.action_indices].copy()
        if self.gripper_action_dim is not None:
            g = self.gripper_action_dim
            a[..., g] = 1.0 - 2.0 * a[..., g]
        return a

    # ---- state ----
    def state_to_unified(self, state: np.ndarray) -> np.ndarray:
        s = np.asarray(state, dtype=np.float64)
        if s.shape[-1] != 8:
            raise ValueError(f"expected LIBERO states (..., 8), got {s.shape}")
        out = np.zeros((*s.shape[:-1], STATE_VEC_LEN), dtype=np.float64)
        out[..., [STATE_VEC_IDX[n] for n in self.state_position]] = s[..., 0:3]
        rot = axis_angle_to_matrix(s[..., 3:6])
        six = np.concatenate([rot[..., :, 0], rot[..., :, 1]], axis=-1)  # columns a1, a2
        out[..., [STATE_VEC_IDX[n] for n in self.state_rotation_6d]] = six
        if self.state_gripper:
            opening = (s[..., 6] - s[..., 7]) / (2.0 * self.finger_open_qpos)
            out[..., STATE_VEC_IDX[self.state_gripper]] = np.clip(opening, 0.0, 1.0)
        return out


def axis_angle_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rodrigues: (..., 3) rotation vectors -> (..., 3, 3)."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1, keepdims=True)
    k = np.divide(v, theta, out=np.zeros_like(v), where=theta > 1e-12)
    K = np.zeros((*v.shape[:-1], 3, 3))
    K[..., 0, 1], K[..., 0, 2] = -k[..., 2], k[..., 1]
    K[..., 1, 0], K[..., 1, 2] = k[..., 2], -k[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -k[..., 1], k[..., 0]
    t = theta[..., None]
    eye = np.broadcast_to(np.eye(3), K.shape)
    return eye + np.sin(t) * K + (1.0 - np.cos(t)) * (K @ K)

"""Primitive movements (ECoT's MOVE field) from proprioception.

For frame t, the window [t, t + window] (4 frames, clipped at the episode's end):
- translation: the end-effector displacement, divided by the episode's largest window
  displacement (so the fastest motion of the episode has length 1); each axis whose normalised
  component exceeds `threshold` (ECoT: 0.03) names a direction;
- rotation: the relative rotation of the window as a rotation vector (radians, world frame),
  scaled by `rotation_scale` (0.1: "scaled down", rotations are noisier than translations)
  against the same threshold; pitch (about +y, positive = up) names "tilt up / down", yaw
  (about +z, positive = counterclockwise seen from above) names
  "rotate counterclockwise / clockwise"; roll is not named (as in ECoT);
- gripper: a change of the binarised gripper command within the window names "close gripper" /
  "open gripper";
- nothing above threshold: "stop".

Axis conventions (LIBERO, robosuite world frame; the robot stands at -x looking along +x):
+x = "forward" (away from the robot base), +y = "left" (the robot's left), +z = "up".
The words are joined in the order translation (forward/backward, left/right, up/down),
rotation, gripper: "move forward left up", "tilt down", "close gripper", "move up, open gripper".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AXES = (("forward", "backward"), ("left", "right"), ("up", "down"))


@dataclass
class PrimitiveParams:
    window: int = 4
    threshold: float = 0.03
    rotation_scale: float = 0.1


def _rotvecs(axis_angle: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(axis_angle)


def movement_primitives(
    eef_pos: np.ndarray,
    gripper_closed: np.ndarray,
    eef_axis_angle: np.ndarray | None = None,
    params: PrimitiveParams | None = None,
) -> list[str]:
    """One MOVE phrase per frame.

    eef_pos (T, 3) metres; gripper_closed (T,) bool (the commanded gripper, True = close);
    eef_axis_angle (T, 3) the orientation as an axis-angle vector (LIBERO's state[3:6]), or None.
    """
    p = params or PrimitiveParams()
    pos = np.asarray(eef_pos, dtype=np.float64)
    closed = np.asarray(gripper_closed, dtype=bool)
    T = len(pos)
    if T == 0:
        return []
    ends = np.minimum(np.arange(T) + p.window, T - 1)
    delta = pos[ends] - pos
    scale = np.linalg.norm(delta, axis=1).max()
    trans = delta / scale if scale > 1e-9 else np.zeros_like(delta)
    rot = np.zeros((T, 3))
    if eef_axis_angle is not None:
        R = _rotvecs(np.asarray(eef_axis_angle, dtype=np.float64))
        rot = (R[ends] * R.inv()).as_rotvec() * p.rotation_scale
    out = []
    for t in range(T):
        words = []
        moves = [
            names[0] if v > p.threshold else names[1]
            for v, names in zip(trans[t], AXES, strict=True)
            if abs(v) > p.threshold
        ]
        if moves:
            words.append("move " + " ".join(moves))
        pitch, yaw = rot[t, 1], rot[t, 2]
        if abs(pitch) > p.threshold:  # sign convention as ECoT: +pitch = "tilt up"
            words.append("tilt up" if pitch > 0 else "tilt down")
        if abs(yaw) > p.threshold:
            words.append("rotate counterclockwise" if yaw > 0 else "rotate clockwise")
        window = closed[t : ends[t] + 1]
        if window.size > 1 and window[0] != window[-1]:
            words.append("close gripper" if window[-1] else "open gripper")
        out.append(", ".join(words) if words else "stop")
    return out

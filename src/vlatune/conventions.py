"""LIBERO conventions, decided once.

Every convention that silently turns a 97% policy into a 0% one lives here and nowhere else:
suite episode lengths, settle steps, image orientation, gripper sign and the 8-d state layout.
Sources: openvla-oft `experiments/robot/libero/run_libero_eval.py` and `libero_utils.py`,
openpi `examples/libero/main.py`, LeRobot's LIBERO datasets (see ../shared/LIBERO_CONVENTIONS.md).

    >>> from vlatune.conventions import SUITES, to_upright
    >>> SUITES["libero_object"].max_steps
    280
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# What the LIBERO env produces and takes (vlatune.sim.env); a policy declares the conventions it
# expects and `vlatune eval` checks them against these before any episode.
ENV_CONVENTIONS = {
    "image_orientation": "upright",
    "gripper": "-1_open",
    "state": "libero_8d",
    "action_dim": 7,
}


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    num_tasks: int
    max_steps: int  # policy steps after the settle steps (openvla-oft / openpi standard)
    longest_demo: int


SUITES: dict[str, SuiteSpec] = {
    s.name: s
    for s in (
        SuiteSpec("libero_spatial", 10, 220, 193),
        SuiteSpec("libero_object", 10, 280, 254),
        SuiteSpec("libero_goal", 10, 300, 270),
        SuiteSpec("libero_10", 10, 520, 505),
        SuiteSpec("libero_90", 90, 400, 373),
    )
}
# Names researchers use for the suites (NORA's "long" is libero_10).
SUITE_ALIASES = {
    "spatial": "libero_spatial",
    "object": "libero_object",
    "goal": "libero_goal",
    "long": "libero_10",
    "libero_long": "libero_10",
    "10": "libero_10",
    "90": "libero_90",
}

NUM_INIT_STATES = 50  # trial i uses init_states[i % 50]
NUM_STEPS_WAIT = 10  # settle steps after set_init_state, before the policy acts
CONTROL_HZ = 20
ACTION_DIM = 7  # 3 delta pos + 3 delta axis-angle + 1 gripper, each in [-1, 1] (OSC_POSE)
STATE_DIM = 8  # eef_pos (3) + axis-angle of eef_quat (3) + gripper_qpos (2)

# Environment gripper convention (robosuite PandaGripper): -1 opens, +1 closes.
GRIPPER_OPEN_ENV = -1.0
GRIPPER_CLOSE_ENV = 1.0
# The action used during the settle steps: do nothing, keep the gripper open.
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, GRIPPER_OPEN_ENV], dtype=np.float64)

# Camera names in robosuite and the short names vlatune uses everywhere else.
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}

GripperConvention = Literal["-1_open", "1_open", "0_1_open"]

# What released models were pretrained with, converted by each family's processor (a step with
# an inverse, so training frames and predicted chunks cross the boundary once, the same way):
# - NORA (declare-lab/nora, nora-long): gripper in [0, 1], 0 = close, 1 = open: "0_1_open"
#   (NORA's own LIBERO rule, +1 close when g <= 0.5, is this one's inverse on +-1 values);
#   actions unnormalised with its norm_stats.json (q01 / q99) unless fine-tuning replaces them.
# - OpenVLA / OFT: gripper [0, 1] with 1 = open on its LIBERO data ("0_1_open" as well); its
#   processor converts with OFT's own rule (`model_gripper_to_env` / `model_gripper_from_env`
#   below: moojink/openvla-oft experiments/robot/robot_utils.py, `normalize_gripper_action`
#   with binarize=True then `invert_gripper_action`), which differs from `gripper_to_env`'s
#   threshold only at exactly 0.5 (OFT: sign(0) = 0, a zero gripper command).
# - pi0 / pi0.5: LIBERO's env convention (openpi trains on raw LIBERO actions); state and
#   actions zero-padded to 32 dims and cut back (vlatune.policies.processor.PadVector).
# - GR00T N1.5: env convention; state padded to 64, actions to 32, min-max normalised.
# - RDT-1B: the 128-d unified vector; LIBERO's gripper goes in as its joint-open fraction
#   (vlatune.policies.rdt.unified documents the indices and the mapping).
MODEL_GRIPPER: dict[str, GripperConvention] = {
    "nora": "0_1_open",
    "openvla": "0_1_open",
    "pi0": "-1_open",
    "groot": "-1_open",
}
ImageOrientation = Literal["raw", "upright"]


def resolve_suite(name: str) -> str:
    """Canonical suite name for `name` (accepts "object", "long", ...); error lists the valid ones."""
    key = name.strip().lower()
    key = SUITE_ALIASES.get(key, key)
    if key not in SUITES:
        import difflib

        valid = sorted(SUITES) + sorted(SUITE_ALIASES)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"Unknown LIBERO suite '{name}'. Valid: {', '.join(sorted(SUITES))}.{hint}"
        )
    return key


def to_upright(images: np.ndarray) -> np.ndarray:
    """Rotate raw LIBERO renders by 180 degrees (flip both image axes).

    Works on one image (H, W, C) or a stack (..., H, W, C). Raw MuJoCo/robosuite renders come out
    upside down relative to what people and pretrained VLMs expect; every OpenVLA-lineage
    evaluation applies `img[::-1, ::-1]`. The operation is its own inverse.
    """
    if images.ndim < 3:
        raise ValueError(f"expected images of shape (..., H, W, C), got {images.shape}")
    if images.dtype in _TORCH_FLIPPABLE:
        # torch's flip: one vectorised pass (numpy copies a doubly negative-strided array
        # element by element: ~20x slower on a 128 px frame); exact (a pixel permutation)
        import torch  # lazily: reading conventions must not cost torch's import

        return torch.from_numpy(np.ascontiguousarray(images)).flip(-3, -2).numpy()
    return np.ascontiguousarray(np.flip(images, axis=(-3, -2)))


_TORCH_FLIPPABLE = {
    np.dtype(t) for t in (np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64)
}


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite quaternion (x, y, z, w) to axis-angle (3,), as in robosuite's transform_utils."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return (q[:3] * 2.0 * np.arccos(q[3])) / den


def libero_state(obs: dict) -> np.ndarray:
    """The 8-d proprio state from raw robosuite observations (OFT, openpi, LeRobot, GR00T agree)."""
    return np.concatenate(
        [
            np.asarray(obs["robot0_eef_pos"], dtype=np.float64),
            quat2axisangle(obs["robot0_eef_quat"]),
            np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),
        ]
    ).astype(np.float32)


def gripper_to_env(values: np.ndarray, convention: GripperConvention) -> np.ndarray:
    """Map gripper values stored in `convention` to the env's (-1 open, +1 close).

    - "-1_open": already the env convention (raw LIBERO HDF5, openpi).
    - "1_open": +1 open, -1 close (sign flipped).
    - "0_1_open": OpenVLA/OFT training data, 1 = open, 0 = close; binarised at 0.5.
    """
    v = np.asarray(values, dtype=np.float64)
    if convention == "-1_open":
        return v
    if convention == "1_open":
        return -v
    if convention == "0_1_open":
        return np.where(v > 0.5, GRIPPER_OPEN_ENV, GRIPPER_CLOSE_ENV)
    raise ValueError(f"unknown gripper convention {convention!r}; use -1_open, 1_open or 0_1_open")


def gripper_from_env(values: np.ndarray, convention: GripperConvention) -> np.ndarray:
    """Inverse of `gripper_to_env` (for "0_1_open", -1 -> 1 and +1 -> 0)."""
    v = np.asarray(values, dtype=np.float64)
    if convention == "-1_open":
        return v
    if convention == "1_open":
        return -v
    if convention == "0_1_open":
        return np.where(v < 0, 1.0, 0.0)
    raise ValueError(f"unknown gripper convention {convention!r}; use -1_open, 1_open or 0_1_open")


# ---------------------------------------------------------------- a model family's own gripper rule
def oft_gripper_to_env(values: np.ndarray) -> np.ndarray:
    """OpenVLA / OFT's model gripper ([0, 1], 1 = open) -> the env's, exactly as OFT's LIBERO
    evaluation: `normalize_gripper_action(a, binarize=True)` (y = sign(2 g - 1)) then
    `invert_gripper_action` (y * -1), in moojink/openvla-oft experiments/robot/robot_utils.py.
    g > 0.5 -> -1 (open), g < 0.5 -> +1 (close), g == 0.5 -> 0 (numpy's sign(0))."""
    v = np.asarray(values, dtype=np.float64)
    return -np.sign(2.0 * v - 1.0)


def oft_gripper_from_env(values: np.ndarray) -> np.ndarray:
    """The env's gripper -> OpenVLA / OFT's [0, 1] (1 = open): (1 - e) / 2, the inverse of the
    affine part of `oft_gripper_to_env` (-1 -> 1, +1 -> 0). On LIBERO's +-1 actions this equals
    OpenVLA's RLDS LIBERO transform (clip to [0, 1], then 1 - g)."""
    v = np.asarray(values, dtype=np.float64)
    return (1.0 - v) / 2.0


# Families whose processors apply their released code's own rule rather than the convention's
# threshold (`gripper_to_env` / `gripper_from_env` with MODEL_GRIPPER[family]).
MODEL_GRIPPER_RULES = {"openvla": (oft_gripper_from_env, oft_gripper_to_env)}


def _model_convention(family: str) -> GripperConvention:
    if family not in MODEL_GRIPPER:
        raise ValueError(
            f"vlatune.conventions.MODEL_GRIPPER has no entry {family!r} "
            f"(known: {sorted(MODEL_GRIPPER)}); add the family's gripper convention there"
        )
    return MODEL_GRIPPER[family]


def model_gripper_to_env(values: np.ndarray, family: str) -> np.ndarray:
    """Family `family`'s predicted gripper values -> the env's (-1 open, +1 close)."""
    convention = _model_convention(family)
    if family in MODEL_GRIPPER_RULES:
        return MODEL_GRIPPER_RULES[family][1](values)
    return gripper_to_env(values, convention)


def model_gripper_from_env(values: np.ndarray, family: str) -> np.ndarray:
    """The env's gripper values -> what family `family`'s model is trained on."""
    convention = _model_convention(family)
    if family in MODEL_GRIPPER_RULES:
        return MODEL_GRIPPER_RULES[family][0](values)
    return gripper_from_env(values, convention)

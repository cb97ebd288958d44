"""LIBERO conventions on literal arrays: orientation, state layout, gripper sign, suites."""

from __future__ import annotations

import numpy as np
import pytest

from vlatune import conventions as C


def test_to_upright_rotates_180_degrees():
    img = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    # [[0,1,2],[3,4,5]] rotated by 180 degrees
    np.testing.assert_array_equal(C.to_upright(img)[..., 0], [[5, 4, 3], [2, 1, 0]])
    np.testing.assert_array_equal(C.to_upright(C.to_upright(img)), img)


def test_to_upright_on_stacks_flips_only_image_axes():
    stack = np.random.default_rng(0).integers(0, 255, (4, 5, 6, 3), dtype=np.uint8)
    out = C.to_upright(stack)
    for t in range(4):
        np.testing.assert_array_equal(out[t], stack[t][::-1, ::-1])
    assert out.flags.c_contiguous and out.dtype == np.uint8
    # uint8 RGB goes through Pillow: views, nested stacks and other dtypes agree with numpy
    view = stack[:, ::2, 1:]
    np.testing.assert_array_equal(C.to_upright(view), view[:, ::-1, ::-1])
    nested = stack.reshape(2, 2, 5, 6, 3)
    np.testing.assert_array_equal(C.to_upright(nested), nested[..., ::-1, ::-1, :])
    np.testing.assert_array_equal(C.to_upright(stack.astype(np.float32)), stack[:, ::-1, ::-1])
    with pytest.raises(ValueError):
        C.to_upright(np.zeros((4, 4)))


def test_quat2axisangle_known_values():
    np.testing.assert_allclose(C.quat2axisangle([0, 0, 0, 1]), [0, 0, 0])
    s = np.sin(np.pi / 4)
    # 90 degrees about z, quaternion (x, y, z, w)
    np.testing.assert_allclose(
        C.quat2axisangle([0, 0, s, np.cos(np.pi / 4)]), [0, 0, np.pi / 2], atol=1e-12
    )
    # 180 degrees about x
    np.testing.assert_allclose(C.quat2axisangle([1, 0, 0, 0]), [np.pi, 0, 0], atol=1e-12)


def test_libero_state_layout():
    obs = {
        "robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
        "robot0_eef_quat": np.array([0, 0, 0, 1.0]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
    }
    state = C.libero_state(obs)
    assert state.shape == (C.STATE_DIM,) and state.dtype == np.float32
    np.testing.assert_allclose(state, [0.1, 0.2, 0.3, 0, 0, 0, 0.04, -0.04], rtol=1e-6)


@pytest.mark.parametrize(
    "convention,stored,env",
    [
        ("-1_open", [-1.0, 1.0], [-1.0, 1.0]),
        ("1_open", [1.0, -1.0], [-1.0, 1.0]),
        ("0_1_open", [1.0, 0.0], [-1.0, 1.0]),
    ],
)
def test_gripper_conventions_map_to_env_and_back(convention, stored, env):
    np.testing.assert_array_equal(C.gripper_to_env(np.array(stored), convention), env)
    np.testing.assert_array_equal(C.gripper_from_env(np.array(env), convention), stored)


def test_gripper_unknown_convention():
    with pytest.raises(ValueError, match="unknown gripper convention"):
        C.gripper_to_env(np.zeros(2), "open_is_up")


def test_model_gripper_rules_per_family():
    # OpenVLA / OFT: OFT's normalize_gripper_action(binarize) + invert_gripper_action, written out
    g = np.array([0.0, 0.2, 0.5, 0.51, 1.0, 1.3])
    np.testing.assert_array_equal(C.model_gripper_to_env(g, "openvla"), [1, 1, 0, -1, -1, -1])
    e = np.array([-1.0, 1.0, 0.0, 0.5])
    np.testing.assert_array_equal(C.model_gripper_from_env(e, "openvla"), [1, 0, 0.5, 0.25])
    # on the env's +-1 and the model's 0 / 1 it agrees with its convention's threshold rule
    conv = C.MODEL_GRIPPER["openvla"]
    np.testing.assert_array_equal(
        C.model_gripper_to_env(np.array([0.0, 1.0]), "openvla"),
        C.gripper_to_env(np.array([0.0, 1.0]), conv),
    )
    np.testing.assert_array_equal(
        C.model_gripper_from_env(np.array([-1.0, 1.0]), "openvla"),
        C.gripper_from_env(np.array([-1.0, 1.0]), conv),
    )
    # a family without its own rule uses its convention's (NORA: threshold at 0.5)
    np.testing.assert_array_equal(C.model_gripper_to_env(np.array([0.5, 0.6]), "nora"), [1, -1])
    with pytest.raises(ValueError, match="MODEL_GRIPPER has no entry 'nobody'"):
        C.model_gripper_to_env(np.zeros(1), "nobody")


def test_suites_and_aliases():
    assert {s: C.SUITES[s].max_steps for s in C.SUITES} == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }
    assert C.resolve_suite("long") == "libero_10"
    assert C.resolve_suite("LIBERO_OBJECT") == "libero_object"
    with pytest.raises(ValueError, match="Did you mean 'libero_object'"):
        C.resolve_suite("libero_objct")


def test_settle_action_keeps_gripper_open():
    assert C.NUM_STEPS_WAIT == 10
    np.testing.assert_array_equal(C.SETTLE_ACTION, [0, 0, 0, 0, 0, 0, -1])

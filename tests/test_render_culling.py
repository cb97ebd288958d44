"""Frustum culling's geometry and bookkeeping on a small MuJoCo scene (no GL: the render call is
recorded). That culled LIBERO images equal whole ones pixel for pixel is tested in the
simulator (tests/test_sim_env.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

mujoco = pytest.importorskip("mujoco")

from vlatune.sim.render import FrustumCulling, culling_summary, outside_view  # noqa: E402

# a camera at the origin looking down -z (fovy 60: half-width 0.577 at depth 1) and geoms:
# in view, just outside its side (but touching it with its radius), far outside, behind it,
# a floor plane, and a mirror box below the camera whose +z face reflects
SCENE = """
<mujoco>
  <visual><quality offsamples="0"/></visual>
  <asset><material name="mirror" reflectance="{reflectance}"/></asset>
  <worldbody>
    <light pos="0 0 2" dir="0 0 -1" castshadow="{shadow}"/>
    <camera name="cam" pos="0 0 0" fovy="60"/>
    <geom name="floor" type="plane" size="5 5 0.1" pos="0 0 -3" group="1"/>
    <geom name="seen" type="sphere" size="0.1" pos="0 0 -1" group="1"/>
    <geom name="edge" type="sphere" size="0.1" pos="0.62 0 -1" group="1"/>
    <geom name="aside" type="sphere" size="0.1" pos="3 0 -1" group="1"/>
    <geom name="behind" type="sphere" size="0.1" pos="0 0 1" group="1"/>
    <geom name="above_mirror" type="sphere" size="0.1" pos="0 3 -1.5" group="1"/>
    <geom name="mirror" type="box" size="0.3 0.3 0.05" pos="0 0 -2.05" material="mirror"
          group="1"/>
    <geom name="collision" type="sphere" size="0.1" pos="3 3 -1" group="0"/>
  </worldbody>
</mujoco>
"""


def make(reflectance: float = 0.0, shadow: bool = False):
    model = mujoco.MjModel.from_xml_string(
        SCENE.format(reflectance=reflectance, shadow=str(shadow).lower())
    )
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    seen_groups = []

    def render(width, height, camera_id=None, segmentation=False):
        seen_groups.append(np.array(model.geom_group))

    vopt = mujoco.MjvOption()
    vopt.geomgroup[:] = [0, 1, 1, 0, 0, 0]  # robosuite's: collision geoms (group 0) hidden
    ctx = SimpleNamespace(render=render, scn=mujoco.MjvScene(model, 100), vopt=vopt)
    sim = SimpleNamespace(
        _render_context_offscreen=ctx,
        model=SimpleNamespace(_model=model),
        data=SimpleNamespace(_data=data),
    )
    return sim, model, seen_groups


def gid(model, name: str) -> int:
    return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name)


def hidden_names(model, groups: np.ndarray) -> set[str]:
    return {model.geom(g).name for g in np.flatnonzero(groups != np.asarray(model.geom_group))}


def test_outside_view_is_the_frustum_with_the_radius():
    sim, model, _ = make()
    data = sim.data._data
    radii = np.full(model.ngeom, 0.1)
    out = outside_view(model, data, 0, 1.0, radii)
    assert not out[gid(model, "seen")]
    assert not out[gid(model, "edge")]  # its centre is outside, its sphere reaches in
    assert out[gid(model, "aside")] and out[gid(model, "behind")]
    radii[gid(model, "edge")] = 0.01
    assert outside_view(model, data, 0, 1.0, radii)[gid(model, "edge")]
    # a wide viewport widens the horizontal half-angle
    assert not outside_view(model, data, 0, 8.0, np.full(model.ngeom, 0.1))[gid(model, "aside")]
    radii[:] = 0.0  # radius 0: never outside
    assert not outside_view(model, data, 0, 1.0, radii).any()


def test_culling_hides_only_for_the_render_and_counts():
    sim, model, seen = make()
    before = np.array(model.geom_group)
    stats: dict[str, int] = {}
    culling = FrustumCulling.install(sim, stats)
    assert FrustumCulling.install(sim, stats) is culling  # once per context
    sim._render_context_offscreen.render(64, 64, camera_id=0)
    assert hidden_names(model, seen[-1]) == {"aside", "behind", "above_mirror"}
    assert seen[-1][gid(model, "aside")] == 0  # the first group the options hide
    np.testing.assert_array_equal(model.geom_group, before)  # restored after the render
    # never hidden: the plane (unbounded), the mirror, geoms already hidden (collision)
    assert stats["renders"] == 1 and stats["culled"] == 1 and stats["geoms_hidden"] == 3
    sim._render_context_offscreen.render(64, 64, camera_id=-1)  # the free camera: drawn whole
    sim._render_context_offscreen.render(64, 64, camera_id=0, segmentation=True)
    assert hidden_names(model, seen[-1]) == hidden_names(model, seen[-2]) == set()
    assert stats["kept_other"] == 2
    assert "1/3 renders hid geoms" in culling_summary(stats)
    culling.enabled = False  # comparisons: whole, not counted
    sim._render_context_offscreen.render(64, 64, camera_id=0)
    assert hidden_names(model, seen[-1]) == set() and stats["renders"] == 3


def test_a_mirror_in_view_keeps_what_it_reflects_and_shadows_keep_everything():
    sim, model, seen = make(reflectance=0.5)
    stats: dict[str, int] = {}
    FrustumCulling.install(sim, stats)
    sim._render_context_offscreen.render(64, 64, camera_id=0)
    # "above_mirror" is out of view but its image in the mirror's face (z = -2) is at z = -2.5,
    # y = 3: still out of view; "behind" (z = 1) mirrors to z = -5, straight ahead: kept
    assert hidden_names(model, seen[-1]) == {"aside", "above_mirror"}

    sim, model, seen = make(shadow=True)
    stats = {}
    FrustumCulling.install(sim, stats)
    sim._render_context_offscreen.render(64, 64, camera_id=0)
    assert hidden_names(model, seen[-1]) == set() and stats["kept_shadow"] == 1
    sim._render_context_offscreen.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    sim._render_context_offscreen.render(64, 64, camera_id=0)
    assert "behind" in hidden_names(model, seen[-1])

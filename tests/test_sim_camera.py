"""LIBERO camera geometry in the real simulator: projections match renders; ECoT's GRIPPER
POSITION and VISIBLE OBJECTS from a synthesised LIBERO dataset (`sim`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.sim


def test_projection_lands_within_2px_of_the_render():
    from vlatune.sim.camera import camera_matrix, project
    from vlatune.sim.env import LiberoEnv
    from vlatune.sim.expert import object_extent

    R = 128
    env = LiberoEnv("libero_object", 0, resolution=R, cameras=("agentview",))
    try:
        env.reset(0)
        rs, sim = env.sim, env.sim.sim
        m = sim.model._model
        name = "alphabet_soup_1"
        obj = rs.objects_dict[name]
        root = m.body(obj.root_body).id
        for g in range(m.ngeom):  # paint the can a colour nothing else in the scene has
            b = m.geom_bodyid[g]
            while b not in (0, root):
                b = m.body_parentid[b]
            if b == root:
                m.geom_rgba[g] = [0, 1, 0, 1]
                m.geom_matid[g] = -1
        qadr = sim.model.get_joint_qpos_addr(obj.joints[0])[0]
        base = sim.data.qpos[qadr : qadr + 3].copy()
        matrix = camera_matrix(sim, "agentview", R)
        for shift in ([0, 0, 0], [0.1, 0.1, 0.0], [-0.1, 0.15, 0.1]):
            sim.data.qpos[qadr : qadr + 3] = base + shift
            sim.forward()
            raw = rs._get_observations(force_update=True)["agentview_image"]
            up = raw[::-1, ::-1]  # vlatune's upright frame
            green = (up[..., 1] > 120) & (up[..., 0] < 80) & (up[..., 2] < 80)
            v, u = np.nonzero(green)
            assert green.sum() > 20
            lo, hi = object_extent(rs, name)
            corners = np.array(
                [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
            )
            uv = project(matrix, corners, R)
            seen = np.array([(u.min() + u.max()) / 2, (v.min() + v.max()) / 2])
            predicted = (uv.min(0) + uv.max(0)) / 2
            assert np.abs(seen - predicted).max() <= 2.0, (shift, seen, predicted)
    finally:
        env.close()


def test_ecot_geometry_on_a_libero_dataset(tmp_path):
    from vlatune.sim.synth import synthesize

    data = tmp_path / "demos"
    synthesize("libero_object", [0], episodes=1, out=data, resolution=64, first_init=0)
    out = tmp_path / "ecot.json"
    r = run_cli("annotate", "ecot", str(data), "--out", str(out), "--geometry", "on", timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["omitted"] == {} and doc["geometry"]
    first = doc["frames"][0]["reasoning"]
    points = json.loads(first["GRIPPER POSITION"])
    assert len(points) == 5 and all(0 <= c < 64 for p in points for c in p)
    assert "alphabet soup [" in first["VISIBLE OBJECTS"] and "basket [" in first["VISIBLE OBJECTS"]
    last = doc["frames"][-1]["reasoning"]
    assert len(json.loads(last["GRIPPER POSITION"])) == 1  # the episode's end: no future frames
    png = tmp_path / "show.png"
    r = run_cli(
        "annotate", "show", str(out), "--dataset", str(data), "--episode", "0", "--frame", "0",
        "--out", str(png),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr

"""LIBERO camera geometry: world points -> pixels of vlatune's upright frames.

The camera matrix is robosuite's (`get_camera_transform_matrix`: intrinsics from the camera's
fovy at the given resolution, extrinsics from its pose in the MuJoCo model); the homogeneous
divide is done here in floating point (robosuite rounds and clips). robosuite's pixel (row,
col) refers to its own image convention; in vlatune's upright frame (the raw render rotated
180 degrees) a point lands at u = W - 1 - col, v = row. A test renders a uniquely coloured
object at known positions and checks its box against the projection within 2 px.

`LiberoGeometry` annotates a LIBERO episode from its per-frame MuJoCo states (the `states`
array of LIBERO HDF5 files): the gripper's pixel position for the next 5 frames (from the
8-d state's end-effector position) and every object's box in pixels (from its collision
geometry), for ECoT's GRIPPER POSITION and VISIBLE OBJECTS.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vlatune.sim.env import CAMERAS


def camera_matrix(sim, camera: str, resolution: int) -> np.ndarray:
    from robosuite.utils.camera_utils import get_camera_transform_matrix

    return get_camera_transform_matrix(sim, CAMERAS.get(camera, camera), resolution, resolution)


def project(matrix: np.ndarray, points: np.ndarray, resolution: int) -> np.ndarray:
    """World points (N, 3) -> upright pixel coordinates (N, 2) as (u right, v down), float."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    hom = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ matrix.T
    xy = hom[:, :2] / hom[:, 2:3]  # robosuite: x = column, y = row
    return np.stack([resolution - 1 - xy[:, 0], xy[:, 1]], 1)


def object_label(name: str) -> str:
    """'alphabet_soup_1' -> 'alphabet soup'."""
    return re.sub(r"_\d+$", "", name).replace("_", " ")


def find_suite(task_name: str) -> tuple[str, int]:
    from vlatune.sim.setup import import_libero

    import_libero()
    from libero.libero.benchmark.libero_suite_task_map import libero_task_map

    for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"):
        names = libero_task_map.get(suite, [])
        if task_name in names:
            return suite, names.index(task_name)
    raise ValueError(f"task '{task_name}' is in no LIBERO suite")


class LiberoGeometry:
    def __init__(self, task_name: str, resolution: int, camera: str = "agentview"):
        from vlatune.sim.env import LiberoEnv

        suite, task_id = find_suite(task_name)
        self.env = LiberoEnv(suite, task_id, render=False)
        self.env.restore(0)
        self.resolution = resolution
        self.matrix = camera_matrix(self.env.sim.sim, camera, resolution)

    def project(self, points: np.ndarray) -> np.ndarray:
        return project(self.matrix, points, self.resolution)

    def boxes(self) -> dict[str, list[int]]:
        """Boxes [u0, v0, u1, v1] of the objects at the current sim state that are in view."""
        from vlatune.sim.expert import UnsupportedTask, object_extent

        out = {}
        rs = self.env.sim
        R = self.resolution
        for name in rs.objects_dict:
            try:
                lo, hi = object_extent(rs, name)
            except UnsupportedTask:
                continue
            corners = np.array(
                [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
            )
            uv = self.project(corners)
            u0, v0 = np.floor(uv.min(0))
            u1, v1 = np.ceil(uv.max(0))
            if u1 < 0 or v1 < 0 or u0 > R - 1 or v0 > R - 1:
                continue
            box = np.clip([u0, v0, u1, v1], 0, R - 1).astype(int).tolist()
            out[object_label(name)] = box
        return out

    def episode(
        self, sim_states: np.ndarray, eef: np.ndarray, horizon: int = 5
    ) -> list[dict[str, Any]]:
        """Per frame {"gripper": [[u, v] x <= horizon], "objects": {label: box}}."""
        sim = self.env.sim.sim
        expected = sim.get_state().flatten().size
        if np.asarray(sim_states).ndim != 2 or np.asarray(sim_states).shape[1] != expected:
            raise ValueError(
                f"the episode's states have shape {np.asarray(sim_states).shape}; this task's "
                f"MuJoCo state has {expected} values: not states of this LIBERO scene"
            )
        out = []
        T = len(eef)
        for t in range(T):
            sim.set_state_from_flattened(np.asarray(sim_states[t], dtype=np.float64))
            sim.forward()
            out.append(
                {
                    "gripper": np.rint(self.project(eef[t : min(t + horizon, T)]))
                    .astype(int)
                    .tolist(),
                    "objects": self.boxes(),
                }
            )
        return out

    def close(self) -> None:
        self.env.close()


def dataset_geometry(reader, camera: str = "agentview"):
    """A `geometry(episode)` function for `annotate_dataset_rules` over a LIBERO HDF5 reader:
    one simulator per task (built on first use), the camera at the dataset's resolution.
    Episodes without per-frame MuJoCo states get None."""
    key = f"image.{camera}"
    if key not in reader.info.features:
        raise ValueError(f"the dataset has no '{camera}' camera for the gripper projection")
    resolution = int(reader.info.features[key].shape[0])
    cache: dict[str, LiberoGeometry] = {}

    def geometry(episode) -> list[dict[str, Any]] | None:
        states = episode.extras.get("states")
        task = episode.meta.get("task_name")
        if states is None or task is None or episode.states is None:
            return None
        if task not in cache:
            cache[task] = LiberoGeometry(task, resolution, camera)
        return cache[task].episode(states, np.asarray(episode.states)[:, :3])

    geometry.close = lambda: [g.close() for g in cache.values()]  # type: ignore[attr-defined]
    return geometry

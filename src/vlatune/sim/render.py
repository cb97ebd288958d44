"""Rendering settings for simulator worker processes (shared by `vlatune eval` and `sim synth`).

Mesa's software rasteriser (llvmpipe) starts one thread per core in every process; with one
simulator worker per core they contend.

    >>> one_render_thread()   # first thing in a worker process, before MuJoCo renders

Frustum culling: MuJoCo draws every visible geom for every camera, and software GL pays for each
triangle it transforms, in view or not. `FrustumCulling` hides, for the one render, the geoms
whose bounding sphere lies wholly outside the camera's view. No pixel can change: such geoms
could only show through a shadow or a mirror, so nothing is culled while a light casts shadows,
and a geom whose mirror image is in view stays. The LIBERO wrist camera, which sees a small part
of the scene, renders about 25-30% faster (libero_object: 38 -> 27 ms per 128-px image;
agentview, which sees most of it, 3%): `benchmarks/render_culling.py`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def one_render_thread() -> None:
    """One llvmpipe thread in this process (2-worker evaluation was about 25% faster on our 2
    cores). A user's own LP_NUM_THREADS is kept."""
    os.environ.setdefault("LP_NUM_THREADS", "1")


# the bounding sphere is widened by this factor and margin (metres): float32 rendering, rounding
_SLACK, _MARGIN = 1.01, 1e-3


def geom_radii(model) -> np.ndarray:
    """Per geom, a radius around its frame's origin that holds all of it: the larger of MuJoCo's
    bounding sphere and the sphere around its bounding box; 0 (never culled) for planes and other
    unbounded geoms."""
    import mujoco

    rbound = np.asarray(model.geom_rbound, dtype=np.float64)
    aabb = np.asarray(model.geom_aabb, dtype=np.float64).reshape(-1, 6)
    box = np.linalg.norm(aabb[:, :3], axis=1) + np.linalg.norm(aabb[:, 3:], axis=1)
    radius = np.maximum(rbound, box) * _SLACK + _MARGIN
    unbounded = (rbound <= 0) | (np.asarray(model.geom_type) == mujoco.mjtGeom.mjGEOM_PLANE)
    radius[unbounded] = 0.0
    return radius


def outside_view(
    model, data, camera_id: int, aspect: float, radii: np.ndarray, centres=None
) -> np.ndarray:
    """Geoms (bool per geom) whose sphere of `radii` around `centres` (default: the geoms'
    positions) lies wholly outside the view of fixed perspective camera `camera_id` (viewport
    width / height `aspect`): beyond one of the four side planes of its frustum, or behind it.
    Geoms of radius 0 are never outside."""
    pos = np.asarray(data.cam_xpos[camera_id], dtype=np.float64)
    rot = np.asarray(data.cam_xmat[camera_id], dtype=np.float64).reshape(3, 3)
    centres = data.geom_xpos if centres is None else centres
    p = (np.asarray(centres, dtype=np.float64) - pos) @ rot  # camera frame, looks down -z
    half_y = np.deg2rad(float(model.cam_fovy[camera_id])) / 2
    half_x = np.arctan(np.tan(half_y) * aspect)
    cy, sy, cx, sx = np.cos(half_y), np.sin(half_y), np.cos(half_x), np.sin(half_x)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    out = (
        (y * cy + z * sy > radii)
        | (-y * cy + z * sy > radii)
        | (x * cx + z * sx > radii)
        | (-x * cx + z * sx > radii)
        | (z > radii)  # behind the camera
    )
    return out & (radii > 0)


class FrustumCulling:
    """Culls the geoms each render of a robosuite `MjSim` cannot see (install once per render
    context: a hard reset builds a new one). Counts in `stats` (a dict shared across contexts):
    `renders`, `culled` (renders that hid something), `geoms_hidden`, and the renders drawn
    whole because culling could have changed a pixel: `kept_reflection` (an unbounded mirror
    plane in view; a bounded mirror in view, such as LIBERO's stove top, keeps the geoms whose
    reflection is in view) and `kept_shadow` (a light casts shadows: a geom out of view can cast
    one into it); also `kept_other` (segmentation, free or orthographic camera, no hidden geom
    group left)."""

    def __init__(self, sim, stats: dict[str, int] | None = None):
        import mujoco

        self.sim = sim
        self.ctx = sim._render_context_offscreen
        self.model = sim.model._model
        self.data = sim.data._data
        self.stats = stats if stats is not None else {}
        for k in ("renders", "culled", "geoms_hidden", "kept_reflection", "kept_shadow"):
            self.stats.setdefault(k, 0)
        self.stats.setdefault("kept_other", 0)
        m = self.model
        self.radii = geom_radii(m)
        matid = np.asarray(m.geom_matid)
        reflectance = np.where(matid >= 0, np.asarray(m.mat_reflectance)[np.maximum(matid, 0)], 0.0)
        kind = np.asarray(m.geom_type)
        self.reflective = (reflectance > 0) & (
            (kind == mujoco.mjtGeom.mjGEOM_PLANE) | (kind == mujoco.mjtGeom.mjGEOM_BOX)
        )
        self.radii[self.reflective] = 0.0  # never hide a mirror: MuJoCo lets only the first reflect
        self.mirror_radii = np.where(self.reflective, self._mirror_radii(), 0.0)
        self.casts_shadow = bool(np.asarray(m.light_castshadow).any())
        self.enabled = True  # False: every render drawn whole, not counted (comparisons)
        self._render = self.ctx.render
        self.ctx.render = self.render
        self.ctx._vlatune_culling = self

    @classmethod
    def install(cls, sim, stats: dict[str, int]) -> FrustumCulling | None:
        """Cull in `sim`'s offscreen context (once: a context that has it keeps it)."""
        ctx = getattr(sim, "_render_context_offscreen", None)
        if ctx is None:
            return None
        if getattr(ctx, "_vlatune_culling", None) is not None:
            return ctx._vlatune_culling
        return cls(sim, stats)

    def _hidden(self, width: int, height: int, camera_id, segmentation: bool):
        """The geoms to hide for this render, or the stats key of why none are."""
        import mujoco

        m, flags = self.model, self.ctx.scn.flags
        if segmentation or camera_id is None or camera_id < 0:
            return "kept_other"
        if getattr(m, "cam_orthographic", None) is not None and m.cam_orthographic[camera_id]:
            return "kept_other"
        if self.casts_shadow and flags[mujoco.mjtRndFlag.mjRND_SHADOW]:
            return "kept_shadow"
        enabled = np.asarray(self.ctx.vopt.geomgroup, dtype=bool)
        off = np.flatnonzero(~enabled)
        if not len(off):
            return "kept_other"
        groups = np.clip(np.asarray(m.geom_group), 0, len(enabled) - 1)
        shown = enabled[groups]
        aspect = width / height
        hide = outside_view(m, self.data, camera_id, aspect, self.radii) & shown
        if flags[mujoco.mjtRndFlag.mjRND_REFLECTION] and (self.reflective & shown).any():
            # a mirror in view shows the scene reflected in its plane: a geom stays hidden only
            # if its mirror image is out of view too (every mirror counted, though MuJoCo draws
            # the reflection of the first only)
            mirror_radii = self.mirror_radii
            seen = ~outside_view(m, self.data, camera_id, aspect, mirror_radii)
            for g in np.flatnonzero(seen & self.reflective & shown):
                if not np.isfinite(mirror_radii[g]):
                    return "kept_reflection"  # an infinite mirror plane: no bound on what shows
                hide &= outside_view(m, self.data, camera_id, aspect, self.radii, self._mirrored(g))
        return hide, int(off[0])

    def _mirrored(self, g: int) -> np.ndarray:
        """The geoms' positions reflected in mirror geom g's plane (a box: its +z face)."""
        import mujoco

        axis = np.asarray(self.data.geom_xmat[g], dtype=np.float64).reshape(3, 3)[:, 2]
        point = np.asarray(self.data.geom_xpos[g], dtype=np.float64)
        if self.model.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX:
            point = point + self.model.geom_size[g][2] * axis
        p = np.asarray(self.data.geom_xpos, dtype=np.float64)
        return p - 2.0 * ((p - point) @ axis)[:, None] * axis

    def _mirror_radii(self) -> np.ndarray:
        r = np.maximum(np.asarray(self.model.geom_rbound, dtype=np.float64), 0.0)
        size = np.linalg.norm(np.asarray(self.model.geom_size, dtype=np.float64), axis=1)
        # a plane's rbound is 0 (infinite); its size bounds the drawn part, or it is everywhere
        r = np.where(r > 0, np.maximum(r, size), np.where(size > 0, size, np.inf))
        return r * _SLACK + _MARGIN

    def render(self, width, height, camera_id=None, segmentation=False):
        if not self.enabled:
            return self._render(width, height, camera_id=camera_id, segmentation=segmentation)
        self.stats["renders"] += 1
        got = self._hidden(width, height, camera_id, segmentation)
        if isinstance(got, str) or not got[0].any():
            if isinstance(got, str):
                self.stats[got] += 1
            return self._render(width, height, camera_id=camera_id, segmentation=segmentation)
        hide, hidden_group = got
        groups = self.model.geom_group
        saved = np.array(groups[hide])
        groups[hide] = hidden_group
        try:
            return self._render(width, height, camera_id=camera_id, segmentation=segmentation)
        finally:
            groups[hide] = saved
            self.stats["culled"] += 1
            self.stats["geoms_hidden"] += int(hide.sum())


def culling_summary(stats: dict[str, Any]) -> str:
    """One line for logs and reports."""
    n = max(1, int(stats.get("renders", 0)))
    kept = {k: stats[k] for k in ("kept_reflection", "kept_shadow", "kept_other") if stats.get(k)}
    return (
        f"frustum culling: {stats.get('culled', 0)}/{n} renders hid geoms out of view "
        f"(mean {stats.get('geoms_hidden', 0) / n:.1f} per render)"
        + (f"; drawn whole: {kept}" if kept else "")
    )

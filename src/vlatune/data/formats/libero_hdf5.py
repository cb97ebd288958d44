"""LIBERO HDF5: a folder of `<task>_demo.hdf5` files (raw 128 px or regenerated 256 px).

Layout (LIBERO `scripts/create_dataset.py`, openvla-oft `regenerate_libero_dataset.py`):
`data.attrs` = env_name, problem_info (JSON), bddl_file_name, bddl_file_content, env_args (JSON),
num_demos, total, macros_image_convention; `data/demo_<i>/` = actions (T,7), states (T,S),
robot_states, rewards, dones, obs/{agentview_rgb, eye_in_hand_rgb, gripper_states, joint_states,
ee_states, ee_pos, ee_ori}; demo attrs num_samples, init_state, model_file.

Conventions read from the files:
- state = ee_states (eef pos + axis-angle, 6) + gripper_states (2): LIBERO's 8-d state;
- orientation from `macros_image_convention` ("opengl": raw renders, rotated 180 degrees;
  "opencv": upright), else assumed raw; gripper: the env's (-1 open, +1 close);
- frames are uint8; float (or 16-bit) frames are read only when the file declares their value
  range in `data.attrs["vlatune_image_range"]` (e.g. [0, 1]), and are then converted to uint8;
- every `obs/<name>_rgb` image stack is a camera, whatever its channel count (a 4-channel
  camera is reported by validation, not dropped);
- instruction: LIBERO's `task.language`, derived from the file name as LIBERO's benchmark does
  (the prompt OFT, openpi and LeRobot use), not problem_info's BDDL wording, which differs for
  some tasks ("pick the ..." vs "pick up the ..."); problem_info's wording is kept in `meta`.

    >>> reader = LiberoHDF5Reader("datasets/libero_object")
    >>> writer = LiberoHDF5Writer("out/libero_object"); writer.add(episode); writer.close()
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlatune.data.episode import DataError, DatasetInfo, DatasetReader, Episode, FeatureSpec
from vlatune.data.formats._h5 import H5Files, frames_to_uint8

FORMAT = "libero_hdf5"
CAMERA_KEYS = {"agentview": "agentview_rgb", "wrist": "eye_in_hand_rgb"}
# per-frame arrays kept verbatim (beyond actions, state and images)
EXTRA_KEYS = ("states", "robot_states", "rewards", "dones", "obs/joint_states")
FPS = 20.0


def task_language(task_name: str) -> str:
    """LIBERO's instruction for a task file name (its benchmark's `grab_language_from_filename`)."""
    if task_name[:1].isupper():  # LIBERO-90/100 names: KITCHEN_SCENE3_turn_on_the_stove
        m = re.search(r"SCENE\d+_", task_name)
        if m:
            task_name = task_name[m.end() :]
    return " ".join(task_name.split("_"))


def task_name_from_file(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_demo")] if stem.endswith("_demo") else stem


def task_slug(instruction: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", instruction.strip()).strip("_").lower() or "task"


def is_libero_hdf5(path: Path) -> bool:
    """True when one of the first few `.hdf5` files has LIBERO's layout (one damaged file
    among LIBERO files is then reported by the LIBERO reader, naming it)."""
    files = [path] if path.is_file() else sorted(path.glob("*.hdf5"))[:5]
    return any(_libero_layout(fp) for fp in files)


def _libero_layout(fp: Path) -> bool:
    try:
        with h5py.File(fp, "r") as f:
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                return False
            demo = next((data[k] for k in data if k.startswith("demo_")), None)
            return isinstance(demo, h5py.Group) and "actions" in demo and "obs" in demo
    except OSError:
        return False


def _demo_sort_key(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"demo_(\d+)", name)
    return (int(m.group(1)) if m else 1 << 30, name)


class LiberoHDF5Reader(DatasetReader):
    format = FORMAT

    def __init__(self, path: str | Path, instruction_source: str = "filename"):
        self.path = Path(path)
        if instruction_source not in ("filename", "problem_info"):
            raise ValueError("instruction_source must be 'filename' or 'problem_info'")
        files = [self.path] if self.path.is_file() else sorted(self.path.glob("*.hdf5"))
        if not files:
            raise DataError("no .hdf5 files found", file=self.path)
        self._h5 = H5Files()
        self._ds_cache: dict[tuple[int, str], _FrameStack] = {}
        self._index: list[tuple[Path, str]] = []
        self._lengths: list[int] = []
        self._instr: dict[Path, str] = {}
        self._bddl_instr: dict[Path, str | None] = {}
        self._image_range: dict[Path, tuple[float, float] | None] = {}
        orientations: set[str] = set()
        self._fps, self._gripper = FPS, "-1_open"
        for fp in files:
            f = self._open(fp)
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                raise DataError(
                    "missing group 'data' (not a LIBERO HDF5 file)", file=fp, key="data"
                )
            problem = _json_attr(data.attrs, "problem_info", fp)
            self._bddl_instr[fp] = problem.get("language_instruction") if problem else None
            if instruction_source == "problem_info" and self._bddl_instr[fp]:
                self._instr[fp] = str(self._bddl_instr[fp])
            else:
                self._instr[fp] = task_language(task_name_from_file(fp))
            conv = _str_attr(data.attrs, "vlatune_image_orientation") or {
                "opengl": "raw",
                "opencv": "upright",
            }.get(_str_attr(data.attrs, "macros_image_convention") or "", "")
            orientations.add(conv or "assumed-raw")
            self._fps = float(data.attrs.get("vlatune_fps", self._fps))
            rng = data.attrs.get("vlatune_image_range")
            self._image_range[fp] = None if rng is None else tuple(float(x) for x in rng)[:2]
            self._gripper = _str_attr(data.attrs, "vlatune_gripper") or self._gripper
            for name in sorted((k for k in data if k.startswith("demo_")), key=_demo_sort_key):
                demo = data[name]
                self._index.append((fp, name))
                # a demo without actions is indexed (length 0) so `data check` can report it
                self._lengths.append(int(demo["actions"].shape[0]) if "actions" in demo else 0)
        declared = {o for o in orientations if o != "assumed-raw"}
        if len(declared) > 1:
            raise DataError(
                f"files declare different image orientations {sorted(declared)}", file=self.path
            )
        orientation = declared.pop() if declared else "raw"
        self._info = self._build_info(
            orientation, "declared" if "assumed-raw" not in orientations else "assumed"
        )

    def _open(self, fp: Path) -> h5py.File:
        return self._h5.open(fp)

    def _demo(self, i: int) -> h5py.Group:
        fp, name = self._index[i]
        return self._open(fp)["data"][name]

    def _build_info(self, orientation: str, source: str) -> DatasetInfo:
        features: dict[str, FeatureSpec] = {}
        cameras: list[str] = []
        demo = next((d for d in map(self._demo, range(len(self._index))) if "actions" in d), None)
        if demo is not None:
            features["action"] = FeatureSpec(
                tuple(demo["actions"].shape[1:]), str(demo["actions"].dtype)
            )
            if _state_keys(demo):
                features["state"] = FeatureSpec((8,), "float32")
            for cam, key in _camera_keys(demo["obs"]).items():
                ds = demo[f"obs/{key}"]
                features[f"image.{cam}"] = FeatureSpec(tuple(ds.shape[1:]), str(ds.dtype))
                cameras.append(cam)
            if features.get("state") and "obs/state" in demo:
                features["state"] = FeatureSpec(tuple(demo["obs/state"].shape[1:]), "float32")
            for key in EXTRA_KEYS:
                if key in demo:
                    features[key] = FeatureSpec(tuple(demo[key].shape[1:]), str(demo[key].dtype))
        return DatasetInfo(
            format=FORMAT,
            path=self.path,
            fps=self._fps,
            num_episodes=len(self._index),
            num_frames=int(sum(self._lengths)),
            cameras=cameras,
            features=features,
            image_orientation=orientation,
            gripper=self._gripper,
            orientation_source=source,
        )

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def episode_length(self, i: int) -> int:
        return self._lengths[i]

    def instruction(self, i: int) -> str:
        return self._instr[self._index[i][0]]

    def episode_source(self, i: int) -> str:
        fp, name = self._index[i]
        return f"{fp}:{name}"

    def load_episode(self, i: int, cameras: Sequence[str] | None = None) -> Episode:
        fp, name = self._index[i]
        demo = self._demo(i)
        if "actions" not in demo:
            raise DataError("missing dataset", file=fp, episode=name, key="actions")
        cams = self._info.cameras if cameras is None else list(cameras)
        images = {}
        for cam in cams:
            key = f"obs/{self._cam_key(cam)}"
            if key not in demo:
                raise DataError("missing camera dataset", file=fp, episode=name, key=key)
            images[cam] = self._to_uint8(demo[key][()], i, key)
        extras = {k: demo[k][()] for k in EXTRA_KEYS if k in demo}
        meta: dict[str, Any] = {"task_name": task_name_from_file(fp), "source": f"{fp.name}:{name}"}
        if self._bddl_instr.get(fp):
            meta["bddl_instruction"] = self._bddl_instr[fp]
        if "init_state" in demo.attrs:
            meta["init_state"] = np.asarray(demo.attrs["init_state"]).tolist()
        return Episode(
            actions=demo["actions"][()],
            instruction=self.instruction(i),
            states=self._state(demo, fp, name),
            images=images,
            extras=extras,
            meta=meta,
        )

    def _state(self, demo: h5py.Group, fp: Path, name: str) -> np.ndarray | None:
        keys = _state_keys(demo)
        if not keys:
            return None
        parts = [demo[k][()] for k in keys]
        T = demo["actions"].shape[0]
        for k, part in zip(keys, parts, strict=True):
            if part.ndim != 2 or len(part) != T:
                raise DataError(
                    f"{k} has shape {part.shape}: {len(part) if part.ndim else 0} frames but {T} "
                    f"actions; expected ({T}, n)",
                    file=fp,
                    episode=name,
                    key="state",
                )
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _cam_key(self, camera: str) -> str:
        return CAMERA_KEYS.get(camera, f"{camera}_rgb")

    def _to_uint8(self, frames: np.ndarray, i: int, key: str) -> np.ndarray:
        if frames.dtype == np.uint8:
            return frames
        fp, name = self._index[i]
        return frames_to_uint8(
            frames,
            self._image_range.get(fp),
            {"file": fp, "episode": name, "key": key},
            "file attribute data.attrs['vlatune_image_range']",
        )

    def frame_count(self, i: int, camera: str) -> int:
        """Stored frames of a camera in episode i (from the dataset's shape; nothing read)."""
        return self._camera_ds(i, camera).n

    def undeclared(self, i: int) -> list[tuple[str, str]]:
        """Cameras this episode has that the dataset (its first episode) does not list."""
        demo = self._demo(i)
        if "obs" not in demo:
            return [("obs", "missing group 'obs'; expected the observations")]
        extra = [k for c, k in _camera_keys(demo["obs"]).items() if c not in self._info.cameras]
        return [
            (
                f"obs/{k}",
                f"camera in this episode but not in the first one (cameras: {self._info.cameras}); "
                "it would be dropped: every episode needs the same cameras",
            )
            for k in extra
        ]

    def _camera_ds(self, i: int, camera: str) -> _FrameStack:
        ds = self._ds_cache.get((i, camera))  # h5py group lookups cost more than the read
        if ds is None:
            key = f"obs/{self._cam_key(camera)}"
            demo = self._demo(i)
            if key not in demo:
                fp, name = self._index[i]
                raise DataError("missing camera dataset", file=fp, episode=name, key=key)
            ds = self._ds_cache[(i, camera)] = _FrameStack(demo[key])
        return ds

    def read_frames(self, i: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        stack = self._camera_ds(i, camera)
        idx = [int(j) for j in frames]
        if len(idx) == 1:
            out = stack.read_one(idx[0])
        else:
            uniq, inv = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
            out = stack.ds[uniq.tolist()][inv]
        if out.dtype == np.uint8:
            return out
        return self._to_uint8(out, i, f"obs/{self._cam_key(camera)}")

    def close(self) -> None:
        self._ds_cache.clear()
        self._h5.close()


class _FrameStack:
    """An image stack (N, H, W, C) read one frame at a time through h5py's low-level API, its
    file and memory dataspaces made once: h5py's selection machinery, and even creating the
    dataspaces, cost more than reading a small frame (measured 25 -> 10 us per 128 px frame)."""

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.n, *rest = ds.shape
        self._shape = (1, *rest)
        self._dtype = ds.dtype
        self._origin = [0] * len(rest)
        self._fspace = ds.id.get_space()
        self._mspace = h5py.h5s.create_simple(self._shape)

    def read_one(self, t: int) -> np.ndarray:
        """Frame t as (1, H, W, C)."""
        if not 0 <= t < self.n:
            raise IndexError(f"frame {t} out of range for {self.ds.name} with {self.n} frames")
        out = np.empty(self._shape, dtype=self._dtype)
        self._fspace.select_hyperslab((t, *self._origin), self._shape)
        self.ds.id.read(self._mspace, self._fspace, out)
        return out


def _camera_keys(obs: h5py.Group) -> dict[str, str]:
    """camera name -> obs key: LIBERO's two cameras, then any other `<name>_rgb` image stack."""
    names = {v: k for k, v in CAMERA_KEYS.items()}
    out = {}
    for key in obs:
        ds = obs[key]
        if isinstance(ds, h5py.Dataset) and ds.ndim == 4 and key.endswith("_rgb"):
            out[names.get(key, key[: -len("_rgb")])] = key
    order = list(CAMERA_KEYS)
    return dict(
        sorted(
            out.items(),
            key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]),
        )
    )


def _state_keys(demo: h5py.Group) -> list[str]:
    if "obs/state" in demo:  # a non-LIBERO state written by vlatune
        return ["obs/state"]
    if "obs/ee_states" in demo and "obs/gripper_states" in demo:
        return ["obs/ee_states", "obs/gripper_states"]
    if all(f"obs/{k}" in demo for k in ("ee_pos", "ee_ori", "gripper_states")):
        return ["obs/ee_pos", "obs/ee_ori", "obs/gripper_states"]
    return []


def _str_attr(attrs, key: str) -> str | None:
    if key not in attrs:
        return None
    v = attrs[key]
    return v.decode() if isinstance(v, bytes) else str(v)


def _json_attr(attrs, key: str, fp: Path) -> dict[str, Any] | None:
    text = _str_attr(attrs, key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DataError(
            "attribute is not valid JSON", file=fp, key=f"data.attrs['{key}']"
        ) from None


class LiberoHDF5Writer:
    """Writes episodes as LIBERO HDF5, one `<task>_demo.hdf5` per task, in the real layout.

    Episodes carry their task in `meta["task_name"]` (else a name made from the instruction).
    Rewards and dones, when an episode has none, follow LIBERO's successful demos (0 ... 0 1),
    and the file says so in `data.attrs["vlatune_derived"]`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        image_orientation: str = "raw",
        compression: str | None = None,
        fps: float = FPS,
        gripper: str = "-1_open",
        file_attrs: dict[str, dict[str, Any]] | None = None,
    ):
        if image_orientation not in ("raw", "upright"):
            raise ValueError("image_orientation must be 'raw' or 'upright'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.orientation = image_orientation
        self.compression = compression
        self.fps = fps
        self.gripper = gripper
        self.file_attrs = file_attrs or {}
        self._files: dict[str, h5py.File] = {}
        self._guards: dict[str, _GuardedFile] = {}
        self._counts: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._derived: dict[str, set[str]] = {}

    def _file(self, task: str, instruction: str) -> h5py.File:
        f = self._files.get(task)
        if f is None:
            guard = self._guards[task] = _GuardedFile(self._path(task))
            f = self._files[task] = h5py.File(guard, "w")
            data = f.create_group("data")
            extra = self.file_attrs.get(task, {})
            data.attrs["env_name"] = extra.get("env_name", "Libero_Tabletop_Manipulation")
            data.attrs["problem_info"] = json.dumps(
                extra.get(
                    "problem_info",
                    {
                        "problem_name": extra.get("problem_name", "libero"),
                        "domain_name": "robosuite",
                        "language_instruction": instruction,
                    },
                )
            )
            data.attrs["bddl_file_name"] = extra.get("bddl_file_name", "")
            data.attrs["bddl_file_content"] = extra.get("bddl_file_content", "")
            data.attrs["env_args"] = json.dumps(extra.get("env_args", {}))
            data.attrs["macros_image_convention"] = (
                "opengl" if self.orientation == "raw" else "opencv"
            )
            data.attrs["vlatune_image_orientation"] = self.orientation
            data.attrs["vlatune_fps"] = self.fps
            data.attrs["vlatune_gripper"] = self.gripper
            self._counts[task] = 0
            self._totals[task] = 0
            self._derived[task] = set()
        return f

    def _path(self, task: str) -> Path:
        return self.out_dir / f"{task}_demo.hdf5"

    def add(self, ep: Episode) -> None:
        """Append one episode; an OS error (a full disk) names the file being written."""
        task = ep.meta.get("task_name") or task_slug(ep.instruction)
        try:
            self._add(ep, task)
        except OSError as e:
            raise _named(e, self._path(task)) from None
        self._raise_write_error(task)

    def _raise_write_error(self, task: str) -> None:
        guard = self._guards.get(task)
        if guard is not None and guard.error is not None:
            raise _named(guard.error, self._path(task))

    def _add(self, ep: Episode, task: str) -> None:
        f = self._file(task, ep.instruction)
        T = ep.length
        g = f["data"].create_group(f"demo_{self._counts[task]}")
        g.attrs["num_samples"] = T
        if "init_state" in ep.meta:
            g.attrs["init_state"] = np.asarray(ep.meta["init_state"], dtype=np.float64)
        if "model_file" in ep.meta:
            g.attrs["model_file"] = ep.meta["model_file"]
        g.create_dataset("actions", data=ep.actions)
        for key in ("states", "robot_states"):
            if key in ep.extras:
                g.create_dataset(key, data=ep.extras[key])
        for key in ("rewards", "dones"):
            if key in ep.extras:
                g.create_dataset(key, data=ep.extras[key])
            else:
                v = np.zeros(T, dtype=np.uint8)
                v[-1] = 1
                g.create_dataset(key, data=v)
                self._derived[task].add(key)
        obs = g.create_group("obs")
        for cam, frames in ep.images.items():
            key = CAMERA_KEYS.get(cam, f"{cam}_rgb")
            obs.create_dataset(
                key, data=frames, chunks=(1, *frames.shape[1:]), compression=self.compression
            )
        if ep.states is not None and np.asarray(ep.states).shape[1] != 8:
            obs.create_dataset("state", data=ep.states)  # not LIBERO's 8-d state: kept as is
        elif ep.states is not None:
            s = np.asarray(ep.states)
            obs.create_dataset("ee_states", data=s[:, :6].astype(np.float64))
            obs.create_dataset("ee_pos", data=s[:, :3].astype(np.float64))
            obs.create_dataset("ee_ori", data=s[:, 3:6].astype(np.float64))
            obs.create_dataset("gripper_states", data=s[:, 6:8].astype(np.float64))
        if "obs/joint_states" in ep.extras:
            obs.create_dataset("joint_states", data=ep.extras["obs/joint_states"])
        self._counts[task] += 1
        self._totals[task] += T

    def close(self) -> dict[str, int]:
        """Finish every file; returns episodes written per task. On an OS error (a full
        disk) every file is abandoned (`abort`) and the error names the file."""
        try:
            for task, f in list(self._files.items()):
                data = f["data"]
                data.attrs["num_demos"] = self._counts[task]
                data.attrs["total"] = self._totals[task]
                if self._derived[task]:
                    data.attrs["vlatune_derived"] = ",".join(sorted(self._derived[task]))
                try:
                    f.close()
                except OSError as e:
                    raise _named(e, self._path(task)) from None
                del self._files[task]
                self._raise_write_error(task)
                self._guards.pop(task).close()
        except BaseException:
            self.abort()
            raise
        return dict(self._counts)

    def abort(self) -> None:
        """Give up every open file after a failure (the caller removes them): further writes
        are discarded, so HDF5 closes them cleanly even on a full disk (an HDF5 file whose
        flush fails crashes the interpreter when it is closed again or collected)."""
        for task, f in list(self._files.items()):
            guard = self._guards.get(task)
            if guard is not None:
                guard.discard()
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                f.close()
        for guard in self._guards.values():
            guard.close()
        self._files.clear()
        self._guards.clear()


class _GuardedFile:
    """The file object HDF5 writes through (h5py's file-object driver). The first OS error
    (a full disk) is recorded and every later write is discarded, so HDF5 never sees a failed
    write: the writer raises the recorded error and abandons the file, which then closes
    cleanly. About 1.5x the cost of h5py's native driver on writes of small image chunks."""

    def __init__(self, path: Path):
        self.path = path
        # unbuffered: a buffered file would flush (and fail) inside seek(), out of our guard
        self._f = open(path, "w+b", buffering=0)  # noqa: SIM115  (closed by close())
        self.error: OSError | None = None
        self._discard = False

    def discard(self) -> None:
        self._discard = True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if self._discard or self.error is not None:
            return n
        view = memoryview(b).cast("B")
        done = 0
        try:
            while done < n:  # a nearly full disk can take part of a write
                k = self._f.write(view[done:])
                if not k:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += k
        except OSError as e:
            self.error = e
        return n

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except OSError as e:
            self.error = self.error or e
            return offset

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        if self._discard or self.error is not None:
            return size if size is not None else self._f.tell()
        try:
            return self._f.truncate(size)
        except OSError as e:
            self.error = e
            return size if size is not None else self._f.tell()

    def flush(self) -> None:
        if self._discard or self.error is not None:
            return
        try:
            self._f.flush()
        except OSError as e:
            self.error = e

    def close(self) -> None:
        if self._f.closed:
            return
        if self._discard or self.error is not None:
            # unwritten buffered bytes must not fail the close: drop them with the file
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
            with contextlib.suppress(OSError):
                self._f.close()
            return
        try:
            self._f.close()
        except OSError as e:
            self.error = e


def _named(e: OSError, path: Path) -> OSError:
    """h5py's OS errors carry no file name: the one being written is added."""
    if e.filename is not None:
        return e
    if e.errno:
        return type(e)(e.errno, os.strerror(e.errno), str(path))
    out = OSError(str(e))
    out.filename = str(path)
    return out

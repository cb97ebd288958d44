"""LeRobot datasets, v2.1 and v3.0: parquet for per-frame values, one MP4 stream per camera.

v2.1 (lerobot <= 0.3): `meta/{info.json, episodes.jsonl, episodes_stats.jsonl, tasks.jsonl}`,
`data/chunk-XXX/episode_XXXXXX.parquet`, `videos/chunk-XXX/<key>/episode_XXXXXX.mp4`.
v3.0 (lerobot >= 0.4): many episodes per file, `data/chunk-XXX/file-XXX.parquet`,
`videos/<key>/chunk-XXX/file-XXX.mp4`, `meta/episodes/chunk-XXX/file-XXX.parquet` (per-episode
rows, frame ranges and video timestamps), `meta/tasks.parquet`, `meta/stats.json`.

Feature names follow LeRobot: `action`, `observation.state`, `observation.images.<camera>`,
plus `timestamp`, `frame_index`, `episode_index`, `index`, `task_index`. Arrays keep their
dtype, so a conversion reads back bit-identical. What LeRobot has no field for (image
orientation, gripper convention, the names of extra arrays) goes to `meta/vlatune.json`.
LeRobot's own LIBERO sets call their cameras `image` and `wrist_image`; they read as
`agentview` and `wrist`, the names the LIBERO env uses.

    >>> reader = LeRobotReader("datasets/libero_object_lerobot")
    >>> write_lerobot(reader_of_any_format, "out/lerobot", version="v2.1")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlatune.data.episode import DataError, DatasetInfo, DatasetReader, Episode, FeatureSpec
from vlatune.data.stats import (
    StatsAccumulator,
    episode_stats,
    image_channel_values,
    sample_frame_indices,
    to_json,
)
from vlatune.data.video import VideoWriter, decode_frames, psnr

ACTION = "action"
STATE = "observation.state"
IMAGE_PREFIX = "observation.images."
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CAMERA_ALIASES = {"image": "agentview", "wrist_image": "wrist"}  # LeRobot's LIBERO sets
CHUNKS_SIZE = 1000
V21_DATA = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VLATUNE_META = "meta/vlatune.json"


def detect_version(path: Path) -> str | None:
    info = path / "meta" / "info.json"
    if not info.is_file():
        return None
    try:
        version = str(json.loads(info.read_text()).get("codebase_version", ""))
    except json.JSONDecodeError:
        return None
    if version.startswith("v3"):
        return "v3.0"
    if version.startswith("v2"):
        return "v2.1"
    return None


def _column_to_numpy(table: pa.Table, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if (
        pa.types.is_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        flat = col.flatten()
        while pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        values = flat.to_numpy(zero_copy_only=False)
        return values.reshape(len(col), *shape).astype(dtype, copy=False)
    return (
        col.to_numpy(zero_copy_only=False)
        .astype(dtype, copy=False)
        .reshape(len(col), *([] if shape in ((), (1,)) else shape))
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e}); expected a JSON object", file=path) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", file=path)
    return data


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"unreadable parquet file: truncated or corrupt ({e})", file=path) from None


def _require(rows: list[dict[str, Any]], keys: Sequence[str], path: Path, unit: str) -> None:
    """Every metadata row has `keys` (else: the file, the row and the key)."""
    for n, r in enumerate(rows, 1):
        for k in keys:
            if not isinstance(r, dict) or k not in r:
                raise DataError(f"{unit} {n} has no '{k}'", file=path, key=k)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError("missing metadata file", file=path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"line {n} is not valid JSON", file=path) from None
    return rows


class LeRobotReader(DatasetReader):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.version = detect_version(self.path)
        if self.version is None:
            raise DataError(
                "not a LeRobot dataset (meta/info.json with codebase_version v2.x or v3.x)",
                file=self.path / "meta/info.json",
            )
        self.format = "lerobot_v21" if self.version == "v2.1" else "lerobot_v30"
        self.meta = _read_json(self.path / "meta/info.json")
        if "features" not in self.meta or "fps" not in self.meta:
            raise DataError(
                "info.json needs 'features' and 'fps'", file=self.path / "meta/info.json"
            )
        self.features = self.meta["features"]
        info_file = self.path / "meta/info.json"
        try:
            self.fps = float(self.meta["fps"])
        except (TypeError, ValueError):
            raise DataError(
                f"fps is {self.meta['fps']!r}; expected a number", file=info_file, key="fps"
            ) from None
        if not isinstance(self.features, dict):
            raise DataError("expected an object of features", file=info_file, key="features")
        for name, feat in self.features.items():
            missing = [k for k in ("dtype", "shape") if not isinstance(feat, dict) or k not in feat]
            if missing:
                raise DataError(
                    f"feature without {' and '.join(missing)}; every feature needs dtype and shape",
                    file=info_file,
                    key=f"features.{name}",
                )
        vt_path = self.path / VLATUNE_META
        self.vt = _read_json(vt_path) if vt_path.is_file() else {}
        self.video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]
        self.image_keys = [k for k, f in self.features.items() if f.get("dtype") == "image"]
        if self.image_keys:
            raise DataError(
                "image features stored in parquet are not supported yet; store cameras as video",
                file=self.path,
                key=self.image_keys[0],
            )
        names = self.vt.get("cameras") or {k: self._camera_name(k) for k in self.video_keys}
        self.camera_keys = {cam: key for key, cam in names.items()}
        self.extras = self.vt.get("extras") or {
            k: {"key": k, "shape": list(f["shape"]), "dtype": f["dtype"]}
            for k, f in self.features.items()
            if k not in (ACTION, STATE, *INDEX_COLUMNS)
            and f.get("dtype") not in ("video", "image", "string")
        }
        if ACTION not in self.features:
            raise DataError(
                "no 'action' feature", file=self.path / "meta/info.json", key="features.action"
            )
        self._load_episodes()
        self._tables: dict[Path, pa.Table] = {}

    @staticmethod
    def _camera_name(key: str) -> str:
        short = key[len(IMAGE_PREFIX) :] if key.startswith(IMAGE_PREFIX) else key
        return CAMERA_ALIASES.get(short, short)

    def _load_episodes(self) -> None:
        if self.version == "v2.1":
            ep_file = self.path / "meta/episodes.jsonl"
            rows = _read_jsonl(ep_file)
            _require(rows, ("episode_index", "length"), ep_file, "line")
            tasks_file = self.path / "meta/tasks.jsonl"
            task_rows = _read_jsonl(tasks_file)
            _require(task_rows, ("task_index", "task"), tasks_file, "line")
            self.tasks_by_index = {r["task_index"]: r["task"] for r in task_rows}
            self.episodes = sorted(rows, key=lambda r: r["episode_index"])
        else:
            files = sorted((self.path / "meta/episodes").glob("*/*.parquet"))
            if not files:
                raise DataError("no episode metadata", file=self.path / "meta/episodes")
            table = pa.concat_tables([_read_parquet(f) for f in files])
            rows = table.to_pylist()
            _require(rows, ("episode_index", "length", "data/chunk_index"), files[0], "row")
            self.episodes = sorted(rows, key=lambda r: r["episode_index"])
            tasks_file = self.path / "meta/tasks.parquet"
            if not tasks_file.is_file():
                raise DataError("missing metadata file", file=tasks_file)
            t = _read_parquet(tasks_file)
            task_col = "task" if "task" in t.column_names else "__index_level_0__"
            if task_col not in t.column_names:
                raise DataError("no 'task' column or index", file=tasks_file, key="task")
            self.tasks_by_index = dict(
                zip(t.column("task_index").to_pylist(), t.column(task_col).to_pylist(), strict=True)
            )
        self._info = DatasetInfo(
            format=self.format,
            path=self.path,
            fps=self.fps,
            num_episodes=len(self.episodes),
            num_frames=int(sum(int(r.get("length", 0)) for r in self.episodes)),
            cameras=list(self.camera_keys),
            features=self._feature_specs(),
            image_orientation=self.vt.get("image_orientation", "upright"),
            gripper=self.vt.get("gripper", "-1_open"),
            orientation_source="declared" if "image_orientation" in self.vt else "assumed",
        )

    def _feature_specs(self) -> dict[str, FeatureSpec]:
        out = {
            "action": FeatureSpec(
                tuple(self.features[ACTION]["shape"]), self.features[ACTION]["dtype"]
            )
        }
        if STATE in self.features:
            out["state"] = FeatureSpec(
                tuple(self.features[STATE]["shape"]), self.features[STATE]["dtype"]
            )
        for cam, key in self.camera_keys.items():
            out[f"image.{cam}"] = FeatureSpec(tuple(self.features[key]["shape"]), "uint8")
        for spec in self.extras.values():
            out[spec["key"]] = FeatureSpec(tuple(spec["shape"]), spec["dtype"])
        return out

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def episode_length(self, i: int) -> int:
        return int(self.episodes[i]["length"])

    def instruction(self, i: int) -> str:
        tasks = self.episodes[i].get("tasks") or []
        return str(tasks[0]) if tasks else ""

    def _data_file(self, i: int) -> Path:
        r = self.episodes[i]
        if self.version == "v2.1":
            template = self.meta.get("data_path", V21_DATA)
            chunks = int(self.meta.get("chunks_size", CHUNKS_SIZE))
            return self.path / template.format(
                episode_chunk=r["episode_index"] // chunks, episode_index=r["episode_index"]
            )
        template = self.meta.get("data_path", V30_DATA)
        return self.path / template.format(
            chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]
        )

    def episode_source(self, i: int) -> str:
        return str(self._data_file(i))

    def undeclared(self, i: int) -> list[tuple[str, str]]:
        """Columns of episode i's data that meta/info.json does not declare (they would be
        silently dropped: a missing `observation.state` feature would give a copy without
        state)."""
        known = set(self.features) | set(INDEX_COLUMNS)
        known |= {spec.get("key", k) for k, spec in self.extras.items()}
        return [
            (
                name,
                "column in the data but not declared in meta/info.json 'features'; it would be "
                "dropped: declare it there (dtype, shape)",
            )
            for name in self._table(i).column_names
            if name not in known and not name.startswith("__")
        ]

    def dataset_problems(self) -> list[tuple[Path, str, str]]:
        """Camera videos stored but not declared in meta/info.json (they would be dropped)."""
        roots = (
            list((self.path / "videos").glob("chunk-*"))
            if self.version == "v2.1"
            else [self.path / "videos"]
        )
        found = {d.name for r in roots if r.is_dir() for d in r.iterdir() if d.is_dir()}
        if self.version != "v2.1":
            found = {k for k in found if not k.startswith("chunk-")}
        return [
            (
                self.path / "meta/info.json",
                key,
                "camera videos stored but not declared in 'features'; they would be dropped: "
                "declare the feature (dtype video, shape [H, W, 3])",
            )
            for key in sorted(found - set(self.video_keys))
        ]

    def _table(self, i: int) -> pa.Table:
        fp = self._data_file(i)
        table = self._tables.get(fp)
        if table is None:
            if not fp.is_file():
                raise DataError(
                    "missing data file", file=fp, episode=self.episodes[i]["episode_index"]
                )
            table = pq.read_table(fp)
            if len(self._tables) > 8:
                self._tables.pop(next(iter(self._tables)))
            self._tables[fp] = table
        if self.version == "v3.0":
            ep = self.episodes[i]["episode_index"]
            mask = pa.compute.equal(table.column("episode_index"), ep)
            table = table.filter(mask)
        return table

    def _video(self, i: int, cam: str) -> tuple[Path, float]:
        r = self.episodes[i]
        key = self.camera_keys.get(cam)
        if key is None:
            raise DataError(
                f"no camera '{cam}' (cameras: {sorted(self.camera_keys)})",
                file=self.path,
                key=f"{IMAGE_PREFIX}{cam}",
            )
        if self.version == "v2.1":
            template = self.meta.get("video_path", V21_VIDEO)
            chunks = int(self.meta.get("chunks_size", CHUNKS_SIZE))
            fp = self.path / template.format(
                episode_chunk=r["episode_index"] // chunks,
                video_key=key,
                episode_index=r["episode_index"],
            )
            return fp, 0.0
        template = self.meta.get("video_path", V30_VIDEO)
        fp = self.path / template.format(
            video_key=key,
            chunk_index=r[f"videos/{key}/chunk_index"],
            file_index=r[f"videos/{key}/file_index"],
        )
        return fp, float(r[f"videos/{key}/from_timestamp"])

    def read_frames(self, i: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        fp, offset = self._video(i, camera)
        if not fp.is_file():
            raise DataError(
                "missing video file",
                file=fp,
                episode=self.episodes[i]["episode_index"],
                key=self.camera_keys[camera],
            )
        try:
            return decode_frames(fp, frames, self.fps, offset)
        except ValueError as e:
            raise DataError(
                str(e),
                file=fp,
                episode=self.episodes[i]["episode_index"],
                key=self.camera_keys[camera],
            ) from None

    def load_episode(self, i: int, cameras: Sequence[str] | None = None) -> Episode:
        table = self._table(i)
        T = table.num_rows
        ep_index = self.episodes[i]["episode_index"]
        src = self._data_file(i)

        def col(name: str) -> np.ndarray:
            if name not in table.column_names:
                raise DataError("missing column", file=src, episode=ep_index, key=name)
            f = self.features.get(name, {})
            shape = tuple(f.get("shape", ()))
            try:
                return _column_to_numpy(table, name, shape, f.get("dtype", "float32"))
            except (ValueError, TypeError, pa.ArrowException) as e:
                raise DataError(
                    f"values do not fit the shape {list(shape)} and dtype {f.get('dtype')} "
                    f"declared in meta/info.json ({e})",
                    file=src,
                    episode=ep_index,
                    key=name,
                ) from None

        actions = col(ACTION)
        states = col(STATE) if STATE in self.features else None
        extras = {}
        for name, spec in self.extras.items():
            extras[spec["key"]] = (
                col(name).reshape(T, *spec["shape"]).astype(spec["dtype"], copy=False)
            )
        cams = self.info.cameras if cameras is None else list(cameras)
        images = {c: self.read_frames(i, c, range(T)) for c in cams} if T else {}
        meta = {"source": f"{src.name}:episode {ep_index}", "episode_index": ep_index}
        meta.update(self.vt.get("episode_meta", {}).get(str(ep_index), {}))
        return Episode(
            actions=actions,
            instruction=self.instruction(i),
            states=states,
            images=images,
            extras=extras,
            meta=meta,
        )


# ------------------------------------------------------------------------------------ writing
def _list_column(arr: np.ndarray) -> pa.Array:
    arr = np.ascontiguousarray(arr)
    n = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1
    if arr.ndim == 1:
        return pa.array(arr)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), n)


def _feature_entry(arr: np.ndarray, names: Any = None) -> dict[str, Any]:
    shape = list(arr.shape[1:]) or [1]
    return {"dtype": str(arr.dtype), "shape": shape, "names": names}


def _extra_feature_name(key: str) -> str:
    return "extra." + key.replace("/", ".")


def _episode_table(
    ep: Episode, ep_index: int, task_index: int, start_index: int, fps: float
) -> pa.Table:
    T = ep.length
    cols = {ACTION: _list_column(ep.actions)}
    if ep.states is not None:
        cols[STATE] = _list_column(ep.states)
    for k, v in ep.extras.items():
        cols[_extra_feature_name(k)] = _list_column(v.reshape(T, -1) if v.ndim > 2 else v)
    cols["timestamp"] = pa.array((np.arange(T) / fps).astype(np.float32))
    cols["frame_index"] = pa.array(np.arange(T, dtype=np.int64))
    cols["episode_index"] = pa.array(np.full(T, ep_index, dtype=np.int64))
    cols["index"] = pa.array(np.arange(start_index, start_index + T, dtype=np.int64))
    cols["task_index"] = pa.array(np.full(T, task_index, dtype=np.int64))
    return pa.table(cols)


def _stats_for_lerobot(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Rename to LeRobot feature names; image stats get LeRobot's (3, 1, 1) shape."""
    out = {}
    for name, s in stats.items():
        if name == "action":
            key = ACTION
        elif name == "state":
            key = STATE
        elif name.startswith("image."):
            key = IMAGE_PREFIX + name[len("image.") :]
            s = {k: (np.asarray(v).reshape(-1, 1, 1) if k != "count" else v) for k, v in s.items()}
        else:
            key = _extra_feature_name(name)
        out[key] = {k: np.asarray(v).tolist() for k, v in s.items()}
    return out


def write_lerobot(
    reader: DatasetReader,
    out_dir: str | Path,
    version: str = "v2.1",
    codec: str = "h264",
    image_orientation: str | None = None,
    robot_type: str = "panda",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write every episode of `reader` as a LeRobot dataset in `out_dir` (which must not exist).

    Frames keep the source orientation unless `image_orientation` asks for the other one (then
    they are rotated by 180 degrees and the new orientation is declared). Returns a report with
    per-camera PSNR of the encoded video against the source frames.
    """
    from vlatune.conventions import to_upright

    if version not in ("v2.1", "v3.0"):
        raise ValueError("version must be 'v2.1' or 'v3.0'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    info = reader.info
    fps = float(info.fps)
    src_orient = info.image_orientation
    orient = image_orientation or src_orient
    rotate = orient != src_orient
    cams = list(info.cameras)
    video_keys = {cam: IMAGE_PREFIX + cam for cam in cams}
    tasks: dict[str, int] = {}
    features: dict[str, Any] = {}
    episodes_meta: list[dict[str, Any]] = []
    episodes_stats: list[dict[str, Any]] = []
    extras_meta: dict[str, Any] = {}
    episode_meta: dict[str, Any] = {}
    agg = StatsAccumulator()
    psnr_sum = {c: 0.0 for c in cams}
    psnr_n = {c: 0 for c in cams}
    index = 0
    v3_tables: list[pa.Table] = []
    v3_videos = (
        {
            c: VideoWriter(
                out / V30_VIDEO.format(video_key=video_keys[c], chunk_index=0, file_index=0),
                fps,
                codec,
            )
            for c in cams
        }
        if version == "v3.0"
        else {}
    )
    try:
        for i in range(len(reader)):
            ep = reader.load_episode(i)
            if rotate:
                ep.images = {c: to_upright(v) for c, v in ep.images.items()}
            task_index = tasks.setdefault(ep.instruction, len(tasks))
            table = _episode_table(ep, i, task_index, index, fps)
            if i == 0:
                features[ACTION] = _feature_entry(ep.actions)
                if ep.states is not None:
                    features[STATE] = _feature_entry(ep.states)
                for k, v in ep.extras.items():
                    name = _extra_feature_name(k)
                    flat = v.reshape(len(v), -1) if v.ndim > 2 else v
                    features[name] = _feature_entry(flat)
                    extras_meta[name] = {
                        "key": k,
                        "shape": list(v.shape[1:]),
                        "dtype": str(v.dtype),
                    }
            row: dict[str, Any] = {
                "episode_index": i,
                "tasks": [ep.instruction],
                "length": ep.length,
            }
            for c in cams:
                frames = ep.images[c]
                if version == "v2.1":
                    vp = out / V21_VIDEO.format(
                        episode_chunk=i // CHUNKS_SIZE, video_key=video_keys[c], episode_index=i
                    )
                    with VideoWriter(vp, fps, codec) as w:
                        w.write(frames)
                    decoded, offset = vp, 0.0
                else:
                    w = v3_videos[c]
                    offset = w.frames_written / fps
                    row[f"videos/{video_keys[c]}/chunk_index"] = 0
                    row[f"videos/{video_keys[c]}/file_index"] = 0
                    row[f"videos/{video_keys[c]}/from_timestamp"] = offset
                    row[f"videos/{video_keys[c]}/to_timestamp"] = offset + ep.length / fps
                    w.write(frames)
                    decoded = None
                if decoded is not None:
                    back = decode_frames(decoded, range(ep.length), fps, offset)
                    psnr_sum[c] += psnr(back, frames)
                    psnr_n[c] += 1
                if i == 0:
                    H, W = frames.shape[1:3]
                    features[video_keys[c]] = {
                        "dtype": "video",
                        "shape": [H, W, 3],
                        "names": ["height", "width", "channels"],
                        "info": {
                            "video.height": H,
                            "video.width": W,
                            "video.codec": codec,
                            "video.pix_fmt": "yuv420p",
                            "video.is_depth_map": False,
                            "video.fps": fps,
                            "video.channels": 3,
                            "has_audio": False,
                        },
                    }
            arrays = {"action": ep.actions}
            if ep.states is not None:
                arrays["state"] = ep.states
            arrays.update({k: v for k, v in ep.extras.items() if np.issubdtype(v.dtype, np.number)})
            arrays.update({f"image.{c}": ep.images[c] for c in cams})
            st = episode_stats(arrays)
            for name, arr in arrays.items():
                if name.startswith("image."):
                    idx = sample_frame_indices(len(arr), 20)
                    agg.update(name, image_channel_values(arr[idx]), quantiles=False)
                else:
                    agg.update(name, arr)
            lr_stats = _stats_for_lerobot(st)
            if ep.meta.get("init_state") is not None or ep.meta.get("task_name"):
                episode_meta[str(i)] = {
                    k: ep.meta[k] for k in ("init_state", "task_name") if k in ep.meta
                }
            if version == "v2.1":
                dp = out / V21_DATA.format(episode_chunk=i // CHUNKS_SIZE, episode_index=i)
                dp.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, dp)
                episodes_meta.append(row)
                episodes_stats.append({"episode_index": i, "stats": lr_stats})
            else:
                row.update(
                    {
                        "data/chunk_index": 0,
                        "data/file_index": 0,
                        "dataset_from_index": index,
                        "dataset_to_index": index + ep.length,
                        "meta/episodes/chunk_index": 0,
                        "meta/episodes/file_index": 0,
                    }
                )
                for feat, s in lr_stats.items():
                    for stat, v in s.items():
                        row[f"stats/{feat}/{stat}"] = np.asarray(v).reshape(-1).tolist()
                episodes_meta.append(row)
                v3_tables.append(table)
            index += ep.length
            if progress is not None:
                progress(i)
    finally:
        for w in v3_videos.values():
            w.close()
    if version == "v3.0":
        for c in cams:  # PSNR of the packed files, episode by episode
            for row in episodes_meta:
                key = video_keys[c]
                vp = out / V30_VIDEO.format(video_key=key, chunk_index=0, file_index=0)
                back = decode_frames(
                    vp, range(row["length"]), fps, row[f"videos/{key}/from_timestamp"]
                )
                frames = reader.load_episode(row["episode_index"], cameras=[c]).images[c]
                if rotate:
                    frames = to_upright(frames)
                psnr_sum[c] += psnr(back, frames)
                psnr_n[c] += 1
    for name in INDEX_COLUMNS:
        features[name] = {
            "dtype": "float32" if name == "timestamp" else "int64",
            "shape": [1],
            "names": None,
        }
    total_frames = index
    n = len(episodes_meta)
    meta_info: dict[str, Any] = {
        "codebase_version": version,
        "robot_type": robot_type,
        "total_episodes": n,
        "total_frames": total_frames,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "fps": fps,
        "splits": {"train": f"0:{n}"},
        "features": features,
    }
    if version == "v2.1":
        meta_info.update(
            {
                "total_videos": n * len(cams),
                "total_chunks": (n - 1) // CHUNKS_SIZE + 1 if n else 0,
                "data_path": V21_DATA,
                "video_path": V21_VIDEO if cams else None,
            }
        )
    else:
        meta_info.update(
            {
                "data_files_size_in_mb": 100,
                "video_files_size_in_mb": 500,
                "data_path": V30_DATA,
                "video_path": V30_VIDEO if cams else None,
            }
        )
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "meta/info.json").write_text(json.dumps(meta_info, indent=4))
    dataset_stats = _stats_for_lerobot(to_json(agg.result())) if n else {}
    if version == "v2.1":
        (out / "meta/episodes.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in episodes_meta)
        )
        (out / "meta/tasks.jsonl").write_text(
            "".join(json.dumps({"task_index": v, "task": k}) + "\n" for k, v in tasks.items())
        )
        (out / "meta/episodes_stats.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in episodes_stats)
        )
    else:
        dp = out / V30_DATA.format(chunk_index=0, file_index=0)
        dp.parent.mkdir(parents=True, exist_ok=True)
        if v3_tables:
            pq.write_table(pa.concat_tables(v3_tables), dp)
        ep_path = out / V30_EPISODES.format(chunk_index=0, file_index=0)
        ep_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(episodes_meta), ep_path)
        _write_tasks_parquet(tasks, out / "meta/tasks.parquet")
        (out / "meta/stats.json").write_text(json.dumps(dataset_stats, indent=2))
    vt = {
        "image_orientation": orient,
        "gripper": info.gripper,
        "cameras": {video_keys[c]: c for c in cams},
        "extras": extras_meta,
        "episode_meta": episode_meta,
        "source_format": info.format,
    }
    (out / VLATUNE_META).write_text(json.dumps(vt))
    return {
        "episodes": n,
        "frames": total_frames,
        "psnr_db": {c: (psnr_sum[c] / psnr_n[c] if psnr_n[c] else None) for c in cams},
        "image_orientation": orient,
        "rotated": rotate,
    }


def _write_tasks_parquet(tasks: dict[str, int], path: Path) -> None:
    """tasks.parquet as pandas writes it (task strings as the index), without needing pandas."""
    table = pa.table(
        {
            "task_index": pa.array(list(tasks.values()), pa.int64()),
            "task": pa.array(list(tasks.keys()), pa.string()),
        }
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": "task",
                "field_name": "task",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(table, path)

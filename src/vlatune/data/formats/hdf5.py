"""Any HDF5 layout, read through a declared key mapping (YAML).

For datasets such as `action (N,6)`, `observations/ee_pose (N,6)`, `observations/qpos`,
`observations/images/camera1 (N,H,W,3)`, `timestamp`, `phase`, `language_instruction`: one file
per episode, or many episodes per file (groups matching `episode_groups`). Images may be raw
arrays or JPEG/PNG bytes (decoded with PIL). A mapping file:

    action: action
    state: [observations/ee_pose, observations/qpos]   # concatenated along the last axis
    cameras: {camera1: observations/images/camera1}
    instruction: language_instruction                   # a dataset, or "@attr_name" for an attribute
    default_instruction: pick up the cube               # used when the file has none
    extras: {timestamp: timestamp, phase: phase}
    fps: 10
    image_orientation: upright
    gripper: "-1_open"
    image_range: [0, 1]        # only for float (or 16-bit) frames: their value range, -> uint8

    >>> reader = HDF5Reader("data/my_robot", mapping="data/my_robot/mapping.yaml")
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from vlatune.config.schema import Strict
from vlatune.conventions import GripperConvention, ImageOrientation
from vlatune.data.episode import DataError, DatasetInfo, DatasetReader, Episode, FeatureSpec
from vlatune.data.formats._h5 import H5Files, frames_to_uint8

FORMAT = "hdf5"
MAPPING_FILE = "vlatune_mapping.yaml"


class HDF5Mapping(Strict):
    action: str
    state: list[str] | str | None = None
    cameras: dict[str, str] = Field(default_factory=dict)
    instruction: str | None = Field(None, description="dataset path, or '@attr' for an attribute")
    default_instruction: str | None = None
    extras: dict[str, str] = Field(default_factory=dict)
    episode_groups: str | None = Field(
        None, description="glob of episode groups inside a file, e.g. 'episode_*' or 'data/demo_*'"
    )
    fps: float = Field(10.0, gt=0)
    image_orientation: ImageOrientation = "upright"
    gripper: GripperConvention = "-1_open"
    action_range: tuple[float, float] | None = (-1.0, 1.0)
    file_glob: str = "*.hdf5"
    images_encoded: Literal["auto", "raw", "bytes"] = "auto"
    image_range: tuple[float, float] | None = Field(
        None,
        description="value range of float / 16-bit frames, e.g. [0, 1]; they are read as uint8",
    )

    @field_validator("image_range")
    @classmethod
    def _range_increasing(cls, v):
        if v is not None and not v[1] > v[0]:
            raise ValueError(f"image_range must be [low, high] with high > low, got {list(v)}")
        return v

    @property
    def state_keys(self) -> list[str]:
        if self.state is None:
            return []
        return [self.state] if isinstance(self.state, str) else list(self.state)


def load_mapping(path: str | Path) -> HDF5Mapping:
    path = Path(path)
    if not path.is_file():
        raise DataError("key mapping file not found", file=path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"invalid YAML: {e}", file=path) from None
    try:
        return HDF5Mapping.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(
            f"'{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors()
        )
        raise DataError(f"invalid key mapping: {msgs}", file=path) from None


def _match(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def decode_image_bytes(blob) -> np.ndarray:
    from PIL import Image

    data = bytes(blob.tobytes() if isinstance(blob, np.ndarray) else blob)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class HDF5Reader(DatasetReader):
    format = FORMAT

    def __init__(self, path: str | Path, mapping: str | Path | HDF5Mapping | None = None):
        self.path = Path(path)
        if mapping is None:
            candidate = (self.path if self.path.is_dir() else self.path.parent) / MAPPING_FILE
            if not candidate.is_file():
                raise DataError(
                    f"an HDF5 dataset needs a key mapping: pass --mapping FILE.yaml or put {MAPPING_FILE} next to the data "
                    "(keys: action, state, cameras, instruction, default_instruction, extras, fps, image_orientation, gripper)",
                    file=self.path,
                )
            mapping = candidate
        self.mapping = mapping if isinstance(mapping, HDF5Mapping) else load_mapping(mapping)
        files = (
            [self.path] if self.path.is_file() else sorted(self.path.glob(self.mapping.file_glob))
        )
        if not files:
            raise DataError(f"no files matching '{self.mapping.file_glob}'", file=self.path)
        self._h5 = H5Files()
        self._index: list[tuple[Path, str]] = []  # (file, group path; "" = the whole file)
        for fp in files:
            f = self._open(fp)
            if self.mapping.episode_groups:
                parent, _, pattern = self.mapping.episode_groups.rpartition("/")
                root = f[parent] if parent else f
                names = sorted(k for k in root if _match(k, pattern))
                self._index += [(fp, f"{parent}/{k}" if parent else k) for k in names]
            else:
                self._index.append((fp, ""))
        self._lengths = [self._length(i) for i in range(len(self._index))]
        self._info = self._build_info()

    def _open(self, fp: Path) -> h5py.File:
        return self._h5.open(fp)

    def _group(self, i: int) -> h5py.Group:
        fp, g = self._index[i]
        f = self._open(fp)
        return f[g] if g else f

    def _ds(self, i: int, key: str) -> h5py.Dataset:
        g = self._group(i)
        if key not in g:
            fp, name = self._index[i]
            raise DataError("missing dataset", file=fp, episode=name or fp.stem, key=key)
        return g[key]

    def _length(self, i: int) -> int:
        # an episode without its action dataset is indexed (length 0): validation names it
        g = self._group(i)
        key = self.mapping.action
        return int(g[key].shape[0]) if key in g else 0

    def _build_info(self) -> DatasetInfo:
        features: dict[str, FeatureSpec] = {}
        if self._index:
            a = self._ds(0, self.mapping.action)
            features["action"] = FeatureSpec(tuple(a.shape[1:]), str(a.dtype))
            if self.mapping.state_keys:
                dims = sum(int(np.prod(self._ds(0, k).shape[1:])) for k in self.mapping.state_keys)
                features["state"] = FeatureSpec((dims,), "float32")
            for cam, key in self.mapping.cameras.items():
                ds = self._ds(0, key)
                shape = tuple(ds.shape[1:]) if ds.ndim == 4 else tuple(self._image(ds, 0).shape)
                features[f"image.{cam}"] = FeatureSpec(shape, "uint8")
            for name, key in self.mapping.extras.items():
                ds = self._ds(0, key)
                features[name] = FeatureSpec(tuple(ds.shape[1:]), str(ds.dtype))
        return DatasetInfo(
            format=FORMAT,
            path=self.path,
            fps=self.mapping.fps,
            num_episodes=len(self._index),
            num_frames=int(sum(self._lengths)),
            cameras=list(self.mapping.cameras),
            features=features,
            image_orientation=self.mapping.image_orientation,
            gripper=self.mapping.gripper,
            orientation_source="declared",
            action_range=self.mapping.action_range,
        )

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def episode_length(self, i: int) -> int:
        return self._lengths[i]

    def episode_source(self, i: int) -> str:
        fp, g = self._index[i]
        return f"{fp}:{g}" if g else str(fp)

    def instruction(self, i: int) -> str:
        key = self.mapping.instruction
        g = self._group(i)
        value = None
        if key and key.startswith("@"):
            value = g.attrs.get(key[1:])
            if value is None and g.file is not g:
                value = g.file.attrs.get(key[1:])
        elif key and key in g:
            ds = g[key]
            value = ds[()] if ds.ndim == 0 else ds[0]
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.ndarray):
            value = value.item() if value.size == 1 else None
            value = value.decode() if isinstance(value, bytes) else value
        text = str(value).strip() if value is not None else ""
        return text or (self.mapping.default_instruction or "")

    def _encoded(self, ds: h5py.Dataset) -> bool:
        if self.mapping.images_encoded != "auto":
            return self.mapping.images_encoded == "bytes"
        return ds.ndim != 4

    def _image(self, ds: h5py.Dataset, t: int) -> np.ndarray:
        return decode_image_bytes(ds[t]) if self._encoded(ds) else ds[t]

    def _to_uint8(self, frames: np.ndarray, i: int, key: str) -> np.ndarray:
        fp, g = self._index[i]
        where = {"file": fp, "episode": g or fp.stem, "key": key}
        return frames_to_uint8(frames, self.mapping.image_range, where, "mapping key image_range")

    def frame_count(self, i: int, camera: str) -> int:
        """Stored frames of a camera in episode i (from the dataset's shape; nothing decoded)."""
        return int(self._ds(i, self._camera_key(camera)).shape[0])

    def _camera_key(self, camera: str) -> str:
        key = self.mapping.cameras.get(camera)
        if key is None:
            raise DataError(
                f"no camera '{camera}' in the mapping (cameras: {sorted(self.mapping.cameras)})",
                file=self.path,
                key=f"cameras.{camera}",
            )
        return key

    def read_frames(self, i: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        key = self._camera_key(camera)
        ds = self._ds(i, key)
        idx = [int(j) for j in frames]
        if self._encoded(ds):
            try:
                return np.stack([decode_image_bytes(ds[j]) for j in idx])
            except Exception as e:  # PIL raises several types for bad bytes
                fp, g = self._index[i]
                raise DataError(
                    f"cannot decode image ({e})", file=fp, episode=g or fp.stem, key=key
                ) from None
        uniq, inv = np.unique(idx, return_inverse=True)
        return self._to_uint8(ds[uniq.tolist()][inv], i, key)

    def _all_frames(self, i: int, camera: str) -> np.ndarray:
        """Every stored frame (its count may differ from the actions': `data check` says so)."""
        key = self._camera_key(camera)
        ds = self._ds(i, key)
        if self._encoded(ds):
            return self.read_frames(i, camera, range(ds.shape[0]))
        return self._to_uint8(ds[()], i, key)

    def load_episode(self, i: int, cameras: Sequence[str] | None = None) -> Episode:
        fp, g = self._index[i]
        actions = self._ds(i, self.mapping.action)[()]
        states = None
        if self.mapping.state_keys:
            parts = []
            for k in self.mapping.state_keys:
                part = self._ds(i, k)[()]
                if part.ndim == 0 or len(part) != len(actions):
                    raise DataError(
                        f"{k} has shape {part.shape}: {len(part) if part.ndim else 0} frames but "
                        f"{len(actions)} actions; expected {len(actions)}",
                        file=fp,
                        episode=g or fp.stem,
                        key="state",
                    )
                parts.append(part.reshape(len(actions), -1))
            states = np.concatenate(parts, axis=1).astype(np.float32)
        cams = self.info.cameras if cameras is None else list(cameras)
        images = {c: self._all_frames(i, c) for c in cams}
        extras = {name: self._ds(i, key)[()] for name, key in self.mapping.extras.items()}
        return Episode(
            actions=actions,
            instruction=self.instruction(i),
            states=states,
            images=images,
            extras=extras,
            meta={"source": self.episode_source(i)},
        )

    def close(self) -> None:
        self._h5.close()

"""RLDS datasets as TFDS builds them (Open X-Embodiment, OpenVLA's `libero_*_no_noops`): read + write.

A TFDS dataset folder (`<data_dir>/<name>/<version>/`) holds `dataset_info.json` (name, splits,
records per shard), `features.json` (the `FeaturesDict` tree) and TFRecord shards
`<name>-<split>.tfrecord-XXXXX-of-YYYYY`. One record is one episode: a `tf.train.Example` whose
keys are the flattened feature paths (`steps/action`, `steps/observation/image`,
`steps/language_instruction`, `steps/is_first`, `episode_metadata/file_path`, ...); a `steps`
feature (`Dataset` / `Sequence`) stores its T values back to back (floats in a float_list,
ints and bools in an int64_list, text and encoded PNG / JPEG images one bytes entry per step,
`Tensor(encoding=bytes)` one raw buffer per step).

Dependency choice: no tensorflow (about 2 GB, and not needed to read). The TFRecord framing
(uint64 length, masked CRC32C of the length, data, masked CRC32C of the data) is read here with
both checksums verified through `google-crc32c` (Google's C implementation, one small wheel);
the `tf.train.Example` protobuf is decoded by a small wire-format decoder written here (four
fixed messages, unchanged since TF 1.0): packed floats become numpy arrays without a copy and
images stay offsets into the memory-mapped shard, so reading a training frame touches only its
JPEG bytes. The `protobuf` package would decode every image into a Python bytes object first.
TFDS writes `tf.train.Example` for every builder (nested sequences flattened, as above), so
`SequenceExample` records are refused with a clear error.

Conventions: RLDS has no field for image orientation, gripper sign, fps or which observation is
the proprio state. They come, in this order, from `vlatune_mapping.yaml` next to the data (the
file the custom-HDF5 reader uses; keys are relative to `steps/`, `@path` for episode-level
features), from `vlatune.json` (written by vlatune's writer), from the table of known datasets
below (OpenVLA's LIBERO RLDS: frames flipped upright by `regenerate_libero_dataset.py`, raw
gripper actions -1 = open / +1 = close, `observation/state` = eef_pos + axis-angle + gripper_qpos,
`observation/joint_state` kept as an extra, 20 Hz), else the format default (assumed).
`data inspect --json` lists each convention with its source under `conventions`.

Training reads an episode's record once per process (CRC-checked), keeps its actions and the
file offsets of its frames, then decodes single frames on demand: random access, so the
sampler's order and exact resume stay exact and DataLoader workers each open their own maps.

    >>> reader = RLDSReader("datasets/libero_object_no_noops/1.0.0")
    >>> write_rlds(reader_of_any_format, "out/my_rlds", name="my_dataset")
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlatune.data.episode import DataError, DatasetInfo, DatasetReader, Episode, FeatureSpec

FORMAT = "rlds"
VLATUNE_META = "vlatune.json"
MAPPING_FILE = "vlatune_mapping.yaml"
SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[^-.]+)\.tfrecord-(?P<i>\d{5})-of-(?P<n>\d{5})$")
CAMERA_ALIASES = {"image": "agentview", "wrist_image": "wrist"}  # OpenVLA's LIBERO RLDS names
STEP_FIELDS = ("reward", "discount", "is_first", "is_last", "is_terminal")

# Known datasets whose conventions are declared by their producers' code, not guessed.
# OpenVLA / OpenVLA-OFT LIBERO RLDS (`experiments/robot/libero/regenerate_libero_dataset.py` then
# the `LIBERO_*` builders of moojink/rlds_dataset_builder): agentview and wrist frames flipped
# [::-1, ::-1] (upright), actions as LIBERO stores them (gripper -1 open / +1 close: OpenVLA's
# trainer clips and inverts later), 8-d state = ee_states (eef_pos + axis-angle) + gripper_states.
KNOWN_DATASETS: list[tuple[re.Pattern[str], dict[str, Any], str]] = [
    (
        re.compile(
            r"^(libero_(spatial|object|goal|10|90)(_no_noops)?|liber_o(10|90)(_no_noops)?)$"
        ),
        {
            "image_orientation": "upright",
            "gripper": "-1_open",
            "state": "observation/state",
            "fps": 20.0,
        },
        "OpenVLA LIBERO RLDS",
    )
]


# ------------------------------------------------------------------------------ TFRecord framing
try:
    import google_crc32c as _crc32c
except ImportError:  # pragma: no cover - a dependency of vlatune
    _crc32c = None


def _crc(data) -> int:
    if _crc32c is None:
        raise DataError(
            "reading RLDS needs google-crc32c: pip install google-crc32c (a vlatune dependency)"
        )
    return _crc32c.value(bytes(data) if isinstance(data, memoryview) else data)


def masked_crc(data) -> int:
    c = _crc(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data))


def index_shard(path: Path, buf, first_episode: int = 0) -> list[tuple[int, int]]:
    """(data offset, data length) of every record; checks the framing and the length CRCs."""
    out, pos, size = [], 0, len(buf)
    while pos < size:
        ep = first_episode + len(out)
        if pos + 12 > size:
            raise DataError(
                f"truncated shard: {size - pos} trailing byte(s) at offset {pos}, too few for a "
                "record header (the file was cut short; re-copy it)",
                file=path,
                episode=ep,
            )
        (n,) = struct.unpack_from("<Q", buf, pos)
        (crc,) = struct.unpack_from("<I", buf, pos + 8)
        if masked_crc(buf[pos : pos + 8]) != crc:
            raise DataError(
                f"corrupt record header at offset {pos} (length checksum mismatch)",
                file=path,
                episode=ep,
            )
        if pos + 12 + n + 4 > size:
            raise DataError(
                f"truncated shard: the record at offset {pos} needs {n + 16} bytes, the file has "
                f"{size - pos} left (the file was cut short; re-copy it)",
                file=path,
                episode=ep,
            )
        out.append((pos + 12, n))
        pos += 12 + n + 4
    return out


# ------------------------------------------------------------- tf.train.Example wire format
def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _varints(raw) -> np.ndarray:
    """Packed varints -> int64 (vectorised; negative int64 are 10-byte varints)."""
    a = np.frombuffer(raw, np.uint8)
    if a.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(a < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() == 1:
        return a[ends].astype(np.int64)
    pos = np.arange(a.size) - np.repeat(starts, lengths)
    parts = (a & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(parts, starts).view(np.int64)


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of one message; LEN values as (start, end) offsets."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 2:
            n, pos = _varint(buf, pos)
            yield num, wt, (pos, pos + n)
            pos += n
        elif wt == 0:
            v, pos = _varint(buf, pos)
            yield num, wt, v
        elif wt == 5:
            yield num, wt, (pos, pos + 4)
            pos += 4
        elif wt == 1:
            yield num, wt, (pos, pos + 8)
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
    if pos != end:
        raise ValueError("a protobuf field runs past its message")


@dataclass
class RawFeature:
    kind: str  # "bytes", "float", "int64"
    values: Any  # np.ndarray for float / int64; list of (start, end) offsets for bytes


def parse_example(buf, start: int, end: int) -> dict[str, RawFeature]:
    """A serialised tf.train.Example -> {key: RawFeature}; bytes values stay offsets into buf."""
    out: dict[str, RawFeature] = {}
    for num, wt, val in _fields(buf, start, end):
        if num == 2 and wt == 2:
            raise ValueError("the record is a tf.train.SequenceExample (it has feature_lists)")
        if num != 1 or wt != 2:
            continue
        for n2, w2, entry in _fields(buf, *val):  # Features.feature map entries
            if n2 != 1 or w2 != 2:
                continue
            key, feat = None, None
            for n3, w3, v3 in _fields(buf, *entry):
                if n3 == 1 and w3 == 2:
                    key = bytes(buf[v3[0] : v3[1]]).decode()
                elif n3 == 2 and w3 == 2:
                    feat = v3
            if key is None:
                continue
            out[key] = _parse_feature(buf, feat)
    return out


def _parse_feature(buf, span) -> RawFeature:
    if span is None:
        return RawFeature("bytes", [])
    for num, wt, val in _fields(buf, *span):
        if wt != 2:
            continue
        if num == 1:
            return RawFeature("bytes", [v for n, w, v in _fields(buf, *val) if n == 1 and w == 2])
        if num == 2:
            chunks = []
            for n, w, v in _fields(buf, *val):
                if n == 1 and w in (2, 5):  # packed, or one fixed32 value
                    chunks.append(np.frombuffer(buf[v[0] : v[1]], "<f4").astype(np.float32))
            return RawFeature("float", np.concatenate(chunks) if chunks else np.zeros(0, "<f4"))
        if num == 3:
            chunks = []
            for n, w, v in _fields(buf, *val):
                if n == 1 and w == 2:
                    chunks.append(_varints(buf[v[0] : v[1]]))
                elif n == 1 and w == 0:
                    chunks.append(np.array([v], np.uint64).view(np.int64))
            return RawFeature("int64", np.concatenate(chunks) if chunks else np.zeros(0, np.int64))
    return RawFeature("bytes", [])  # an empty Feature (no kind set)


def _put_varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _put_varint((num << 3) | 2) + _put_varint(len(payload)) + payload


def encode_example(features: dict[str, tuple[str, Any]]) -> bytes:
    """{key: ("bytes", [bytes, ...]) | ("float", array) | ("int64", array)} -> tf.train.Example."""
    entries = []
    for key in sorted(features):
        kind, values = features[key]
        if kind == "bytes":
            inner = b"".join(_len_field(1, bytes(v)) for v in values)
            feat = _len_field(1, inner)
        elif kind == "float":
            packed = np.ascontiguousarray(values, "<f4").tobytes()
            feat = _len_field(2, _len_field(1, packed) if packed else b"")
        else:
            vals = np.asarray(values).astype(np.int64).ravel().tolist()
            packed = b"".join(_put_varint(v) for v in vals)
            feat = _len_field(3, _len_field(1, packed) if packed else b"")
        entries.append(_len_field(1, _len_field(1, key.encode()) + _len_field(2, feat)))
    return _len_field(1, b"".join(entries))


# ------------------------------------------------------------------------------- features.json
@dataclass
class LeafFeature:
    path: str  # flattened key, e.g. "steps/observation/image"
    kind: str  # "image", "tensor", "text"
    shape: tuple[int, ...]  # per step (or per episode outside steps); -1 for unknown
    dtype: str
    encoding: str = "none"  # tensor: "none" / "bytes" / "zlib"; image: "png" / "jpeg"
    in_steps: bool = False


def _shape(spec: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in spec.get("shape", {}).get("dimensions", []))


def parse_features(path: Path) -> dict[str, LeafFeature]:
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e})", file=path) from None
    out: dict[str, LeafFeature] = {}

    def walk(node: dict[str, Any], prefix: str, in_steps: bool) -> None:
        cls = str(node.get("pythonClassName", ""))
        if "featuresDict" in node:
            for k, sub in node["featuresDict"].get("features", {}).items():
                walk(sub, f"{prefix}/{k}" if prefix else k, in_steps)
        elif "sequence" in node:
            if in_steps:
                raise DataError(
                    "nested sequences inside steps are not supported", file=path, key=prefix
                )
            walk(node["sequence"]["feature"], prefix, True)
        elif "image" in node:
            img = node["image"]
            out[prefix] = LeafFeature(
                prefix,
                "image",
                _shape(img),
                img.get("dtype", "uint8"),
                str(img.get("encodingFormat") or "png"),
                in_steps,
            )
        elif "text" in node:
            out[prefix] = LeafFeature(prefix, "text", (), "string", "none", in_steps)
        elif "tensor" in node:
            t = node["tensor"]
            dtype = t.get("dtype", "float32")
            enc = str(t.get("encoding", "none")).lower()
            kind = "text" if dtype == "string" else "tensor"
            out[prefix] = LeafFeature(prefix, kind, _shape(t), dtype, enc, in_steps)
        else:
            raise DataError(
                f"unsupported TFDS feature {cls or sorted(node)} (supported: FeaturesDict, "
                "Dataset / Sequence, Image, Tensor, Scalar, Text)",
                file=path,
                key=prefix,
            )

    walk(tree, "", False)
    if not any(f.in_steps for f in out.values()):
        raise DataError("no 'steps' sequence feature: not an RLDS dataset", file=path)
    return out


# ------------------------------------------------------------------------------------- reader
@dataclass
class _Record:
    shard: int
    offset: int  # data offset in the shard
    length: int


@dataclass
class _EpisodeIndex:
    length: int
    instruction: str
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (T, 2) byte spans


def resolve_dataset_dir(path: Path) -> Path:
    """A TFDS folder is <name>/<version>/: accept <name>/ when it holds one or more versions."""
    if (path / "features.json").is_file() or (path / "dataset_info.json").is_file():
        return path
    if path.is_dir():
        versions = sorted(
            (p for p in path.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()),
            key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")),
        )
        if versions:
            return versions[-1]
    return path


def is_rlds(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    d = resolve_dataset_dir(path)
    return (d / "dataset_info.json").is_file() or any(
        SHARD_RE.match(p.name) for p in d.glob("*.tfrecord-*")
    )


class RLDSReader(DatasetReader):
    format = FORMAT

    def __init__(
        self, path: str | Path, mapping: str | Path | None = None, split: str | None = None
    ):
        self.path = resolve_dataset_dir(Path(path))
        feats_file = self.path / "features.json"
        if not feats_file.is_file():
            raise DataError(
                "missing features.json: a TFDS-built RLDS folder has dataset_info.json, "
                "features.json and *.tfrecord-XXXXX-of-YYYYY shards (re-copy the whole folder)",
                file=feats_file,
            )
        self.features = parse_features(feats_file)
        info_file = self.path / "dataset_info.json"
        self.ds_info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        self.name = str(self.ds_info.get("name") or "")
        self.split = split or self._default_split()
        self.shards = self._shard_files()
        vt_file = self.path / VLATUNE_META
        self.vt: dict[str, Any] = json.loads(vt_file.read_text()) if vt_file.is_file() else {}
        self.conventions: dict[str, str] = {}
        self._resolve_keys(mapping)
        self._maps: list[Any] = [None] * len(self.shards)
        self._files: list[Any] = [None] * len(self.shards)
        self._records: list[_Record] = []
        for s, fp in enumerate(self.shards):
            for off, n in index_shard(fp, self._buf(s), len(self._records)):
                self._records.append(_Record(s, off, n))
        self._verified: set[int] = set()
        self._index: list[_EpisodeIndex | None] = [None] * len(self._records)
        for i in range(len(self._records)):
            self._index[i] = self._scan(i)
        self._info = self._build_info()

    # -- files
    def _default_split(self) -> str:
        splits = [s.get("name") for s in self.ds_info.get("splits", [])]
        if "train" in splits or not splits:
            return "train"
        return str(splits[0])

    def _shard_files(self) -> list[Path]:
        files = [
            p
            for p in self.path.iterdir()
            if (m := SHARD_RE.match(p.name)) and m["split"] == self.split
        ]
        files.sort(key=lambda p: int(SHARD_RE.match(p.name)["i"]))
        if not files:
            other = str(self.ds_info.get("fileFormat") or "")
            hint = (
                f"; this dataset was written as '{other}', which vlatune does not read: "
                "rebuild it with TFDS's default tfrecord file format"
                if other and other != "tfrecord"
                else ""
            )
            raise DataError(
                f"no '{self.split}' shards (*-{self.split}.tfrecord-XXXXX-of-YYYYY){hint}",
                file=self.path,
            )
        n = int(SHARD_RE.match(files[0].name)["n"])
        have = {int(SHARD_RE.match(p.name)["i"]) for p in files}
        missing = sorted(set(range(n)) - have)
        if missing:
            raise DataError(
                f"{len(missing)} of {n} shards missing (first: number {missing[0]}); re-copy the folder",
                file=self.path,
            )
        return files

    def _buf(self, s: int):
        if self._maps[s] is None:
            f = open(self.shards[s], "rb")  # noqa: SIM115 (kept open with its map)
            size = os.fstat(f.fileno()).st_size
            self._files[s] = f
            self._maps[s] = (
                memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if size else b""
            )
        return self._maps[s]

    def episode_source(self, i: int) -> str:
        return str(self.shards[self._records[i].shard])

    def _err(self, i: int, msg: str, key: str | None = None) -> DataError:
        return DataError(msg, file=self.episode_source(i), episode=i, key=key)

    # -- keys and conventions
    def _resolve_keys(self, mapping: str | Path | None) -> None:
        from vlatune.data.formats.hdf5 import load_mapping

        cand = Path(mapping) if mapping is not None else self.path / MAPPING_FILE
        if mapping is None and not cand.is_file():
            cand = self.path.parent / MAPPING_FILE
        m = load_mapping(cand) if (mapping is not None or cand.is_file()) else None
        if m is not None and m.episode_groups:
            raise DataError("'episode_groups' has no meaning for RLDS; remove it", file=cand)
        self.mapping_file = cand if m is not None else None
        known = self._known()
        steps = {f.path[len("steps/") :]: f for f in self.features.values() if f.in_steps}
        mapped = set(m.model_fields_set) if m is not None else set()

        def pick(name: str, default, from_known=True):
            if m is not None and name in mapped:
                self.conventions[name] = f"declared ({self.mapping_file.name})"
                return getattr(m, name)
            if name in self.vt:
                self.conventions[name] = f"declared ({VLATUNE_META}, written by vlatune)"
                return self.vt[name]
            if from_known and known is not None and name in known[0]:
                self.conventions[name] = f"declared (known dataset: {known[1]})"
                return known[0][name]
            self.conventions[name] = "assumed (RLDS has no field for it; format default)"
            return default

        self.action_key = m.action if m is not None else self.vt.get("action", "action")
        if self.action_key not in steps:
            raise DataError(
                f"no step feature '{self.action_key}' (step features: {sorted(steps)}); "
                f"name it with 'action:' in {MAPPING_FILE}",
                file=self.path / "features.json",
                key=f"steps/{self.action_key}",
            )
        default_state = "observation/state" if "observation/state" in steps else None
        state = pick("state", default_state)
        if self.conventions["state"].startswith("assumed") and state is None:
            self.conventions["state"] = "none (no observation/state feature; map one with 'state:')"
        self.state_keys = [] if state is None else ([state] if isinstance(state, str) else state)
        for k in self.state_keys:
            if k not in steps:
                raise DataError(
                    f"state key '{k}' is not a step feature (step features: {sorted(steps)})",
                    file=self.mapping_file or self.path / "features.json",
                    key=k,
                )
        if m is not None and m.cameras:
            self.camera_keys = dict(m.cameras)
        elif "cameras" in self.vt:
            self.camera_keys = dict(self.vt["cameras"])
        else:
            self.camera_keys = {
                CAMERA_ALIASES.get(k.rsplit("/", 1)[-1], k.rsplit("/", 1)[-1]): k
                for k, f in steps.items()
                if f.kind == "image"
            }
        for cam, k in self.camera_keys.items():
            if k not in steps or steps[k].kind != "image":
                raise DataError(
                    f"camera '{cam}' -> '{k}' is not an image step feature",
                    file=self.mapping_file or self.path / "features.json",
                    key=k,
                )
        if m is not None and m.instruction:
            self.instruction_key = m.instruction
        else:
            texts = [k for k, f in steps.items() if f.kind == "text"]
            order = ["language_instruction", "observation/natural_language_instruction"]
            self.instruction_key = next((k for k in order if k in steps), None) or (
                texts[0] if texts else None
            )
        self.default_instruction = m.default_instruction if m is not None else None
        used = {self.action_key, *self.state_keys, *self.camera_keys.values()}
        if self.instruction_key and not self.instruction_key.startswith("@"):
            used.add(self.instruction_key)
        if m is not None and m.extras:
            self.extra_keys = dict(m.extras)
        elif "extras" in self.vt:
            self.extra_keys = dict(self.vt["extras"])
        else:
            self.extra_keys = {
                k.replace("/", "."): k
                for k, f in steps.items()
                if k not in used and f.kind == "tensor"
            }
        self.fps = float(pick("fps", 10.0))
        self.orientation = pick("image_orientation", "upright")
        self.gripper = pick("gripper", "-1_open")
        if m is not None and "action_range" in mapped:
            self.action_range = m.action_range
        elif "action_range" in self.vt:
            r = self.vt["action_range"]
            self.action_range = tuple(r) if r is not None else None
        else:
            self.action_range = (-1.0, 1.0)

    def _known(self) -> tuple[dict[str, Any], str] | None:
        names = {self.name, self.path.name, self.path.parent.name}
        for pattern, conv, source in KNOWN_DATASETS:
            if any(pattern.match(n) for n in names if n):
                return conv, source
        return None

    # -- records
    def _example(self, i: int, verify: bool) -> tuple[Any, dict[str, RawFeature]]:
        rec = self._records[i]
        buf = self._buf(rec.shard)
        if verify and i not in self._verified:
            data = buf[rec.offset : rec.offset + rec.length]
            (crc,) = struct.unpack_from("<I", buf, rec.offset + rec.length)
            if masked_crc(data) != crc:
                raise self._err(i, "corrupt record (data checksum mismatch); re-copy the shard")
            self._verified.add(i)
        try:
            ex = parse_example(buf, rec.offset, rec.offset + rec.length)
        except (ValueError, IndexError) as e:
            raise self._err(
                i,
                f"not a tf.train.Example ({e}); TFDS writes Examples, SequenceExample records "
                "are not supported",
            ) from None
        return buf, ex

    def _steps_feature(self, ex: dict[str, RawFeature], i: int, key: str) -> RawFeature:
        full = f"steps/{key}"
        if full not in ex:
            raise self._err(i, "step feature missing from the record", key=full)
        return ex[full]

    def _count(self, raw: RawFeature, feat: LeafFeature) -> int:
        if raw.kind == "bytes":
            return len(raw.values)
        per = int(np.prod(feat.shape)) if feat.shape else 1
        return len(raw.values) // max(per, 1)

    def _scan(self, i: int) -> _EpisodeIndex:
        buf, ex = self._example(i, verify=False)
        self._steps_feature(ex, i, self.action_key)  # the action must be there at all
        # T: the most values any step feature has; a feature with fewer is missing a step,
        # which loading reports with that feature's key and the first step without a value
        T = max(
            self._count(raw, self.features[k])
            for k, raw in ex.items()
            if k in self.features and self.features[k].in_steps
        )
        frames = {}
        for cam, key in self.camera_keys.items():
            img = self._steps_feature(ex, i, key)
            frames[cam] = np.asarray(img.values, np.int64).reshape(-1, 2)  # (start, end) offsets
        return _EpisodeIndex(T, self._instruction_from(buf, ex, i), frames)

    def _instruction_from(self, buf, ex: dict[str, RawFeature], i: int) -> str:
        key = self.instruction_key
        text = ""
        if key:
            full = key[1:] if key.startswith("@") else f"steps/{key}"
            raw = ex.get(full)
            if raw is not None and raw.kind == "bytes" and raw.values:
                s, e = raw.values[0]
                text = bytes(buf[s:e]).decode("utf-8", "replace").strip()
        return text or (self.default_instruction or "")

    def _tensor(self, buf, ex, i: int, key: str, T: int) -> np.ndarray:
        feat = self.features[f"steps/{key}"]
        raw = self._steps_feature(ex, i, key)
        shape = tuple(d if d >= 0 else -1 for d in feat.shape)
        dtype = np.dtype("bool" if feat.dtype == "bool" else feat.dtype)
        if feat.encoding in ("bytes", "zlib"):
            if raw.kind != "bytes":
                raise self._err(i, "expected raw tensor bytes", key=f"steps/{key}")
            if len(raw.values) < T:
                raise self._err(
                    i,
                    f"step {len(raw.values)}: no value (the record has {len(raw.values)} of {T})",
                    key=f"steps/{key}",
                )
            parts = []
            for s, e in raw.values:
                b = bytes(buf[s:e])
                if feat.encoding == "zlib":
                    import zlib

                    b = zlib.decompress(b)
                parts.append(np.frombuffer(b, dtype.newbyteorder("<")))
            return np.stack(parts).reshape(T, *shape).astype(dtype)
        per = int(np.prod(feat.shape)) if feat.shape else 1
        vals = raw.values
        if len(vals) != T * per:
            step = len(vals) // max(per, 1)
            raise self._err(
                i,
                f"step {step}: no value ({len(vals)} values for {T} steps of shape {feat.shape})",
                key=f"steps/{key}",
            )
        return vals.reshape(T, *shape).astype(dtype, copy=False)

    # -- metadata
    def _build_info(self) -> DatasetInfo:
        feats: dict[str, FeatureSpec] = {}
        a = self.features[f"steps/{self.action_key}"]
        feats["action"] = FeatureSpec(a.shape, a.dtype)
        if self.state_keys:
            dims = sum(
                int(np.prod(self.features[f"steps/{k}"].shape or (1,))) for k in self.state_keys
            )
            feats["state"] = FeatureSpec((dims,), "float32")
        for cam, key in self.camera_keys.items():
            feats[f"image.{cam}"] = FeatureSpec(self.features[f"steps/{key}"].shape, "uint8")
        for name, key in self.extra_keys.items():
            f = self.features[f"steps/{key}"]
            feats[name] = FeatureSpec(f.shape, f.dtype)
        info = RLDSInfo(
            format=FORMAT,
            path=self.path,
            fps=self.fps,
            num_episodes=len(self._records),
            num_frames=int(sum(e.length for e in self._index)),
            cameras=list(self.camera_keys),
            features=feats,
            image_orientation=self.orientation,
            gripper=self.gripper,
            orientation_source=self.conventions["image_orientation"].split(" ")[0],
            action_range=self.action_range,
        )
        info.conventions = dict(self.conventions)
        return info

    @property
    def info(self) -> DatasetInfo:
        return self._info

    def episode_length(self, i: int) -> int:
        return self._index[i].length

    def instruction(self, i: int) -> str:
        return self._index[i].instruction

    # -- data
    def _decode(self, buf, span, i: int, t: int, cam: str) -> np.ndarray:
        from PIL import Image

        key = f"steps/{self.camera_keys[cam]}"
        try:
            with Image.open(io.BytesIO(buf[int(span[0]) : int(span[1])])) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for bad bytes
            raise self._err(i, f"step {t}: cannot decode image ({e})", key=key) from None

    def read_frames(self, i: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        if camera not in self.camera_keys:
            raise DataError(
                f"no camera '{camera}' (cameras: {sorted(self.camera_keys)})", file=self.path
            )
        if i not in self._verified:
            self._example(i, verify=True)
        idx = self._index[i]
        spans = idx.frames[camera]
        buf = self._buf(self._records[i].shard)
        out = []
        for t in frames:
            t = int(t)
            if not 0 <= t < len(spans):
                raise self._err(
                    i,
                    f"step {t}: no image ({len(spans)} images for {idx.length} steps)",
                    key=f"steps/{self.camera_keys[camera]}",
                )
            out.append(self._decode(buf, spans[t], i, t, camera))
        return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)

    def load_episode(self, i: int, cameras: Sequence[str] | None = None) -> Episode:
        if not 0 <= i < len(self._records):
            raise IndexError(i)
        buf, ex = self._example(i, verify=True)
        T = self._index[i].length
        actions = self._tensor(buf, ex, i, self.action_key, T)
        states = None
        if self.state_keys:
            parts = [self._tensor(buf, ex, i, k, T).reshape(T, -1) for k in self.state_keys]
            states = np.concatenate(parts, axis=1)
            if states.dtype != np.float32 and len(parts) > 1:
                states = states.astype(np.float32)
        extras = {n: self._tensor(buf, ex, i, k, T) for n, k in self.extra_keys.items()}
        cams = list(self.camera_keys) if cameras is None else list(cameras)
        images = {}
        for cam in cams:
            n = len(self._index[i].frames.get(cam, []))
            if n != T and cam in self.camera_keys:
                raise self._err(
                    i,
                    f"step {min(n, T)}: no image ({n} images for {T} steps)",
                    key=f"steps/{self.camera_keys[cam]}",
                )
            images[cam] = self.read_frames(i, cam, range(T))
        meta: dict[str, Any] = {"source": self.episode_source(i), "record": i}
        for k, raw in ex.items():
            if k.startswith("episode_metadata/") and raw.kind == "bytes" and len(raw.values) == 1:
                s, e = raw.values[0]
                meta[k] = bytes(buf[s:e]).decode("utf-8", "replace")
        return Episode(
            actions=actions,
            instruction=self.instruction(i),
            states=states,
            images=images,
            extras=extras,
            meta=meta,
        )

    def close(self) -> None:
        for s, mv in enumerate(self._maps):
            if isinstance(mv, memoryview):
                obj = mv.obj
                mv.release()
                # arrays that still view the map keep it open: the OS frees it with them
                with contextlib.suppress(BufferError):
                    obj.close()
            if self._files[s] is not None:
                self._files[s].close()
        self._maps = [None] * len(self.shards)
        self._files = [None] * len(self.shards)

    def __getstate__(self):
        raise TypeError("an RLDSReader holds memory maps; open one per process")


@dataclass
class RLDSInfo(DatasetInfo):
    """DatasetInfo plus where each convention came from (declared or assumed)."""

    conventions: dict[str, str] = field(default_factory=dict)

    def to_json(self, tasks: dict[str, int]) -> dict[str, Any]:
        out = super().to_json(tasks)
        out["conventions"] = dict(self.conventions)
        return out


# ------------------------------------------------------------------------------------- writer
def _feature_node(kind: str, shape=(), dtype="float32", encoding="none") -> dict[str, Any]:
    dims = {"dimensions": [str(int(d)) for d in shape]}
    if kind == "image":
        return {
            "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
            "image": {"shape": dims, "dtype": "uint8", "encodingFormat": encoding},
        }
    if kind == "text":
        return {
            "pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
            "text": {},
        }
    cls = "scalar.Scalar" if not shape else "tensor_feature.Tensor"
    return {
        "pythonClassName": f"tensorflow_datasets.core.features.{cls}",
        "tensor": {"shape": dims, "dtype": dtype, "encoding": encoding},
    }


def _dict_node(children: dict[str, Any]) -> dict[str, Any]:
    return {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {"features": children},
    }


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, node in flat.items():
        parts = path.split("/")
        cur = tree
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = node

    def build(d):
        return _dict_node({k: (v if "pythonClassName" in v else build(v)) for k, v in d.items()})

    return build(tree)


def _camera_key(cam: str) -> str:
    inverse = {v: k for k, v in CAMERA_ALIASES.items()}
    return f"observation/{inverse.get(cam, cam)}"


def _extra_key(name: str) -> str:
    return name.replace(".", "/")


def _encode_image(frame: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(frame).save(out, format="JPEG", quality=95)
    else:
        Image.fromarray(frame).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _tensor_spec(arr: np.ndarray) -> tuple[str, str]:
    """(dtype name, encoding) for a per-step array: float64 keeps its bits as raw bytes."""
    dt = np.dtype(arr.dtype)
    if dt == np.float64:
        return "float64", "bytes"
    if dt == np.bool_:
        return "bool", "none"
    if np.issubdtype(dt, np.floating):
        return ("float32", "none") if dt == np.float32 else ("float64", "bytes")
    if np.issubdtype(dt, np.integer):
        return dt.name, "none"
    raise ValueError(f"cannot store dtype {dt} in RLDS")


def _values(arr: np.ndarray, dtype: str, encoding: str) -> tuple[str, Any]:
    T = arr.shape[0]
    if encoding == "bytes":
        a = np.ascontiguousarray(arr.astype(np.dtype(dtype).newbyteorder("<")))
        return "bytes", [a[t].tobytes() for t in range(T)]
    if dtype.startswith("float"):
        return "float", arr.astype("<f4").ravel()
    return "int64", arr.astype(np.int64).ravel()


def write_rlds(
    reader: DatasetReader,
    out: str | Path,
    name: str | None = None,
    image_format: str = "png",
    image_orientation: str | None = None,
    shard_bytes: int = 200 * 2**20,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write `reader` as a TFDS RLDS folder (`out` is the <version> folder: dataset_info.json,
    features.json, vlatune.json and <name>-train.tfrecord-XXXXX-of-YYYYY shards).

    Step features: `action`, `observation/<camera>` (PNG by default: lossless; agentview and
    wrist are named `image` and `wrist_image` as in OpenVLA's LIBERO sets), `observation/state`,
    `language_instruction`, `is_first`, `is_last`, `is_terminal`, `reward` (1 on the last
    step, as OpenVLA's LIBERO builder writes demonstrations), `discount` (1) unless the dataset
    has these as extras, and every other extra. float64 arrays are stored as raw bytes
    (`Tensor(encoding=bytes)`) so they read back bit-identical; float32, ints and bools as
    TFDS stores them by default. Conventions go to `vlatune.json` (TFDS ignores it)."""
    from vlatune.conventions import to_upright

    out = Path(out)
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    info = reader.info
    # TFDS names are lowercase snake_case (the shard files start with it): "My-Set" -> "my_set"
    name = re.sub(r"[^a-z0-9_]+", "_", (name or out.name).lower()).strip("_") or "dataset"
    if not name[0].isalpha():
        name = f"ds_{name}"
    src_orient = info.image_orientation
    orient = image_orientation or src_orient
    out.mkdir(parents=True, exist_ok=True)
    flat: dict[str, Any] = {}
    extras_map: dict[str, str] = {}
    generated: list[str] = []
    shard_lengths: list[int] = []
    tmp_names: list[Path] = []
    fh = None
    cur_bytes = 0
    total_bytes = 0
    frames = 0
    state_dtype = None
    for i in range(len(reader)):
        ep = reader.load_episode(i)
        T = ep.length
        if T == 0:
            raise DataError(
                "empty episode: RLDS cannot store 0 steps",
                file=reader.episode_source(i),
                episode=i,
            )
        feats: dict[str, tuple[str, Any]] = {}
        a_dtype, a_enc = _tensor_spec(ep.actions)
        feats["steps/action"] = _values(ep.actions, a_dtype, a_enc)
        if i == 0:
            flat["steps/action"] = _feature_node("tensor", ep.actions.shape[1:], a_dtype, a_enc)
        if ep.states is not None:
            s_dtype, s_enc = _tensor_spec(ep.states)
            state_dtype = s_dtype
            feats["steps/observation/state"] = _values(ep.states, s_dtype, s_enc)
            if i == 0:
                flat["steps/observation/state"] = _feature_node(
                    "tensor", ep.states.shape[1:], s_dtype, s_enc
                )
        for cam in info.cameras:
            imgs = ep.images[cam]
            if orient != src_orient:
                imgs = to_upright(imgs)
            key = f"steps/{_camera_key(cam)}"
            feats[key] = (
                "bytes",
                [_encode_image(np.ascontiguousarray(f), image_format) for f in imgs],
            )
            if i == 0:
                flat[key] = _feature_node("image", imgs.shape[1:], "uint8", image_format)
        feats["steps/language_instruction"] = ("bytes", [ep.instruction.encode()] * T)
        for xname, arr in ep.extras.items():
            arr = np.asarray(arr)
            dt, enc = _tensor_spec(arr)
            key = extras_map.get(xname) or _extra_key(xname)
            if i == 0 and f"steps/{key}" in feats:  # e.g. an extra named "observation.state"
                key = f"vlatune_extras/{key}"
            feats[f"steps/{key}"] = _values(arr, dt, enc)
            if i == 0:
                extras_map[xname] = key
                flat[f"steps/{key}"] = _feature_node("tensor", arr.shape[1:], dt, enc)
        last = np.arange(T) == T - 1
        defaults = {
            "is_first": ("bool", np.arange(T) == 0),
            "is_last": ("bool", last),
            "is_terminal": ("bool", last),
            "reward": ("float32", last.astype(np.float32)),
            "discount": ("float32", np.ones(T, np.float32)),
        }
        for key, (dt, arr) in defaults.items():
            if f"steps/{key}" in feats:
                continue
            feats[f"steps/{key}"] = _values(arr, dt, "none")
            if i == 0:
                generated.append(key)
                flat[f"steps/{key}"] = _feature_node("tensor", (), dt)
        src = str(ep.meta.get("episode_metadata/file_path") or ep.meta.get("source") or "")
        feats["episode_metadata/file_path"] = ("bytes", [src.encode()])
        if i == 0:
            flat["steps/language_instruction"] = _feature_node("text")
            flat["episode_metadata/file_path"] = _feature_node("text")
        missing = set(k for k in flat if k.startswith("steps/")) - set(feats)
        if missing:
            raise DataError(
                f"episode has no {sorted(missing)} while episode 0 has (every episode needs the same features)",
                file=reader.episode_source(i),
                episode=i,
            )
        record = frame_record(encode_example(feats))
        if fh is None or (cur_bytes and cur_bytes + len(record) > shard_bytes):
            if fh is not None:
                fh.close()
            tmp = out / f".shard-{len(tmp_names):05d}.tmp"
            tmp_names.append(tmp)
            shard_lengths.append(0)
            fh = open(tmp, "wb")  # noqa: SIM115
            cur_bytes = 0
        fh.write(record)
        cur_bytes += len(record)
        total_bytes += len(record)
        shard_lengths[-1] += 1
        frames += T
        if progress is not None:
            progress(i)
    if fh is not None:
        fh.close()
    n = len(tmp_names)
    for s, tmp in enumerate(tmp_names):
        os.replace(tmp, out / f"{name}-train.tfrecord-{s:05d}-of-{n:05d}")
    features = _nest(flat)
    # steps is a Dataset (RLDS) of the per-step FeaturesDict
    top = features["featuresDict"]["features"]
    top["steps"] = {
        "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
        "sequence": {"feature": top["steps"], "length": "-1"},
    }
    (out / "features.json").write_text(json.dumps(features, indent=2))
    ds_info = {
        "name": name,
        "version": "1.0.0",
        "description": f"Written by vlatune from {info.path} ({info.format}).",
        "fileFormat": "tfrecord",
        "moduleName": f"vlatune.{name}",
        "releaseNotes": {"1.0.0": "Written by vlatune."},
        "splits": [
            {
                "name": "train",
                "numBytes": str(total_bytes),
                "shardLengths": [str(x) for x in shard_lengths],
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            }
        ],
    }
    (out / "dataset_info.json").write_text(json.dumps(ds_info, indent=2))
    vt = {
        "image_orientation": orient,
        "gripper": info.gripper,
        "fps": info.fps,
        "action": "action",
        "state": "observation/state" if state_dtype is not None else None,
        "cameras": {cam: _camera_key(cam) for cam in info.cameras},
        "extras": extras_map,
        "generated_step_fields": generated,
        "action_range": list(info.action_range) if info.action_range else None,
        "source": {"path": str(info.path), "format": info.format},
    }
    (out / VLATUNE_META).write_text(json.dumps(vt, indent=2))
    return {
        "episodes": len(reader),
        "frames": frames,
        "files": n,
        "psnr_db": {
            c: (
                float("inf")
                if image_format == "png" and not info.format.startswith("lerobot")
                else None
            )
            for c in info.cameras
        },
        "image_orientation": orient,
        "rotated": orient != src_orient,
    }

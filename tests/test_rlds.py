"""RLDS (TFDS folders) without tensorflow: write + read back exactly, files TFDS wrote, OpenVLA's
LIBERO conventions, key mappings, bad input, conversions and the training view."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from data_fixtures import frames, make_libero_hdf5
from vlatune.data import DataError, open_dataset
from vlatune.data.convert import convert
from vlatune.data.formats import rlds
from vlatune.data.formats.rlds import encode_example, frame_record, parse_example

FIXTURE = Path(__file__).parent / "fixtures" / "rlds_tfds"


def _png(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")
    return out.getvalue()


def write_foreign(
    root: Path,
    name: str = "libero_object_no_noops",
    episodes: int = 2,
    T: int = 6,
    drop_action_step: int | None = None,
    bad_image: tuple[int, int] | None = None,
) -> Path:
    """An RLDS folder laid out as OpenVLA's LIBERO builder writes it (no vlatune.json), built
    from the wire format directly; optionally with a step missing its action or a bad image."""
    out = root / name / "1.0.0"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records, truth = [], []
    for e in range(episodes):
        actions = rng.uniform(-1, 1, (T, 7)).astype(np.float32)
        state = rng.normal(size=(T, 8)).astype(np.float32)
        joint = rng.normal(size=(T, 7)).astype(np.float32)
        img = frames(T, 16, e)
        wrist = frames(T, 16, 100 + e)
        text = f"put the bowl {e} on the plate"
        a_vals = actions.ravel() if drop_action_step != e else actions[:-1].ravel()
        img_bytes = [_png(f) for f in img]
        if bad_image is not None and bad_image[0] == e:
            img_bytes[bad_image[1]] = b"not an image at all"
        feats = {
            "steps/action": ("float", a_vals),
            "steps/observation/image": ("bytes", img_bytes),
            "steps/observation/wrist_image": ("bytes", [_png(f) for f in wrist]),
            "steps/observation/state": ("float", state.ravel()),
            "steps/observation/joint_state": ("float", joint.ravel()),
            "steps/language_instruction": ("bytes", [text.encode()] * T),
            "steps/is_first": ("int64", (np.arange(T) == 0).astype(np.int64)),
            "steps/is_last": ("int64", (np.arange(T) == T - 1).astype(np.int64)),
            "steps/is_terminal": ("int64", (np.arange(T) == T - 1).astype(np.int64)),
            "steps/reward": ("float", (np.arange(T) == T - 1).astype(np.float32)),
            "steps/discount": ("float", np.ones(T, np.float32)),
            "episode_metadata/file_path": ("bytes", [f"demo_{e}.hdf5".encode()]),
        }
        records.append(frame_record(encode_example(feats)))
        truth.append(
            {"actions": actions, "state": state, "joint": joint, "image": img, "text": text}
        )
    (out / f"{name}-train.tfrecord-00000-of-00001").write_bytes(b"".join(records))
    step = {
        "action": rlds._feature_node("tensor", (7,), "float32"),
        "observation/image": rlds._feature_node("image", (16, 16, 3), "uint8", "png"),
        "observation/wrist_image": rlds._feature_node("image", (16, 16, 3), "uint8", "png"),
        "observation/state": rlds._feature_node("tensor", (8,), "float32"),
        "observation/joint_state": rlds._feature_node("tensor", (7,), "float32"),
        "language_instruction": rlds._feature_node("text"),
        "is_first": rlds._feature_node("tensor", (), "bool"),
        "is_last": rlds._feature_node("tensor", (), "bool"),
        "is_terminal": rlds._feature_node("tensor", (), "bool"),
        "reward": rlds._feature_node("tensor", (), "float32"),
        "discount": rlds._feature_node("tensor", (), "float32"),
    }
    tree = rlds._nest(
        {
            **{f"steps/{k}": v for k, v in step.items()},
            "episode_metadata/file_path": rlds._feature_node("text"),
        }
    )
    top = tree["featuresDict"]["features"]
    top["steps"] = {
        "pythonClassName": "x.Dataset",
        "sequence": {"feature": top["steps"], "length": "-1"},
    }
    (out / "features.json").write_text(json.dumps(tree))
    (out / "dataset_info.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": "1.0.0",
                "splits": [{"name": "train", "shardLengths": [str(episodes)]}],
            }
        )
    )
    return out, truth


@pytest.fixture(scope="module")
def libero(tmp_path_factory) -> Path:
    return make_libero_hdf5(tmp_path_factory.mktemp("libero") / "ds")


def test_wire_format_round_trip():
    feats = {
        "a": ("float", np.array([1.5, -2.25, 3e-8], np.float32)),
        "b": ("int64", np.array([0, 1, 127, 128, 300, -1, -(2**63), 2**63 - 1])),
        "c": ("bytes", [b"", b"xyz", bytes(range(256))]),
        "d": ("float", np.zeros(0, np.float32)),
    }
    buf = encode_example(feats)
    ex = parse_example(buf, 0, len(buf))
    assert ex["a"].kind == "float" and np.array_equal(ex["a"].values, feats["a"][1])
    assert ex["b"].kind == "int64" and ex["b"].values.tolist() == feats["b"][1].tolist()
    assert [bytes(buf[s:e]) for s, e in ex["c"].values] == feats["c"][1]
    assert ex["d"].values.size == 0
    rec = frame_record(buf)
    assert rlds.index_shard(Path("x"), rec) == [(12, len(buf))]
    # the TFRecord checksum of a known record (CRC32C of b"123456789" is 0xE3069283)
    assert rlds._crc(b"123456789") == 0xE3069283


def test_sequence_example_is_refused_clearly(libero, tmp_path):
    convert(open_dataset(libero), tmp_path / "d", to="rlds")
    shard = next((tmp_path / "d").glob("*.tfrecord-*"))
    example = encode_example({"steps/action": ("float", np.zeros(7, np.float32))})
    feature_lists = rlds._len_field(2, b"")  # SequenceExample.feature_lists (empty)
    shard.write_bytes(frame_record(example + feature_lists))
    with pytest.raises(DataError, match="SequenceExample") as e:
        open_dataset(tmp_path / "d")
    assert "episode 0" in str(e.value) and shard.name in str(e.value)


def test_write_then_read_exactly(libero, tmp_path):
    src = open_dataset(libero)
    report = convert(src, tmp_path / "rlds_out", to="rlds")
    assert report["format"] == "rlds" and report["episodes"] == len(src)
    out = tmp_path / "rlds_out"
    assert {"dataset_info.json", "features.json", "vlatune.json"} <= {p.name for p in out.iterdir()}
    assert (out / "rlds_out-train.tfrecord-00000-of-00001").is_file()
    ds = open_dataset(out)
    assert ds.format == "rlds" and len(ds) == len(src)
    assert ds.info.num_frames == src.info.num_frames
    assert ds.info.cameras == src.info.cameras
    assert ds.info.image_orientation == "raw" and ds.info.orientation_source == "declared"
    assert ds.tasks() == src.tasks()
    for i in range(len(src)):
        a, b = src.load_episode(i), ds.load_episode(i)
        assert b.actions.dtype == a.actions.dtype and np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.states, b.states) and b.states.dtype == a.states.dtype
        assert a.instruction == b.instruction
        for cam in a.images:
            assert np.array_equal(a.images[cam], b.images[cam])
        assert sorted(a.extras) == sorted(b.extras)
        for k in a.extras:
            assert a.extras[k].dtype == b.extras[k].dtype and np.array_equal(
                a.extras[k], b.extras[k]
            )
        assert np.array_equal(ds.read_frames(i, "wrist", [3, 0, 3]), a.images["wrist"][[3, 0, 3]])
    feats = json.loads((out / "features.json").read_text())
    steps = feats["featuresDict"]["features"]["steps"]
    assert steps["pythonClassName"].endswith("dataset_feature.Dataset")
    step_feats = steps["sequence"]["feature"]["featuresDict"]["features"]
    assert {
        "action",
        "observation",
        "language_instruction",
        "is_first",
        "is_last",
        "is_terminal",
        "reward",
        "discount",
    } <= set(step_feats)
    assert set(step_feats["observation"]["featuresDict"]["features"]) >= {
        "image",
        "wrist_image",
        "state",
    }


def test_openvla_libero_conventions_declared_by_known_dataset(tmp_path):
    path, truth = write_foreign(tmp_path)
    assert open_dataset(path.parent).info.path == path  # <name>/ resolves to its version folder
    ds = open_dataset(path)
    info = ds.info.to_json(ds.tasks())
    assert info["format"] == "rlds"
    assert info["image_orientation"] == "upright" and info["gripper"] == "-1_open"
    assert info["fps"] == 20.0 and info["cameras"] == ["agentview", "wrist"]
    assert info["features"]["state"]["shape"] == [8]
    for k in ("image_orientation", "gripper", "state", "fps"):
        assert info["conventions"][k].startswith("declared (known dataset: OpenVLA LIBERO RLDS"), k
    ep = ds.load_episode(1)
    assert np.array_equal(ep.actions, truth[1]["actions"]) and ep.actions.dtype == np.float32
    assert np.array_equal(ep.states, truth[1]["state"])
    assert np.array_equal(ep.extras["observation.joint_state"], truth[1]["joint"])
    assert ep.extras["is_first"].dtype == np.bool_ and ep.extras["is_first"].tolist()[:2] == [
        True,
        False,
    ]
    assert np.array_equal(ep.images["agentview"], truth[1]["image"])
    assert ep.instruction == truth[1]["text"]
    assert ep.meta["episode_metadata/file_path"] == "demo_1.hdf5"
    # the same data under an unknown name: conventions are assumed, and inspect says so
    other = tmp_path / "other"
    shutil.copytree(path, other)
    meta = json.loads((other / "dataset_info.json").read_text())
    (other / "dataset_info.json").write_text(json.dumps({**meta, "name": "other"}))
    info2 = open_dataset(other).info.to_json({})
    assert info2["conventions"]["image_orientation"].startswith("assumed")
    assert info2["conventions"]["gripper"].startswith("assumed")
    assert info2["image_orientation_source"] == "assumed"


def test_mapping_file_declares_keys_and_conventions(tmp_path):
    path, truth = write_foreign(tmp_path, name="my_robot")
    (path / "vlatune_mapping.yaml").write_text(
        "action: action\n"
        "state: [observation/joint_state]\n"
        "cameras: {front: observation/wrist_image}\n"
        "extras: {reward: reward}\n"
        "fps: 15\nimage_orientation: raw\ngripper: '1_open'\n"
    )
    ds = open_dataset(path)
    info = ds.info.to_json({})
    assert info["cameras"] == ["front"] and info["fps"] == 15.0
    assert info["image_orientation"] == "raw" and info["gripper"] == "1_open"
    assert info["conventions"]["gripper"] == "declared (vlatune_mapping.yaml)"
    ep = ds.load_episode(0)
    assert np.array_equal(ep.states, truth[0]["joint"]) and list(ep.extras) == ["reward"]
    r = run_cli("data", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    assert (
        json.loads(r.stdout)["conventions"]["image_orientation"]
        == "declared (vlatune_mapping.yaml)"
    )


def test_truncated_shard(libero, tmp_path):
    convert(open_dataset(libero), tmp_path / "d", to="rlds")
    shard = next((tmp_path / "d").glob("*.tfrecord-*"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "d")
    msg = str(e.value)
    assert "truncated shard" in msg and shard.name in msg and "episode 5" in msg


def test_corrupt_record_checksum(libero, tmp_path):
    convert(open_dataset(libero), tmp_path / "d", to="rlds")
    shard = next((tmp_path / "d").glob("*.tfrecord-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) - 200] ^= 0xFF  # inside the last record's payload (its last image)
    shard.write_bytes(bytes(data))
    ds = open_dataset(tmp_path / "d")
    ds.load_episode(0)
    with pytest.raises(DataError, match="checksum mismatch") as e:
        ds.load_episode(5)
    assert "episode 5" in str(e.value) and shard.name in str(e.value)


def test_missing_features_json(libero, tmp_path):
    convert(open_dataset(libero), tmp_path / "d", to="rlds")
    (tmp_path / "d" / "features.json").unlink()
    with pytest.raises(DataError, match="missing features.json") as e:
        open_dataset(tmp_path / "d")
    assert str(tmp_path / "d" / "features.json") in str(e.value)


def test_step_without_action(tmp_path):
    path, _ = write_foreign(tmp_path, drop_action_step=1)
    ds = open_dataset(path)
    ds.load_episode(0)
    with pytest.raises(DataError) as e:
        ds.load_episode(1)
    msg = str(e.value)
    assert (
        "episode 1" in msg and "step 5" in msg and "'steps/action'" in msg and ".tfrecord-" in msg
    )
    r = run_cli("data", "check", str(path))
    assert r.returncode == 1 and "episode 1" in r.stdout and "steps/action" in r.stdout


def test_image_that_does_not_decode(tmp_path):
    path, _ = write_foreign(tmp_path, bad_image=(0, 3))
    ds = open_dataset(path)
    ds.load_episode(0, cameras=[])  # low-dim data is fine
    with pytest.raises(DataError) as e:
        ds.load_episode(0)
    msg = str(e.value)
    assert "step 3" in msg and "cannot decode image" in msg and "episode 0" in msg
    assert "'steps/observation/image'" in msg and ".tfrecord-" in msg


def test_rlds_lerobot_rlds_round_trip(tmp_path):
    path, truth = write_foreign(tmp_path)
    src = open_dataset(path)
    convert(src, tmp_path / "lr", to="lerobot")
    convert(open_dataset(tmp_path / "lr"), tmp_path / "back", to="rlds")
    back = open_dataset(tmp_path / "back")
    assert back.info.image_orientation == "upright" and back.info.gripper == "-1_open"
    for i in range(len(src)):
        a, b = src.load_episode(i, cameras=[]), back.load_episode(i, cameras=[])
        assert b.actions.dtype == np.float32 and np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.states, b.states)
        assert a.instruction == b.instruction == truth[i]["text"]
        assert np.array_equal(
            a.extras["observation.joint_state"], b.extras["observation.joint_state"]
        )


def test_cli_on_rlds(libero, tmp_path):
    r = run_cli("data", "convert", str(libero), str(tmp_path / "r"), "--to", "rlds")
    assert r.returncode == 0, r.stderr
    r = run_cli("data", "convert", str(libero), str(tmp_path / "My-Set.v2"), "--to", "rlds")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "My-Set.v2" / "my_set_v2-train.tfrecord-00000-of-00001").is_file()
    r = run_cli("data", "inspect", str(tmp_path / "r"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "rlds" and info["episodes"] == 6
    assert info["conventions"]["image_orientation"].startswith("declared (vlatune.json")
    r = run_cli("data", "check", str(tmp_path / "r"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("data", "stats", str(tmp_path / "r"), "--out", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    ref = json.loads(run_cli("data", "stats", str(libero)).stdout)
    assert stats["action"]["mean"] == ref["action"]["mean"]
    r = run_cli("data", "split", str(tmp_path / "r"), "--test-fraction", "0.34")
    assert r.returncode == 0 and len(json.loads(r.stdout)["test"]) >= 1
    r = run_cli("data", "convert", str(tmp_path / "r"), str(tmp_path / "h"), "--to", "hdf5")
    assert r.returncode == 0, r.stderr
    h = open_dataset(tmp_path / "h")
    assert h.info.num_frames == 78


def test_training_view_reads_rlds_like_the_source(libero, tmp_path):
    from vlatune.data.training import FrameDataset
    from vlatune.data.transforms import Normalizer

    convert(open_dataset(libero), tmp_path / "r", to="rlds")
    norm = Normalizer.from_stats(
        {"q01": -np.ones(7), "q99": np.ones(7), "mean": np.zeros(7), "std": np.ones(7)}, "q99"
    )
    kw = dict(cameras=["agentview", "wrist"], image_size=32, horizon=4, train=False)
    a = FrameDataset(libero, norm, None, **kw)
    b = FrameDataset(tmp_path / "r", norm, None, **kw)
    assert len(a) == len(b) == 78
    for k in (0, 11, 40, 77):
        sa, sb = a[k], b[k]
        assert sa["instruction"] == sb["instruction"]
        assert sa["actions"].equal(sb["actions"]) and sa["action_mask"].equal(sb["action_mask"])
        for cam in kw["cameras"]:
            assert sa["images"][cam].equal(sb["images"][cam])


def test_files_tfds_wrote():
    """Committed peer files: a dataset TFDS's own writer produced (scripts/rlds_compat.py), with
    the values TFDS reads from it; vlatune must read the same, bit for bit."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    ds = open_dataset(FIXTURE / expected["dataset"])
    assert ds.format == "rlds" and len(ds) == len(expected["episodes"])
    for i, exp in enumerate(expected["episodes"]):
        ep = ds.load_episode(i)
        assert ep.instruction == exp["instruction"]
        assert np.array_equal(ep.actions, np.array(exp["action"], dtype=exp["action_dtype"]))
        assert ep.actions.dtype == np.dtype(exp["action_dtype"])
        assert np.array_equal(ep.states, np.array(exp["state"], np.float32))
        assert ep.extras["is_last"].tolist() == exp["is_last"]
        for cam, sums in exp["image_sums"].items():
            assert (
                ep.images[cam].reshape(len(ep.actions), -1).astype(np.int64).sum(1).tolist() == sums
            )
        assert ep.meta["episode_metadata/file_path"] == exp["file_path"]


def test_training_from_rlds_resumes_exactly_after_sigkill(libero, tmp_path):
    """`vlatune train` straight from an RLDS folder; killed after checkpoint 4 and resumed, it
    ends with the same weights as an uninterrupted run (random access keeps the order exact)."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from vlatune.data.formats.rlds import write_rlds

    data = tmp_path / "rlds"
    write_rlds(open_dataset(libero), data, name="train_check", image_format="jpeg")
    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny.yaml"

    def train(run: Path, fault: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "VLATUNE_FAULT"}
        if fault:
            env["VLATUNE_FAULT"] = fault
        args = [
            sys.executable, "-m", "vlatune", "train", str(config), "--no-progress",
            f"data.path={data}", "data.image_size=64", "data.batch_size=4", "optim.warmup_steps=0",
            "policy.tiny.dim=32", "policy.heads.mlp_dim=32", f"train.output_dir={run}",
            "train.max_steps=8", "train.save_every=4", "train.log_every=2", "train.ema_decay=0",
        ]  # fmt: skip
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    straight = train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = train(tmp_path / "resumed", fault="after_checkpoint:4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight/checkpoint-8/policy/model.safetensors")
    b = load_file(tmp_path / "resumed/checkpoint-8/policy/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Formats: LIBERO HDF5, custom HDF5, LeRobot v2.1 / v3.0; detection, round trips, orientation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.data_fixtures import make_custom_hdf5, make_libero_hdf5
from vlatune.data import DataError, detect_format, open_dataset
from vlatune.data.convert import convert
from vlatune.data.video import psnr


@pytest.fixture
def libero(tmp_path):
    return make_libero_hdf5(tmp_path / "libero")


@pytest.fixture
def custom(tmp_path):
    return make_custom_hdf5(tmp_path / "custom")


def test_libero_reader_layout_and_conventions(libero):
    import h5py

    ds = open_dataset(libero)
    info = ds.info
    assert info.format == "libero_hdf5" and info.num_episodes == 6 and info.fps == 20
    assert info.num_frames == 2 * (12 + 13 + 14)
    assert info.cameras == ["agentview", "wrist"]
    assert info.image_orientation == "raw" and info.orientation_source == "declared"
    assert info.gripper == "-1_open"
    assert info.features["state"].shape == (8,) and info.features["image.agentview"].shape == (
        32,
        32,
        3,
    )
    # instruction: LIBERO's task.language from the file name (LIBERO-90 names lose the scene prefix)
    assert ds.tasks() == {
        "turn on the stove": 3,
        "pick up the alphabet soup and place it in the basket": 3,
    }
    ep = ds.load_episode(0)
    with h5py.File(libero / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5") as f:
        demo = f["data/demo_0"]
        np.testing.assert_array_equal(ep.actions, demo["actions"][()])
        expected_state = np.concatenate(
            [demo["obs/ee_states"][()], demo["obs/gripper_states"][()]], 1
        )
        np.testing.assert_array_equal(ep.states, expected_state.astype(np.float32))
        np.testing.assert_array_equal(ep.images["wrist"], demo["obs/eye_in_hand_rgb"][()])
        np.testing.assert_array_equal(ep.meta["init_state"], demo.attrs["init_state"])
    assert ep.meta["bddl_instruction"] == "turn on the stove"
    np.testing.assert_array_equal(
        ds.read_frames(0, "agentview", [5, 1, 5]), ep.images["agentview"][[5, 1, 5]]
    )
    # single frames take the low-level path (dataspaces made once): same pixels, bounds checked
    T = len(ep.actions)
    for t in (0, 7, T - 1, 7):
        np.testing.assert_array_equal(ds.read_frames(0, "wrist", [t]), ep.images["wrist"][[t]])
    with pytest.raises(IndexError, match=f"frame {T} out of range .*eye_in_hand_rgb with {T}"):
        ds.read_frames(0, "wrist", [T])


def test_custom_hdf5_mapping(custom):
    ds = open_dataset(custom)
    assert ds.info.format == "hdf5" and ds.info.fps == 10 and ds.info.gripper == "1_open"
    ep = ds.load_episode(0)
    assert ep.actions.shape == (10, 6) and ep.states.shape == (10, 13)
    assert ep.instruction == "stack the red block on the blue block"
    assert ds.instruction(1) == "stack the blocks"  # the declared default
    assert set(ep.extras) == {"timestamp", "phase"}


def test_custom_hdf5_encoded_images(tmp_path):
    raw = open_dataset(make_custom_hdf5(tmp_path / "raw")).load_episode(2).images["camera1"]
    png = open_dataset(make_custom_hdf5(tmp_path / "png", encoded="png"))
    np.testing.assert_array_equal(png.load_episode(2).images["camera1"], raw)
    np.testing.assert_array_equal(png.read_frames(2, "camera1", [3, 0]), raw[[3, 0]])
    jpg = (
        open_dataset(make_custom_hdf5(tmp_path / "jpg", encoded="jpeg"))
        .load_episode(2)
        .images["camera1"]
    )
    assert jpg.shape == raw.shape and psnr(jpg, raw) > 20  # lossy at 32 px


def test_custom_hdf5_without_mapping_is_a_clear_error(tmp_path):
    root = make_custom_hdf5(tmp_path / "c")
    (root / "vlatune_mapping.yaml").unlink()
    with pytest.raises(DataError, match="needs a key mapping"):
        open_dataset(root, format="hdf5")


def test_bad_mapping_names_the_key(tmp_path):
    root = make_custom_hdf5(tmp_path / "c", mapping="action: action\ncameras: [x]\n")
    with pytest.raises(DataError, match="'cameras'"):
        open_dataset(root)


def test_detection_and_unknown(tmp_path, libero, custom):
    assert detect_format(libero) == "libero_hdf5"
    assert detect_format(custom) == "hdf5"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        detect_format(tmp_path / "missing")


def _sources(tmp_path):
    libero = make_libero_hdf5(tmp_path / "src_libero")
    custom = make_custom_hdf5(tmp_path / "src_custom")
    v21 = tmp_path / "src_v21"
    convert(open_dataset(libero), v21, "lerobot")
    v30 = tmp_path / "src_v30"
    convert(open_dataset(custom), v30, "lerobot-v3")
    return {"libero_hdf5": libero, "hdf5": custom, "lerobot_v21": v21, "lerobot_v30": v30}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory.mktemp("sources"))


def _pairs(src, out):
    """Episode pairs in order within each task (LIBERO HDF5 groups episodes by task, one file each)."""
    by_task = {}
    for name, ds in (("src", src), ("out", out)):
        for i in range(len(ds)):
            by_task.setdefault(ds.instruction(i), {"src": [], "out": []})[name].append(i)
    pairs = []
    for task, d in by_task.items():
        assert len(d["src"]) == len(d["out"]), task
        pairs += list(zip(d["src"], d["out"], strict=True))
    return pairs


@pytest.mark.parametrize("src_format", ["libero_hdf5", "hdf5", "lerobot_v21", "lerobot_v30"])
@pytest.mark.parametrize(
    "target,expected",
    [("lerobot", "lerobot_v21"), ("lerobot-v3", "lerobot_v30"), ("hdf5", "libero_hdf5")],
)
def test_round_trip_keeps_values_exactly(sources, tmp_path, src_format, target, expected):
    src = open_dataset(sources[src_format])
    report = convert(src, tmp_path / "out", target)
    out = open_dataset(tmp_path / "out")
    assert out.info.format == expected == report["format"]
    assert len(out) == len(src) and out.info.num_frames == src.info.num_frames
    assert out.info.image_orientation == src.info.image_orientation
    assert (out.info.fps, out.info.gripper, out.info.cameras) == (
        src.info.fps,
        src.info.gripper,
        src.info.cameras,
    )
    for i, j in _pairs(src, out):
        a, b = src.load_episode(i), out.load_episode(j)
        assert a.instruction == b.instruction
        assert a.actions.dtype == b.actions.dtype
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.states, b.states)
        for cam in src.info.cameras:
            assert b.images[cam].shape == a.images[cam].shape
            # 32 px frames with a saturated square lose chroma to yuv420p: about 25 dB
            assert psnr(a.images[cam], b.images[cam]) > 22, f"{cam} degraded by the codec"
            for t in range(len(a.images[cam]) - 1):  # frame t decodes as frame t, not t +- 1
                assert psnr(a.images[cam][t], b.images[cam][t]) > psnr(
                    a.images[cam][t + 1], b.images[cam][t]
                )
        for k in set(a.extras) & set(b.extras):
            np.testing.assert_array_equal(a.extras[k], b.extras[k])
    for cam, value in report["psnr_db"].items():
        assert value is None or value > 22, cam


def test_lerobot_v21_layout(sources):
    root = sources["lerobot_v21"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["fps"] == 20 and info["total_episodes"] == 6
    assert info["features"]["observation.images.agentview"]["dtype"] == "video"
    assert info["features"]["observation.state"]["shape"] == [8]
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert name in info["features"]
    episodes = [
        json.loads(line) for line in (root / "meta/episodes.jsonl").read_text().splitlines()
    ]
    assert [e["length"] for e in episodes] == [12, 13, 14, 12, 13, 14]
    tasks = [json.loads(line) for line in (root / "meta/tasks.jsonl").read_text().splitlines()]
    assert {t["task"] for t in tasks} == {
        "turn on the stove",
        "pick up the alphabet soup and place it in the basket",
    }
    stats = [
        json.loads(line) for line in (root / "meta/episodes_stats.jsonl").read_text().splitlines()
    ]
    assert np.asarray(stats[0]["stats"]["observation.images.agentview"]["mean"]).shape == (3, 1, 1)
    table = pq.read_table(root / "data/chunk-000/episode_000001.parquet")
    assert table.num_rows == 13 and table.column("index").to_pylist()[0] == 12
    assert (root / "videos/chunk-000/observation.images.wrist/episode_000005.mp4").is_file()


def test_lerobot_v30_layout(sources):
    root = sources["lerobot_v30"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in eps] == [0, 10, 21]
    key = "videos/observation.images.camera1"
    assert eps[1][f"{key}/from_timestamp"] == pytest.approx(1.0)  # 10 frames at 10 fps
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert sorted(tasks.column("task").to_pylist()) == [
        "stack the blocks",
        "stack the red block on the blue block",
    ]
    assert b"pandas" in tasks.schema.metadata  # pandas reads the task strings back as the index
    stats = json.loads((root / "meta/stats.json").read_text())
    assert stats["action"]["count"] == [33]


def test_orientation_conversion_rotates_when_asked(libero, tmp_path):
    src = open_dataset(libero)
    convert(src, tmp_path / "up", "hdf5", image_orientation="upright")
    up = open_dataset(tmp_path / "up")
    assert up.info.image_orientation == "upright" and up.info.orientation_source == "declared"
    a, b = src.load_episode(3).images["agentview"], up.load_episode(3).images["agentview"]
    np.testing.assert_array_equal(b, a[:, ::-1, ::-1])
    convert(up, tmp_path / "back", "hdf5", image_orientation="raw")
    np.testing.assert_array_equal(
        open_dataset(tmp_path / "back").load_episode(3).images["agentview"], a
    )


def test_failed_conversion_leaves_nothing(libero, tmp_path, monkeypatch):
    from vlatune.data.formats import lerobot

    calls = {"n": 0}
    real = lerobot.VideoWriter.write

    def boom(self, frames):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk full")
        return real(self, frames)

    monkeypatch.setattr(lerobot.VideoWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(open_dataset(libero), tmp_path / "out", "lerobot")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_existing_destination_is_never_touched(libero, tmp_path):
    dst = tmp_path / "keep"
    dst.mkdir()
    (dst / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="already exists"):
        convert(open_dataset(libero), dst, "lerobot")
    assert (dst / "mine.txt").read_text() == "precious"

"""`data check` (every problem, one line each), `data stats` against numpy, `data split`, `data inspect`."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tests.data_fixtures import make_custom_hdf5, make_libero_hdf5
from vlatune.cli import cli
from vlatune.data import open_dataset
from vlatune.data.check import check_dataset
from vlatune.data.convert import convert
from vlatune.data.split import split_episodes
from vlatune.data.stats import RunningStats, dataset_stats


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------------------- check
def test_clean_dataset_passes(tmp_path):
    root = make_libero_hdf5(tmp_path / "d")
    assert check_dataset(open_dataset(root)) == []
    r = run("data", "check", root)
    assert r.exit_code == 0 and "no problems" in r.output


def _libero_with(tmp_path, edit):
    root = make_libero_hdf5(tmp_path / "d")
    with h5py.File(root / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", "a") as f:
        edit(f["data"])
    return root


@pytest.mark.parametrize(
    "edit,key,message",
    [
        (lambda d: d.__delitem__("demo_1/actions"), "actions", "missing dataset"),
        (lambda d: d["demo_1/actions"].__setitem__((3, 2), np.nan), "action", "NaN or inf"),
        (
            lambda d: d["demo_1/actions"].__setitem__((3, 2), 5.0),
            "action",
            "outside the declared range",
        ),
        (
            lambda d: (
                d.__delitem__("demo_1/robot_states"),
                d["demo_1"].create_dataset("robot_states", data=np.zeros((4, 9))),
            ),
            "robot_states",
            "4 frames but 13 actions",
        ),
        (
            lambda d: (
                d.__delitem__("demo_1/obs/agentview_rgb"),
                d["demo_1/obs"].create_dataset(
                    "agentview_rgb", data=np.zeros((9, 32, 32, 3), np.uint8)
                ),
            ),
            "image.agentview",
            "9 frames but 13 actions",
        ),
        (
            lambda d: d["demo_1/obs/gripper_states"].__setitem__((0, 0), np.inf),
            "state",
            "NaN or inf",
        ),
        (
            lambda d: d["demo_1/obs"].__delitem__("eye_in_hand_rgb"),
            "eye_in_hand_rgb",
            "missing camera",
        ),
    ],
    ids=[
        "missing-key",
        "nan",
        "out-of-range",
        "extra-length",
        "image-length",
        "state-inf",
        "missing-camera",
    ],
)
def test_each_problem_is_reported_with_file_episode_and_key(tmp_path, edit, key, message):
    root = _libero_with(tmp_path, edit)
    problems = check_dataset(open_dataset(root))
    assert len(problems) == 1, problems
    p = problems[0]
    assert p.episode == 1 and key in p.key and message in p.message
    assert "turn_on_the_stove_demo.hdf5:demo_1" in p.file
    r = run("data", "check", root)
    assert r.exit_code == 1 and str(p) in r.output


def test_empty_episode_and_missing_instruction(tmp_path):
    root = make_custom_hdf5(
        tmp_path / "c", mapping="action: action\ninstruction: language_instruction\nfps: 10\n"
    )
    with h5py.File(root / "episode_002.hdf5", "a") as f:
        del f["action"]
        f.create_dataset("action", data=np.zeros((0, 6), np.float32))
    problems = check_dataset(open_dataset(root))
    assert [(p.episode, p.key) for p in problems] == [(1, "instruction"), (2, "action")]
    assert "empty episode" in problems[1].message


def test_unreadable_frames(tmp_path):
    root = make_custom_hdf5(tmp_path / "c", encoded="png")
    with h5py.File(root / "episode_000.hdf5", "a") as f:
        f["observations/images/camera1"][4] = np.frombuffer(b"not an image at all", np.uint8)
    problems = check_dataset(open_dataset(root))
    assert (
        len(problems) == 1
        and problems[0].episode == 0
        and "unreadable frames" in problems[0].message
    )
    assert problems[0].key == "observations/images/camera1"


def test_truncated_video_is_reported(tmp_path):
    v21 = tmp_path / "v21"
    convert(open_dataset(make_libero_hdf5(tmp_path / "d")), v21, "lerobot")
    video = v21 / "videos/chunk-000/observation.images.wrist/episode_000002.mp4"
    video.write_bytes(video.read_bytes()[:300])
    problems = check_dataset(open_dataset(v21))
    assert [(p.episode, p.key) for p in problems] == [(2, "observation.images.wrist")]


# ------------------------------------------------------------------------------------- stats
def test_stats_match_numpy(tmp_path):
    root = make_libero_hdf5(tmp_path / "d")
    ds = open_dataset(root)
    stats = dataset_stats(ds)
    actions = np.concatenate([ds.load_episode(i, cameras=[]).actions for i in range(len(ds))])
    states = np.concatenate([ds.load_episode(i, cameras=[]).states for i in range(len(ds))]).astype(
        np.float64
    )
    for name, arr in (("action", actions), ("state", states)):
        np.testing.assert_allclose(stats[name]["mean"], arr.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats[name]["std"], arr.std(0), rtol=1e-10)
        np.testing.assert_array_equal(stats[name]["min"], arr.min(0))
        np.testing.assert_array_equal(stats[name]["max"], arr.max(0))
        np.testing.assert_allclose(stats[name]["q01"], np.quantile(arr, 0.01, axis=0))
        np.testing.assert_allclose(stats[name]["q99"], np.quantile(arr, 0.99, axis=0))
    assert stats["action"]["count"] == [len(actions)]


def test_reservoir_quantiles_within_half_a_percent():
    rng = np.random.default_rng(1)
    data = rng.standard_t(3, size=(200_000, 2))
    rs = RunningStats(max_rows=20_000)
    for chunk in np.array_split(data, 37):
        rs.update(chunk)
    out = rs.result()
    np.testing.assert_allclose(out["mean"], data.mean(0), rtol=1e-10)  # still exact
    for name, q in (("q01", 0.01), ("q99", 0.99)):
        for d in range(2):
            rank = np.mean(data[:, d] <= out[name][d])
            assert abs(rank - q) < 0.005, (name, d, rank)


def test_stats_cli_writes_json(tmp_path):
    root = make_custom_hdf5(tmp_path / "c")
    r = run("data", "stats", root, "--out", tmp_path / "s.json", "--images")
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats) >= {"action", "state", "image.camera1", "phase"}
    assert len(stats["image.camera1"]["mean"]) == 3 and 0 <= min(stats["image.camera1"]["min"]) <= 1


# ------------------------------------------------------------------------------------- split
def test_split_is_deterministic_stratified_and_complete(tmp_path):
    ds = open_dataset(make_libero_hdf5(tmp_path / "d", demos=20, T=3))
    a = split_episodes(ds, 0.1, seed=0)
    assert a == split_episodes(ds, 0.1, seed=0)
    assert a["test"] != split_episodes(ds, 0.1, seed=1)["test"]
    assert sorted(a["train"] + a["test"]) == list(range(40)) and not set(a["train"]) & set(
        a["test"]
    )
    assert {t: v["test"] for t, v in a["tasks"].items()} == {
        "turn on the stove": 2,
        "pick up the alphabet soup and place it in the basket": 2,
    }
    assert {ds.instruction(i) for i in a["test"]} == set(ds.tasks())
    tiny = split_episodes(open_dataset(make_libero_hdf5(tmp_path / "t", demos=3, T=3)), 0.05)
    assert all(v["test"] == 1 for v in tiny["tasks"].values())  # every task keeps a test episode
    r = run(
        "data", "split", tmp_path / "d", "--test-fraction", "0.1", "--out", tmp_path / "split.json"
    )
    assert r.exit_code == 0 and json.loads((tmp_path / "split.json").read_text()) == a


# ----------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("kind", ["libero_hdf5", "hdf5", "lerobot_v21", "lerobot_v30"])
def test_inspect_json_is_one_object_with_the_keys(tmp_path, kind):
    src = make_libero_hdf5(tmp_path / "d") if kind != "hdf5" else make_custom_hdf5(tmp_path / "d")
    path = src
    if kind.startswith("lerobot"):
        path = tmp_path / "lr"
        convert(open_dataset(src), path, "lerobot" if kind == "lerobot_v21" else "lerobot-v3")
    r = run("data", "inspect", path, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["format"] == kind
    assert {"format", "episodes", "frames", "fps", "tasks", "features"} <= set(obj)
    assert all(set(t) == {"instruction", "episodes"} for t in obj["tasks"])
    assert all(set(v) == {"shape", "dtype"} for v in obj["features"].values())
    assert obj["episodes"] == sum(t["episodes"] for t in obj["tasks"])
    human = run("data", "inspect", path)
    assert human.exit_code == 0 and "image orientation" in human.output


def test_convert_cli_reports_psnr(tmp_path):
    src = make_libero_hdf5(tmp_path / "d")
    r = run("data", "convert", src, tmp_path / "lr", "--to", "lerobot")
    assert r.exit_code == 0, r.output
    assert "agentview: PSNR" in r.output and " dB" in r.output
    r = run("data", "convert", src, tmp_path / "lr", "--to", "lerobot")
    assert r.exit_code == 1 and "already exists" in r.output


# ---------------------------------------------------------------------------------- download
def test_download_short_names():
    from vlatune.data.download import resolve_name

    assert (
        resolve_name("libero_object")["repo_id"] == "IPEC-COMMUNITY/libero_object_no_noops_lerobot"
    )
    assert resolve_name("libero_long")["repo_id"] == "IPEC-COMMUNITY/libero_10_no_noops_lerobot"
    raw = resolve_name("libero_spatial_raw")
    assert raw["repo_id"] == "yifengzhu-hf/LIBERO-datasets" and raw["allow_patterns"] == [
        "libero_spatial/*"
    ]
    assert resolve_name("me/my_robot_data")["repo_id"] == "me/my_robot_data"
    with pytest.raises(Exception, match="unknown dataset name"):
        resolve_name("bridge")


def test_download_without_hub_is_one_clear_sentence(tmp_path):
    from tests.conftest import run_cli

    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    r = run_cli(
        "data", "download", "libero_object_raw", "--out", str(tmp_path / "d"), env=env, timeout=120
    )
    assert r.returncode == 1
    assert (
        "could not download raw LIBERO HDF5 of libero_object from the Hugging Face Hub" in r.stderr
    )
    assert "Traceback" not in r.stderr

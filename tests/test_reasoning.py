"""ECoT annotations: movement primitives, the rules annotator, `vlatune annotate ecot / show`,
and NORA phase B training on the written file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_fixtures import make_libero_hdf5
from vlatune.data.annotations import load_annotations
from vlatune.reasoning.ecot import annotate_episode_rules, parse_instruction, phases
from vlatune.reasoning.primitives import movement_primitives

ROOT = Path(__file__).resolve().parents[1]


def line(direction, T=12, step=0.01):
    return np.cumsum(np.tile(np.asarray(direction, float) * step, (T, 1)), axis=0)


@pytest.mark.parametrize(
    "direction,name",
    [
        ((1, 0, 0), "move forward"),
        ((-1, 0, 0), "move backward"),
        ((0, 1, 0), "move left"),
        ((0, -1, 0), "move right"),
        ((0, 0, 1), "move up"),
        ((0, 0, -1), "move down"),
        ((1, 1, 1), "move forward left up"),
        ((-1, -1, -1), "move backward right down"),
    ],
)
def test_translation_primitives(direction, name):
    moves = movement_primitives(line(direction), np.zeros(12, bool))
    assert moves[0] == name and moves[5] == name
    assert moves[-1] == "stop"  # the last frame has no future window


def test_stop_gripper_and_rotation_primitives():
    still = np.zeros((10, 3))
    assert set(movement_primitives(still, np.zeros(10, bool))) == {"stop"}
    closing = np.array([False] * 5 + [True] * 5)
    moves = movement_primitives(still, closing)
    assert moves[1] == "close gripper" and moves[0] == "stop" and moves[6] == "stop"
    assert movement_primitives(still, ~closing)[3] == "open gripper"
    # a small drift below the threshold of the episode's fastest motion is "stop"
    drift = np.concatenate(
        [line((1, 0, 0), 6, 0.02), line((1, 0, 0), 6, 0.02)[-1] + line((0, 1, 0), 6, 1e-5)]
    )
    assert movement_primitives(drift, np.zeros(12, bool))[7] == "stop"
    # yaw about +z: counterclockwise seen from above; pitch about +y: tilt up
    yaw = np.stack([np.zeros(10), np.zeros(10), np.linspace(0, 1.5, 10)], 1)
    assert movement_primitives(still, np.zeros(10, bool), yaw)[0] == "rotate counterclockwise"
    assert movement_primitives(still, np.zeros(10, bool), -yaw)[0] == "rotate clockwise"
    pitch = yaw[:, [0, 2, 1]]
    assert movement_primitives(still, np.zeros(10, bool), pitch)[0] == "tilt up"


def test_instruction_parsing_and_phases():
    o = parse_instruction("pick up the alphabet soup and place it in the basket")
    assert (o.obj, o.prep, o.target) == ("the alphabet soup", "in", "the basket")
    o = parse_instruction("put the bowl on the plate")
    assert (o.obj, o.prep, o.target) == ("the bowl", "on", "the plate")
    assert parse_instruction("turn on the stove").obj == "the object"
    closed = np.array([0] * 3 + [1] * 12 + [0] * 10, bool)
    p = phases(closed)
    assert p[:3] == ["approach"] * 3 and p[3:11] == ["grasp"] * 8 and p[11:15] == ["carry"] * 4
    assert p[15:23] == ["release"] * 8 and p[23:] == ["retreat"] * 2


def test_rules_annotator_on_a_pick_and_place():
    down, up = line((0, 0, -1), 10), line((0, 1, 1), 15)
    pos = np.concatenate(
        [down, down[-1] + np.zeros((10, 3)), down[-1] + up, down[-1] + up[-1] + np.zeros((10, 3))]
    )
    T = len(pos)
    actions = np.zeros((T, 7))
    actions[:, -1] = -1
    actions[10:35, -1] = 1  # closed from frame 10 to 34
    states = np.concatenate([pos, np.zeros((T, 5))], 1)
    rows = annotate_episode_rules(
        "pick up the cream cheese and place it in the basket", states, actions
    )
    assert len(rows) == T and list(rows[0]) == [
        "TASK", "PLAN", "SUBTASK REASONING", "SUBTASK", "MOVE REASONING", "MOVE",
    ]  # fmt: skip
    assert rows[0]["SUBTASK"] == "reach the cream cheese" and rows[0]["MOVE"] == "move down"
    assert rows[7]["MOVE"] == "move down, close gripper"
    assert rows[12]["SUBTASK"] == "grasp the cream cheese"
    assert rows[22]["SUBTASK"] == "carry the cream cheese to the basket"
    assert rows[22]["MOVE"] == "move left up"
    assert rows[36]["SUBTASK"] == "place the cream cheese in the basket"
    assert "4. place the cream cheese in the basket" in rows[0]["PLAN"]


def test_annotate_cli_show_and_nora_phase_b_training(tmp_path):
    data = make_libero_hdf5(tmp_path / "data", demos=3, T=12, res=64)
    out = tmp_path / "ecot.json"
    r = run_cli("annotate", "ecot", str(data), "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert (
        doc["annotator"] == "rules"
        and doc["prompt_sha256"]
        and "GRIPPER POSITION" in doc["omitted"]
    )
    rows = load_annotations(out)
    from vlatune.data import open_dataset

    with open_dataset(data) as ds:
        frames = sum(ds.episode_length(e) for e in range(len(ds)))
        instruction = ds.load_episode(2, cameras=[]).instruction
    assert len(rows) == frames and rows[(2, 11)]["reasoning"]["TASK"] == instruction
    png = tmp_path / "show.png"
    r = run_cli(
        "annotate", "show", str(out), "--dataset", str(data), "--episode", "1", "--frame", "4",
        "--out", str(png),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # NORA phase B reads the file: the CoT loss is trained and logged
    from hf_fixtures import tiny_qwen2_5_vl, train_tiny_nora

    qwen = tiny_qwen2_5_vl(tmp_path / "qwen")
    metrics = train_tiny_nora(
        ROOT / "configs/nora/text_cot.yaml", data, qwen, tmp_path / "run", f"data.annotations={out}"
    )
    assert any(m.get("cot_loss", 0) > 0 and m.get("cot_fraction") == 1.0 for m in metrics)


def test_bad_annotation_files_are_clear(tmp_path):
    from vlatune.data.episode import DataError

    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="format"):
        load_annotations(bad)
    bad.write_text(json.dumps({"format": "vlatune-annotations/1", "frames": [{"episode": 0}]}))
    with pytest.raises(DataError, match="frames\\[0\\]"):
        load_annotations(bad)


def good_reply(body: dict) -> str:
    """A valid tagged reply for whatever episode the prompt describes."""
    import re

    prompt = body["messages"][-1]["content"]
    T = int(re.search(r"has (\d+) frames", prompt).group(1))
    half = T // 2
    return (
        "PLAN: 1. reach the object 2. move it\n"
        f"SEGMENT 0-{half - 1}: SUBTASK: reach the object | SUBTASK REASONING: it is not held "
        "| MOVE REASONING: to get closer\n"
        f"SEGMENT {half}-{T - 1}: SUBTASK: move it | SUBTASK REASONING: it is held | MOVE "
        "REASONING: to carry it\n"
    )


def test_openai_annotator_retries_caches_resumes_and_rejects_bad_replies(tmp_path):
    from llm_server import ChatServer

    data = make_libero_hdf5(tmp_path / "data", demos=2, T=12, res=32)
    out = tmp_path / "ecot.json"
    env = {"VLATUNE_LLM_API_KEY": "sk-test-secret", "VLATUNE_LLM_MODEL": "tiny-llm"}
    # a malformed reply: clear error, nothing cached, no output file
    with ChatServer([(200, "Sure! Here is the plan: reach, then grasp.")]) as srv:
        r = run_cli("annotate", "ecot", str(data), "--out", str(out), "--llm", "openai",
                    "--geometry", "off", env={**env, "VLATUNE_LLM_BASE_URL": srv.url})  # fmt: skip
    assert r.returncode != 0 and "MalformedReply" in r.stderr and "PLAN" in r.stderr
    assert not out.exists() and not list((tmp_path / "ecot.json.cache").glob("*.json"))
    # a rate limit (429) then success: retried with back-off, every episode annotated
    with ChatServer([(429, "slow down"), (200, good_reply)]) as srv:
        r = run_cli("annotate", "ecot", str(data), "--out", str(out), "--llm", "openai",
                    "--geometry", "off", env={**env, "VLATUNE_LLM_BASE_URL": srv.url})  # fmt: skip
        n_requests = len(srv.requests)
        assert all(a == "Bearer sk-test-secret" for a in srv.auth)
    assert r.returncode == 0, r.stderr
    assert "sk-test-secret" not in r.stdout + r.stderr
    from vlatune.data import open_dataset

    with open_dataset(data) as ds:
        episodes = len(ds)
    assert n_requests == episodes + 1  # one per episode, plus the refused one
    doc = json.loads(out.read_text())
    assert doc["annotator"] == "openai" and doc["model"] == "tiny-llm"
    rows = load_annotations(out)
    assert rows[(0, 0)]["reasoning"]["SUBTASK"] == "reach the object"
    assert rows[(0, 11)]["reasoning"]["SUBTASK"] == "move it"
    assert rows[(0, 0)]["reasoning"]["MOVE"]  # from proprioception, not the model
    # resume: a second run is served from the cache, no request reaches the server
    with ChatServer([(500, "should not be called")]) as srv:
        r = run_cli("annotate", "ecot", str(data), "--out", str(out), "--llm", "openai",
                    "--geometry", "off", env={**env, "VLATUNE_LLM_BASE_URL": srv.url})  # fmt: skip
        assert srv.requests == []
    assert r.returncode == 0, r.stderr


def test_openai_annotator_needs_a_key_from_the_environment(tmp_path):
    data = make_libero_hdf5(tmp_path / "data", demos=1, T=8, res=32)
    env = {"VLATUNE_LLM_API_KEY": "", "OPENAI_API_KEY": "", "VLATUNE_LLM_MODEL": "m"}
    r = run_cli(
        "annotate", "ecot", str(data), "--out", str(tmp_path / "x.json"), "--llm", "openai", env=env
    )
    assert r.returncode != 0 and "VLATUNE_LLM_API_KEY" in r.stderr


def test_gripper_position_from_a_user_camera_matrix(tmp_path):
    data = make_libero_hdf5(tmp_path / "data", demos=1, T=8, res=32)
    cam = tmp_path / "cam.json"
    # u = 100 x + 10, v = 100 y + 20 (an orthographic camera, for a checkable projection)
    cam.write_text(json.dumps({"matrix": [[100, 0, 0, 10], [0, 100, 0, 20], [0, 0, 0, 1]]}))
    out = tmp_path / "ecot.json"
    r = run_cli("annotate", "ecot", str(data), "--out", str(out), "--camera-matrix", str(cam))
    assert r.returncode == 0, r.stderr
    from vlatune.data import open_dataset

    with open_dataset(data) as ds:
        s = ds.load_episode(0, cameras=[]).states
    doc = json.loads(out.read_text())
    first = json.loads(doc["frames"][0]["reasoning"]["GRIPPER POSITION"])
    assert first == [[round(100 * s[t, 0] + 10), round(100 * s[t, 1] + 20)] for t in range(5)]
    assert "VISIBLE OBJECTS" in doc["omitted"] and "GRIPPER POSITION" not in doc["omitted"]
    cam.write_text(json.dumps({"matrix": [[1, 0, 0]]}))
    r = run_cli("annotate", "ecot", str(data), "--out", str(out), "--camera-matrix", str(cam))
    assert r.returncode != 0 and "3x4" in r.stderr

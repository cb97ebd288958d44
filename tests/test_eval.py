"""Evaluation runner: Wilson intervals, plans and shards, conventions checked first (unit), and
in the simulator: replay of synthetic demos, resume, max steps, videos, crashed workers
(errors count as failures). Counting, fallbacks and settings: tests/test_eval_trust.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.eval_policies import MARKER
from vlatune.eval.results import summarize, wilson
from vlatune.eval.runner import EvalSpec, evaluate, merge, plan, read_episodes


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        (5, 10, 0.2366, 0.7634),
        (0, 20, 0.0, 0.1611),
        (45, 50, 0.7864, 0.9565),
        (50, 50, 0.9287, 1.0),
    ],
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_errors_count_as_failures_with_the_finished_rate_beside():
    eps = [
        {
            "suite": "libero_object",
            "task_id": 0,
            "task_name": "t",
            "instruction": "i",
            "success": True,
            "error": None,
        },
        {
            "suite": "libero_object",
            "task_id": 0,
            "task_name": "t",
            "instruction": "i",
            "success": False,
            "error": None,
        },
        {
            "suite": "libero_object",
            "task_id": 0,
            "task_name": "t",
            "instruction": "i",
            "success": None,
            "error": "crash",
        },
    ]
    s = summarize(eps)["overall"]
    assert (s["trials"], s["successes"], s["failures"], s["errors"]) == (3, 1, 1, 1)
    assert s["success_rate"] == pytest.approx(1 / 3) and s["success_rate_finished"] == 0.5


def test_plan_init_states_and_shards(tmp_path):
    spec = EvalSpec(policy="scripted", tasks=[0, 3], trials=60, out=tmp_path)
    eps = plan(spec)
    assert len(eps) == 120 and eps[55]["init_index"] == 5  # trial i uses init state i % 50
    shards = [
        plan(EvalSpec(policy="scripted", tasks=[0, 3], trials=60, out=tmp_path, shard=(i, 3)))
        for i in range(3)
    ]
    ids = [e["id"] for s in shards for e in s]
    assert sorted(ids) == sorted(e["id"] for e in eps) and len(set(ids)) == 120
    held_out = plan(EvalSpec(policy="scripted", tasks=[0], trials=3, out=tmp_path, first_init=40))
    assert [e["init_index"] for e in held_out] == [40, 41, 42]
    with pytest.raises(ValueError, match="shard"):
        EvalSpec(policy="scripted", out=tmp_path, shard=(3, 3))
    with pytest.raises(ValueError, match="tasks 0..9"):
        EvalSpec(policy="scripted", out=tmp_path, tasks=[10])


@pytest.mark.parametrize(
    "factory,field", [("raw_images", "image_orientation"), ("no_stats", "normalization_stats")]
)
def test_convention_mismatch_fails_before_any_episode(tmp_path, factory, field):
    spec = EvalSpec(
        policy=f"tests.eval_policies:{factory}", tasks=[0], trials=1, out=tmp_path / "o"
    )
    with pytest.raises(ValueError, match=f"disagree on conventions: .*{field}"):
        evaluate(spec)
    assert not (tmp_path / "o" / "episodes.jsonl").exists()


def test_unknown_policy_spec(tmp_path):
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate(EvalSpec(policy="no_such_policy", out=tmp_path))


# ------------------------------------------------------------------------------ simulator
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from vlatune.sim.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "demos"
    synthesize("libero_object", [0], episodes=2, out=out, resolution=64, first_init=0)
    return out


@pytest.mark.sim
def test_replay_of_synthetic_demos_succeeds_and_resume_skips_finished(synth, tmp_path):
    out = tmp_path / "eval"
    spec = EvalSpec(policy=f"replay:{synth}", tasks=[0], trials=2, video="none", out=out)
    seen = []
    summary = evaluate(spec, progress=lambda r, d, t: seen.append(r["id"]))
    assert summary["overall"]["success_rate"] == 1.0 and summary["overall"]["trials"] == 2
    eps = read_episodes(out / "episodes.jsonl")
    assert {e["init_index"] for e in eps} == {0, 1} and all(e["seed"] == 7 for e in eps)
    results = json.loads((out / "results.json").read_text())
    assert results["versions"]["mujoco"] and len(results["policy_config_hash"]) == 16
    assert (out / "results.csv").read_text().startswith("level,name,instruction,trials")
    assert (out / "success_rates.png").stat().st_size > 1000
    # resume: drop the last record, run again: only that episode runs
    lines = (out / "episodes.jsonl").read_text().splitlines()
    (out / "episodes.jsonl").write_text(lines[0] + "\n")
    seen.clear()
    evaluate(spec, progress=lambda r, d, t: seen.append(r["id"]))
    assert seen == ["libero_object/t0/trial1"]
    assert len(read_episodes(out / "episodes.jsonl")) == 2
    with pytest.raises(ValueError, match="another policy or other settings"):
        evaluate(EvalSpec(policy="scripted", tasks=[0], trials=2, video="none", out=out))


@pytest.mark.sim
def test_max_steps_and_failure_video(tmp_path):
    from vlatune.data.video import decode_all

    spec = EvalSpec(
        policy="tests.eval_policies:still",
        tasks=[0],
        trials=1,
        max_steps=6,
        replan=4,
        resolution=64,
        video="failures",
        out=tmp_path,
    )
    evaluate(spec)
    (e,) = read_episodes(tmp_path / "episodes.jsonl")
    assert e["steps"] == 6 and e["success"] is False
    assert e["video"] == "videos/libero_object_t0_trial0_failure.mp4"
    frames = decode_all(tmp_path / e["video"])
    assert frames.shape == (
        7,
        64,
        128,
        3,
    )  # 6 steps + the last observation, two cameras side by side


@pytest.mark.sim
def test_video_trials_records_only_the_first_and_the_policy_still_sees_every_query(tmp_path):
    from tests import eval_policies

    eval_policies.SEEN.clear()
    spec = EvalSpec(
        policy="tests.eval_policies:looking",
        tasks=[0],
        trials=2,
        max_steps=6,
        replan=4,
        resolution=64,
        video="all",
        video_trials=1,
        out=tmp_path,
    )
    evaluate(spec)
    eps = sorted(read_episodes(tmp_path / "episodes.jsonl"), key=lambda e: e["trial"])
    assert [e["video"] is not None for e in eps] == [True, False]
    assert sorted(p.name for p in (tmp_path / "videos").glob("*.mp4")) == [
        "libero_object_t0_trial0_failure.mp4"
    ]
    # 2 queries per episode (steps 0 and 4), each with both cameras, rendered or not otherwise
    assert eval_policies.SEEN == [("agentview", "wrist")] * 4


@pytest.mark.sim
def test_crashed_worker_is_replaced_and_its_episode_retried(tmp_path):
    MARKER.unlink(missing_ok=True)
    spec = EvalSpec(
        policy="tests.eval_policies:crash_once",
        tasks=[0],
        trials=2,
        workers=2,
        video="none",
        max_steps=30,
        out=tmp_path / "once",
    )
    evaluate(spec)
    eps = read_episodes(tmp_path / "once" / "episodes.jsonl")
    assert len(eps) == 2 and all(e["error"] is None for e in eps)
    assert sum(e.get("retries", 0) for e in eps) == 1
    spec = EvalSpec(
        policy="tests.eval_policies:crash_always",
        tasks=[0],
        trials=1,
        workers=2,
        video="none",
        max_steps=30,
        out=tmp_path / "always",
    )
    summary = evaluate(spec)
    (e,) = read_episodes(tmp_path / "always" / "episodes.jsonl")
    assert e["success"] is None and "worker crashed twice" in e["error"]
    assert summary["overall"]["errors"] == 1 and summary["overall"]["trials"] == 1
    assert summary["overall"]["success_rate"] == 0.0  # an error counts as a failure


@pytest.mark.sim
def test_shards_merge(synth, tmp_path):
    for i in range(2):
        evaluate(
            EvalSpec(
                policy=f"replay:{synth}",
                tasks=[0],
                trials=2,
                video="none",
                shard=(i, 2),
                out=tmp_path / f"s{i}",
            )
        )
    summary = merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "all")
    assert summary["overall"]["trials"] == 2 and summary["overall"]["successes"] == 2
    assert np.array_equal(
        sorted(e["trial"] for e in read_episodes(tmp_path / "all" / "episodes.jsonl")), [0, 1]
    )

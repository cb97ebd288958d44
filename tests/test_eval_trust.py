"""Evaluation you can trust: honest counting (policy exceptions are failures, errors count as
failures), fallbacks surfaced in every output, settings that travel with a checkpoint, stale
split / stats refused, a torn episodes.jsonl line set aside and re-run, a moved evaluation folder
resumed, the demo's shortfall stated first. Simulator tests are few and short (max_steps 4)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.data_fixtures import make_libero_hdf5
from vlatune.eval.results import headline, summarize, warnings_for, write_results
from vlatune.eval.runner import (
    EvalSpec,
    evaluate,
    read_episodes,
    repair_log,
    resolve_settings,
)


def _ep(trial: int, **kw) -> dict:
    base = {
        "id": f"libero_object/t0/trial{trial}",
        "suite": "libero_object",
        "task_id": 0,
        "trial": trial,
        "init_index": trial,
        "task_name": "t",
        "instruction": "i",
        "success": False,
        "steps": 4,
        "queries": 2,
        "fallbacks": {},
        "error": None,
        "exception": None,
        "video": None,
    }
    return {**base, **kw}


def test_policy_exceptions_are_failures_and_errors_count_as_failures():
    eps = [
        _ep(0, success=True),
        _ep(1, exception={"stage": "policy.predict", "message": "RuntimeError: x"}),
        _ep(2, success=None, steps=None, error="worker crashed twice (exit code -11)"),
        _ep(3),
    ]
    o = summarize(eps)["overall"]
    assert (o["trials"], o["successes"], o["failures"], o["errors"]) == (4, 1, 2, 1)
    assert o["success_rate"] == 0.25  # over all trials: the error counts as a failure
    assert o["success_rate_finished"] == pytest.approx(1 / 3)  # given next to it
    assert o["policy_exceptions"] == 1
    text = headline(o)
    assert text.startswith("1/4 (25.0%") and "1 error(s) counted as failures" in text
    assert "33.3%" in text
    warnings = warnings_for(summarize(eps))
    assert any("counted as failures, success 25.0%" in w for w in warnings)
    assert any("the policy raised in 1 episode" in w for w in warnings)
    # no errors: no second rate
    assert summarize(eps[:2])["overall"]["success_rate_finished"] is None


def test_fallbacks_summed_in_results_json_and_csv_with_a_warning(tmp_path):
    eps = [
        _ep(0, queries=40, fallbacks={"undecodable_tokens": 1, "clipped_actions": 0}),
        _ep(1, queries=60, fallbacks={"undecodable_tokens": 2, "clipped_actions": 1}),
    ]
    summary = summarize(eps)
    write_results(tmp_path, summary, {"policy": {}})
    res = json.loads((tmp_path / "results.json").read_text())
    assert "worker crashed twice" in res["counting_rule"]
    (task,) = res["tasks"]
    assert (task["queries"], task["fallback_queries"]) == (100, 4)
    assert task["fallbacks"] == {"undecodable_tokens": 3, "clipped_actions": 1}
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows[0]["fallback_queries"] == "4" and rows[0]["queries"] == "100"
    assert rows[0]["failures"] == "2" and rows[0]["errors"] == "0"
    assert rows[0]["fallbacks"] == "clipped_actions=1;undecodable_tokens=3"
    assert any("fallbacks: 4 of 100 queries" in w for w in warnings_for(summary))
    # at most 1% of the queries: no warning
    quiet = summarize([_ep(0, queries=100, fallbacks={"undecodable_tokens": 1})])
    assert not warnings_for(quiet)


def test_torn_last_line_is_set_aside_not_lost(tmp_path):
    log = tmp_path / "episodes.jsonl"
    good = json.dumps(_ep(0)) + "\n"
    torn = json.dumps(_ep(1))[:37]
    log.write_text(good + torn)
    message = repair_log(log)
    assert "moved to episodes.jsonl.torn" in message
    assert log.read_text() == good
    assert (tmp_path / "episodes.jsonl.torn").read_text() == torn + "\n"
    assert repair_log(log) is None  # whole now
    # a complete last record cut just before its newline is kept
    log.write_text(good + json.dumps(_ep(1)))
    assert repair_log(log) is None and len(read_episodes(log)) == 2
    assert log.read_text().endswith("\n")
    # a bad line elsewhere is an error naming the file and the line
    log.write_text(good + "{oops\n" + good)
    with pytest.raises(ValueError, match="episodes.jsonl: line 2 is not valid JSON"):
        read_episodes(log)


class _Trained:
    eval_settings = {"resolution": 128, "replan": 4}


def test_settings_come_from_the_policy_unless_a_flag_overrides_them(tmp_path):
    spec = EvalSpec(policy="scripted", out=tmp_path)
    warned: list[str] = []
    meta = resolve_settings(spec, _Trained(), warned.append)
    assert (spec.resolution, spec.replan) == (128, 4) and not warned
    assert meta == {
        "settings_source": {"resolution": "policy", "replan": "policy"},
        "overrides": [],
    }
    spec = EvalSpec(policy="scripted", out=tmp_path, resolution=256, replan=4)
    meta = resolve_settings(spec, _Trained(), warned.append)
    assert spec.resolution == 256
    assert meta["overrides"] == [{"setting": "resolution", "value": 256, "trained": 128}]
    assert len(warned) == 1 and "--resolution 256 overrides" in warned[0]
    assert "resolution = 128" in warned[0]
    spec = EvalSpec(policy="scripted", out=tmp_path)
    meta = resolve_settings(spec, object(), warned.append)  # a policy without settings
    assert (spec.resolution, spec.replan) == (256, 8)
    assert meta["settings_source"] == {"resolution": "default", "replan": "default"}


# ------------------------------------------------------------------ a real tiny checkpoint
def _train_cfg(data: Path, run: Path, *extra: str):
    from vlatune.config import load_config
    from vlatune.demo import default_config

    return load_config(
        default_config(),
        [
            f"data.path={data}", "data.format=auto", "data.image_size=32", "data.batch_size=4",
            "data.val_fraction=0", "policy.tiny.dim=32", "policy.tiny.layers=1",
            "policy.tiny.keypoints=8", "policy.tiny.tokens_per_side=2", "optim.warmup_steps=0",
            "data.action_horizon=8", "eval.replan=8",
            f"train.output_dir={run}", "train.max_steps=2",
            "train.save_every=2", "train.val_every=null", "train.max_minutes=null",
            "train.ema_decay=0", "eval.resolution=128", *extra,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from vlatune.train.trainer import train

    root = tmp_path_factory.mktemp("trust")
    data = make_libero_hdf5(root / "data", demos=2, T=12, res=32)
    summary = train(_train_cfg(data, root / "run"), progress=False)
    return data, Path(summary["checkpoint"])


def test_checkpoint_carries_its_eval_settings(trained):
    from vlatune.eval.policies import checkpoint_eval_settings, load_policy

    _, ckpt = trained
    settings = {"resolution": 128, "replan": 8, "cameras": ["agentview", "wrist"]}
    assert checkpoint_eval_settings(ckpt) == settings
    assert checkpoint_eval_settings(ckpt / "policy") == settings  # the policy folder inside
    assert load_policy(str(ckpt)).eval_settings == settings


def test_vlatune_policy_counts_clipped_actions(trained):
    import numpy as np
    import torch

    from vlatune.eval.policies import load_policy

    policy = load_policy(str(trained[1]))
    obs = {
        "images": {c: np.zeros((32, 32, 3), np.uint8) for c in ("agentview", "wrist")},
        "state": np.zeros(8),
        "instruction": "x",
    }
    assert policy.fallbacks() == {"clipped_actions": 0}
    chunk = torch.zeros(1, 8, 7)
    policy.predict_normalized = lambda o: chunk  # the model's raw output, normalised units
    policy.predict(obs)
    chunk[0, 3, 6] = 5.0  # the gripper is thresholded, never a fallback
    policy.predict(obs)
    assert policy.fallbacks() == {"clipped_actions": 0}
    chunk[0, 3, 0] = 1.005  # within the tolerance
    policy.predict(obs)
    assert policy.fallbacks() == {"clipped_actions": 0}
    chunk[0, 3, 0] = 1.5
    actions = policy.predict(obs)
    assert policy.fallbacks() == {"clipped_actions": 1}
    assert actions[3, 0] == pytest.approx(policy.action_norm.inverse(np.ones((1, 7)))[0, 0])


def test_tokens_head_counts_undecodable_sequences():
    from types import SimpleNamespace

    import numpy as np
    import torch

    from vlatune.policies.composed.token_head import TokenHead
    from vlatune.policies.tokenizers.bins import BinTokenizer

    tok = BinTokenizer(n_bins=4)
    cfg = SimpleNamespace()  # decoding reads no setting
    head = TokenHead(cfg, tok, horizon=2, action_dim=3, safe_action=[9] * 3)
    backbone = SimpleNamespace(
        action_ids=torch.arange(100, 104),
        eos_id=1,
        tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens=False: ""),
    )
    whole = [100 + i for i in tok.encode(np.zeros((2, 3)))] + [1]
    cut = whole[:3] + [1, 1, 1, 1]  # 3 of the 6 action tokens, then the end: no (2, 3) chunk
    chunks = head.decode(backbone, torch.tensor([whole, cut]))
    assert head.decode_failures == 1
    assert np.all(chunks[1] == 9) and not np.all(chunks[0] == 9)


def test_stale_split_and_stats_are_refused(trained, tmp_path, caplog):
    from vlatune.train.trainer import TrainError, train

    data, ckpt = trained
    run = tmp_path / "run"
    train(_train_cfg(data, run), progress=False)
    assert json.loads((run / "data_fingerprint.json").read_text())["episodes"] == 4
    # the same content elsewhere (moved / copied): reused, said in the log
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    train(_train_cfg(moved, run, "train.resume=never"), progress=False)
    assert "same content (moved or copied): reused" in caplog.text
    # other data at the same path: refused, naming the files to delete
    shutil.rmtree(moved)
    make_libero_hdf5(moved, demos=3, T=12, res=32)
    with pytest.raises(TrainError, match=r"split.json and .*stats.json were made from another"):
        train(_train_cfg(moved, run, "train.resume=never"), progress=False)
    with pytest.raises(TrainError, match="episodes 4 then, 6 now.*delete"):
        train(_train_cfg(moved, run, "train.resume=never"), progress=False)


def test_metrics_log_of_a_run_killed_before_any_checkpoint_is_not_appended_to(trained, tmp_path):
    from vlatune.train.trainer import train

    data, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "lo')
    train(_train_cfg(data, run, "train.log_every=1"), progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


# ------------------------------------------------------------------ simulator
@pytest.mark.sim
def test_checkpoint_is_evaluated_at_its_training_resolution(trained, tmp_path):
    _, ckpt = trained
    evaluate(
        EvalSpec(policy=str(ckpt), tasks=[0], trials=1, max_steps=2, video="none", out=tmp_path)
    )
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["settings"]["resolution"] == 128 and run["settings"]["replan"] == 8
    assert run["settings_source"] == {"resolution": "policy", "replan": "policy"}
    assert "out" not in run["settings"]  # the folder is relocatable
    (e,) = read_episodes(tmp_path / "episodes.jsonl")
    assert e["exception"] is None and e["steps"] == 2
    assert set(e["fallbacks"]) == {"clipped_actions"}  # the vlatune policy reports its counters


@pytest.mark.sim
@pytest.mark.parametrize("workers", [1, 2])
def test_raising_policy_gives_failures_never_a_crash(tmp_path, workers):
    from vlatune.eval.report import write_report

    out = tmp_path / "eval"
    spec = dict(
        policy="tests.trust_policies:raises_on_odd_trials", tasks=[0], trials=4, max_steps=4,
        replan=2, resolution=64, video="none", workers=workers,
    )  # fmt: skip
    warned: list[str] = []
    summary = evaluate(EvalSpec(**spec, out=out), warn=warned.append)
    eps = {e["trial"]: e for e in read_episodes(out / "episodes.jsonl")}
    assert sorted(eps) == [0, 1, 2, 3]
    assert len({tuple(sorted(e)) for e in eps.values()}) == 1  # complete, identical records
    assert eps[0]["exception"] is None and eps[0]["steps"] == 4 and eps[0]["queries"] == 2
    assert eps[0]["fallbacks"] == {"undecodable_tokens": 1}
    for k, stage, kind in (
        (1, "policy.predict", "RuntimeError"),
        (2, "policy.reset", "LookupError"),
    ):
        exc = eps[k]["exception"]
        assert eps[k]["success"] is False and eps[k]["error"] is None
        assert exc["stage"] == stage and exc["message"].startswith(kind)
        assert "Traceback" in exc["traceback"] and "trust_policies.py" in exc["traceback"]
    o = summary["overall"]
    assert (o["trials"], o["successes"], o["failures"], o["errors"]) == (4, 0, 4, 0)
    assert o["success_rate"] == 0.0 and o["policy_exceptions"] == 3
    assert (o["queries"], o["fallback_queries"]) == (2 + 1 + 0 + 1, 1)
    assert any("the policy raised in 3 episode(s)" in w for w in warned)
    assert any("fallbacks: 1 of 4 queries" in w for w in warned)
    res = json.loads((out / "results.json").read_text())
    assert res["overall"]["failures"] == 4 and res["counting_rule"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert (rows[0]["failures"], rows[0]["fallback_queries"], rows[0]["queries"]) == ("4", "1", "4")
    html, md = write_report(tmp_path, {}, {}, out, None, note=None)
    page = html.read_text()
    assert "fallbacks: 1 of 4 queries" in page and "policy.reset: LookupError" in page
    assert "4 failures, 0 errors" in md.read_text()
    # a rerun works and runs nothing
    seen: list[str] = []
    evaluate(EvalSpec(**spec, out=out), progress=lambda r, d, t: seen.append(r["id"]))
    assert seen == [] and len(read_episodes(out / "episodes.jsonl")) == 4
    if workers == 2:
        return
    # moved folder + torn last line: resumes where it was, the torn episode runs again
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    log = moved / "episodes.jsonl"
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    evaluate(EvalSpec(**spec, out=moved), progress=lambda r, d, t: seen.append(r["id"]))
    assert seen == [last["id"]]
    assert (moved / "episodes.jsonl.torn").read_text() == lines[-1][:25] + "\n"
    assert sorted(e["trial"] for e in read_episodes(log)) == [0, 1, 2, 3]


def test_demo_shortfall_note():
    from vlatune.demo import shortfall_note

    assert shortfall_note(2000, 2000, None) is None
    assert (
        shortfall_note(186, 2000, 10.0)
        == "trained 186 of 2,000 steps (stopped by --minutes 10): not the recipe's result; "
        "rerun to continue"
    )

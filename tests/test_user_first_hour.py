"""A new user's first hour (issue 18): progress lines, warnings, help, conventions by default."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.data_fixtures import make_libero_hdf5
from vlatune.progress import Progress, format_duration


def test_progress_plain_lines_and_heartbeat():
    out = io.StringIO()
    with Progress(total=4, desc="eval", stream=out, interval=0.2, mode="auto") as p:
        assert p.mode == "plain"  # a StringIO is no terminal
        p.update(1, success=True)
        time.sleep(0.7)  # nothing advances: the heartbeat must still print
        p.note("episode 1: success")
        p.update(3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[eval] 0/4")
    assert any("1/4" in x and "success True" in x for x in lines[1:])  # heartbeat shows state
    assert "episode 1: success" in lines
    assert any(x.startswith("[eval] 4/4 (100%)") for x in lines)
    assert lines[-1].endswith("finished")


def test_progress_off_prints_only_notes():
    out = io.StringIO()
    with Progress(total=3, desc="x", stream=out, enabled=False) as p:
        p.update(3)
        p.note("hello")
    assert out.getvalue() == "hello\n"


def test_format_duration():
    assert format_duration(3.25) == "3.2s" or format_duration(3.25) == "3.3s"
    assert format_duration(75) == "1m15s"
    assert format_duration(4000) == "1h06m"


# ------------------------------------------------------------------ help, version, recipes (8)
def _commands(group, path=("vlatune",)):
    import click

    yield path, group
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            yield from _commands(sub, (*path, name))


def test_every_option_has_help():
    import click

    from vlatune.cli import cli

    missing = [
        f"{' '.join(path)} {param.opts[0]}"
        for path, cmd in _commands(cli)
        for param in cmd.params
        if isinstance(param, click.Option)
        and not (param.help or param.hidden)  # hidden: internal switches, not for users
        and param.opts[0] != "--version"
    ]
    assert not missing, f"options without help: {missing}"


def test_version_and_help_texts():
    from click.testing import CliRunner

    from vlatune import __version__
    from vlatune.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = runner.invoke(cli, ["annotate", "--help"])
    assert "later" not in r.output and "flow" in r.output
    r = runner.invoke(cli, ["eval", "--help"])
    assert "checkpoint-<step>" in " ".join(r.output.split())


def test_recipes_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    from vlatune.config import ConfigError, list_recipes, load_config, resolve_config_path

    monkeypatch.chdir(tmp_path)  # not the repository root
    assert "demo/tiny" in list_recipes() and "nora/baseline" in list_recipes()
    for name in ("demo/tiny", "demo/tiny.yaml", "configs/demo/tiny.yaml"):
        assert load_config(name).name == "demo-tiny"
    own = tmp_path / "demo" / "tiny.yaml"  # a file at the path given wins over the recipe
    own.parent.mkdir()
    own.write_text("name: mine\n")
    assert resolve_config_path("demo/tiny.yaml") == Path("demo/tiny.yaml")
    assert load_config("demo/tiny.yaml").name == "mine"
    with pytest.raises(ConfigError, match="Did you mean 'nora/baseline'"):
        load_config("nora/basline")


def test_recipes_ship_as_package_data():
    text = (REPO / "pyproject.toml").read_text()
    assert '"configs/*/*.yaml"' in text
    pkg = REPO / "src" / "vlatune" / "configs"
    found = {p.relative_to(pkg).as_posix() for p in pkg.glob("*/*.yaml")}
    assert {"demo/tiny.yaml", "nora/baseline.yaml", "accelerate/fsdp.yaml"} <= found
    assert (REPO / "configs" / "demo" / "tiny.yaml").is_file()  # the old path still works


# ------------------------------------------------------ training on a user's data (1, 3, 7)
def test_readme_training_command_detects_format_and_warns(tmp_path):
    data = make_libero_hdf5(tmp_path / "libero", demos=3, T=12, res=32)
    run = tmp_path / "run"
    r = run_cli(
        "train", "demo/tiny", f"data.path={data}", f"train.output_dir={run}",
        "train.max_steps=2", "--no-progress",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, text[-3000:]
    assert "libero_hdf5 (auto-detected)" in text
    assert "holding out 2 of 6 episodes" in text and "data.val_fraction=0" in text
    assert "optim.warmup_steps (200) is longer than train.max_steps (2)" in text
    assert (run / "checkpoint-2").is_dir()


def test_split_warns_when_a_small_dataset_loses_many_episodes(tmp_path):
    from vlatune.data.split import held_out_warning

    data = make_libero_hdf5(tmp_path / "libero", demos=2, T=10, res=16)  # 2 tasks x 2
    r = run_cli("data", "split", str(data), "--test-fraction", "0.05")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0, r.stderr
    assert "holding out 2 of 4 episodes (50%)" in err and "--test-fraction 0" in err
    r = run_cli("data", "split", str(data), "--test-fraction", "0")
    assert r.returncode == 0 and "holding out" not in r.stderr
    big = {"train": list(range(95)), "test": list(range(5)), "test_fraction": 0.05, "tasks": {}}
    assert held_out_warning(big, "--test-fraction 0") is None


def test_runs_plot_warns_after_a_short_run_and_dedups_the_legend(tmp_path):
    from vlatune.train.plots import loss_series, plot_warnings

    row = {"step": 20, "lr": 1e-4, "loss": 0.5, "action_loss": 0.5, "l1": 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    r = run_cli("runs", "plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "1 logged training step(s)" in " ".join(r.stderr.split())
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "lr.png").is_file()
    rows = [{**row, "step": s, "val_loss": None} for s in (10, 20, 30)]
    rows[-1]["val_loss"] = 0.7
    assert plot_warnings(rows, tmp_path) == []
    labels = [label for label, _ in loss_series(rows)]
    assert labels == ["loss = action_loss = l1", "val_loss"]


# ------------------------------------------------------------- conversion is upright (2)
def test_convert_to_lerobot_writes_upright_frames_by_default(tmp_path):
    from vlatune.conventions import to_upright
    from vlatune.data import open_dataset

    src = make_libero_hdf5(tmp_path / "libero", demos=1, T=10, res=32)
    raw = open_dataset(src).load_episode(0).images["agentview"]
    assert open_dataset(src).info.image_orientation == "raw"
    up_dir, raw_dir = tmp_path / "up", tmp_path / "raw"
    r = run_cli("data", "convert", str(src), str(up_dir), "--to", "lerobot")
    assert r.returncode == 0, r.stderr
    assert "frames: upright, rotated 180 degrees" in " ".join(r.stdout.split())
    r = run_cli(
        "data", "convert", str(src), str(raw_dir), "--to", "lerobot", "--orientation", "raw"
    )
    assert r.returncode == 0 and "frames: raw, as in the source" in " ".join(r.stdout.split())

    up = open_dataset(up_dir)
    assert up.info.image_orientation == "upright"
    frames = up.load_episode(0).images["agentview"]
    upright = to_upright(raw)
    # the decoded frames are the upright ones (video codec loss aside), not the raw ones
    assert _psnr(frames, upright) > 22 > _psnr(frames, raw)
    kept = open_dataset(raw_dir).load_episode(0).images["agentview"]
    assert _psnr(kept, raw) > 22 > _psnr(kept, upright)


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -------------------------------------------------------------- experiment dry run (8)
def test_experiment_dry_run_checks_the_data(tmp_path):
    r = run_cli(
        "experiment", "nora/baseline", "--subsets", "goal", "--eval-trials", "0",
        "--out", str(tmp_path / "x"), "--dry-run",
    )  # fmt: skip
    out = " ".join(r.stdout.split())
    assert r.returncode == 0, r.stderr
    assert "libero_goal_no_noops (missing)" in out and "do not exist" in out
    r = run_cli(
        "experiment", "nora/baseline", "--subsets", "goal", "--eval-trials", "0",
        "--out", str(tmp_path / "x"),
    )  # fmt: skip
    assert r.returncode == 1 and "do not exist" in r.stderr
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------ dependency noise (5)
@pytest.mark.sim
def test_sim_check_prints_nothing_from_robosuite_or_gym(tmp_path):
    r = run_cli("sim", "check", "--out", str(tmp_path / "check"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    noisy = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if "robosuite" in line.lower() or "gym" in line.lower()
    ]
    assert not noisy, noisy
    # robosuite's camera utilities (used by `annotate ecot`) print a gym notice on import
    code = (
        "from vlatune.sim.setup import import_libero; import_libero(); "
        "import robosuite.utils.camera_utils"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "robosuite" not in r.stderr and "gym" not in r.stderr


# ------------------------------------------------------------------------ demo report (6)
def test_report_parts_a_researcher_needs(tmp_path):
    from vlatune.demo import stop_reason
    from vlatune.eval.report import _eval_settings, pick_videos, stage_times

    eps = [{"trial": k, "success": k < 8, "video": f"v{k}.mp4"} for k in range(10)]
    eps.append({"trial": 10, "success": False})  # not filmed
    shown = pick_videos(eps)
    assert len(shown) == 6 and {e["success"] for e in shown} == {True, False}
    assert stage_times({"demonstrations_s": 0.0, "train_s": 600.0}, {"demonstrations"}) == (
        "demonstrations reused (already in the output folder), train 10.0 min"
    )
    assert stop_reason({"steps": 186, "stopped_by_time": True}, 2000, 1.0) == (
        "time cap train.max_minutes=1 reached at step 186 of 2,000"
    )
    assert "step 2,000 of 2,000" in stop_reason({"steps": 2000}, 2000, None)
    current = tmp_path / "eval" / "checkpoint-2000"
    current.mkdir(parents=True)
    (tmp_path / "eval" / "checkpoint-186").mkdir()
    (tmp_path / "eval" / "checkpoint-186" / "episodes.jsonl").write_text("")
    (tmp_path / "eval" / "notes").mkdir()  # not an evaluation folder
    settings = {"suite": "libero_object", "trials": 20, "seed": 7, "replan": 8}
    (current / "run.json").write_text(
        json.dumps({"settings": settings, "versions": {"vlatune": "0.1.0", "torch": "2.13"}})
    )
    (current / "results.json").write_text("{}")
    html_items, md = _eval_settings(tmp_path, current)
    text = "\n".join(md)
    assert "suite libero_object, trials 20, seed 7, replan 8" in text
    assert "vlatune 0.1.0, torch 2.13" in text
    assert "[results.json](eval/checkpoint-2000/results.json)" in text
    assert "eval/checkpoint-2000 (this report)" in text and "checkpoint-186" in text
    assert "notes" not in text
    assert "href='eval/checkpoint-2000/run.json'" in html_items


# ------------------------------------------------------------------------- progress (4, 8)
def test_long_commands_print_progress_lines_into_a_pipe(tmp_path):
    data = make_libero_hdf5(tmp_path / "libero", demos=2, T=10, res=16)
    r = run_cli("data", "check", str(data), env={"VLATUNE_PROGRESS_INTERVAL": "0"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(x.startswith("[checking] 4/4 (100%)") for x in lines), r.stderr
    assert "\x1b[" not in r.stderr  # plain lines in a pipe, no terminal control codes


def test_eval_resume_counts_finished_episodes(tmp_path):
    from vlatune.cli import _finished_episodes

    log = tmp_path / "episodes.jsonl"
    assert _finished_episodes(log) == 0
    rows = [
        {"id": "s/t0/trial0", "success": True, "error": None},
        {"id": "s/t0/trial1", "success": False, "error": "worker crashed"},  # runs again
        {"id": "s/t0/trial2", "success": False, "error": None},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _finished_episodes(log) == 2
    assert _finished_episodes(log, {"s/t0/trial0", "s/t0/trial1"}) == 1  # this run's episodes


def test_progress_rich_mode_shows_counts_not_a_bare_spinner():
    out = io.StringIO()
    with Progress(total=None, desc="regenerate", mode="rich", stream=out, unit="files") as p:
        p.update(1)
        p.total = 3  # known later, as `sim regenerate` learns it
        p.set(3, last="task_a")
        p.note("a line above the bar")
    text = out.getvalue()
    assert "a line above the bar" in text and "3/3" in text

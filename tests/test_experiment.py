"""`vlatune experiment`: the phases x subsets grid, cell skipping, results tables."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from data_fixtures import make_libero_hdf5
from vlatune.experiment import plan, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_the_nora_grid(tmp_path):
    r = run_cli(
        "experiment", "configs/nora/baseline.yaml", "--phases", "baseline,text_cot,text_flow_cot",
        "--out", str(tmp_path / "x"), "--dry-run",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for phase in ("baseline", "text_cot", "text_flow_cot"):
        for subset, suite in (("spatial", "libero_spatial"), ("long", "libero_10")):
            assert f"{phase}/{subset}: train 100000 steps on data/libero/{suite}_no_noops" in text
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


def test_bad_phase_and_subset_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="phase 'nope'"):
        plan(ROOT / "configs/nora/baseline.yaml", ["nope"], ["goal"], tmp_path)
    with pytest.raises(ValueError, match="--subsets"):
        plan(ROOT / "configs/nora/baseline.yaml", None, ["kitchen"], tmp_path)


@pytest.mark.sim
def test_grid_trains_evaluates_skips_and_tabulates(tmp_path):
    data = make_libero_hdf5(tmp_path / "data", demos=3, T=12, res=64)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for phase in ("a", "b"):
        shutil.copy(ROOT / "configs" / "demo" / "tiny.yaml", recipes / f"{phase}.yaml")
    overrides = [
        f"data.path={data}", "data.format=auto", "data.image_size=64", "data.batch_size=2",
        "train.max_steps=2", "train.max_minutes=null", "train.val_every=null",
        "eval.tasks=[0]", "eval.max_steps=3", "eval.resolution=64", "eval.video=none",
    ]  # fmt: skip
    said: list[str] = []
    out = tmp_path / "grid"
    records = run_experiment(
        recipes / "a.yaml", ["a", "b"], ["object"], out, eval_trials=1, overrides=overrides,
        say=said.append, progress=False,
    )  # fmt: skip
    assert [(r["phase"], r["subset"], r["steps"], r["trials"]) for r in records] == [
        ("a", "object", 2, 1),
        ("b", "object", 2, 1),
    ]
    md = (out / "results.md").read_text()
    assert "| phase | object |" in md and "| a | 0.0% [0.0, 79.3] (n=1)" in md
    assert "[run](a/object/run)" in md and "[eval](b/object/eval/results.json)" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["phase"] for r in rows] == ["a", "b"] and rows[0]["success_rate"] == "0.0"
    # a second run finds every cell done and runs nothing
    said.clear()
    run_experiment(
        recipes / "a.yaml", ["a", "b"], ["object"], out, eval_trials=1, overrides=overrides,
        say=said.append, progress=False,
    )  # fmt: skip
    assert not any("training" in s or "evaluating" in s for s in said), said

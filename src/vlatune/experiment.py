"""`vlatune experiment`: train and evaluate a grid of phases x LIBERO subsets, one results table.

A phase is a recipe file beside CONFIG: `--phases baseline,text_cot,text_flow_cot` with
CONFIG = configs/nora/baseline.yaml runs configs/nora/{baseline,text_cot,text_flow_cot}.yaml.
Each cell (phase, subset) is the recipe with `data.subset=<subset>` (which fills `{suite}` in
the data path and sets the evaluation suite), trained into `OUT/<phase>/<subset>/run` and its
final checkpoint evaluated on every task of the suite (`--eval-trials` per task) into
`OUT/<phase>/<subset>/eval`.

Cells already done are skipped: training is done when its `train_summary.json` reports the
recipe's step count (or a stop by its time budget); evaluation when its `results.json` has every
trial. An interrupted cell resumes (training from its last checkpoint, evaluation from its
episodes.jsonl). `results.md` / `results.csv` are rewritten after every cell: rows = phases,
columns = subsets, success rate with its 95% interval, links to each cell.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlatune.fsutil import write_json, write_text

SUBSETS = ("spatial", "object", "goal", "long")


@dataclass
class Cell:
    phase: str
    subset: str
    config_file: Path
    run_dir: Path
    eval_dir: Path

    @property
    def name(self) -> str:
        return f"{self.phase}/{self.subset}"


def plan(config: Path, phases: list[str] | None, subsets: list[str], out: Path) -> list[Cell]:
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"{config}: recipe not found")
    phases = phases or [config.stem]
    bad = [s for s in subsets if s not in SUBSETS]
    if bad:
        raise ValueError(f"--subsets {bad}: choose among {', '.join(SUBSETS)}")
    cells = []
    for phase in phases:
        file = config.parent / f"{phase}.yaml"
        if not file.is_file():
            raise FileNotFoundError(
                f"phase '{phase}': {file} not found (a phase is a recipe beside {config.name})"
            )
        for subset in subsets:
            base = Path(out) / phase / subset
            cells.append(Cell(phase, subset, file, base / "run", base / "eval"))
    return cells


def _load(cell: Cell, overrides: list[str]):
    from vlatune.config import load_config

    return load_config(
        cell.config_file,
        [f"data.subset={cell.subset}", *overrides, f"train.output_dir={cell.run_dir}"],
    )


def training_done(cell: Cell, max_steps: int) -> dict[str, Any] | None:
    f = cell.run_dir / "train_summary.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    return (
        s
        if (s.get("steps", 0) >= max_steps or s.get("stopped_by_time")) and s.get("checkpoint")
        else None
    )


def eval_done(cell: Cell, expected_trials: int) -> dict[str, Any] | None:
    f = cell.eval_dir / "results.json"
    if not f.is_file():
        return None
    r = json.loads(f.read_text())
    overall = r.get("overall", {})
    return r if overall.get("trials", 0) + overall.get("errors", 0) >= expected_trials else None


def run_experiment(
    config: Path,
    phases: list[str] | None,
    subsets: list[str],
    out: Path,
    eval_trials: int = 50,
    workers: int = 1,
    overrides: list[str] | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
    progress: bool = True,
) -> list[dict[str, Any]]:
    from vlatune.conventions import SUITES

    overrides = list(overrides or [])
    cells = plan(config, phases, subsets, out)
    rows = []
    for cell in cells:
        cfg = _load(cell, overrides)  # validates every cell before anything runs
        n_tasks = len(cfg.eval.tasks or range(SUITES[cfg.eval.suite].num_tasks))
        trained = training_done(cell, cfg.train.max_steps)
        evaluated = eval_done(cell, eval_trials * n_tasks) if eval_trials else None
        rows.append(
            {"cell": cell, "cfg": cfg, "trained": trained, "evaluated": evaluated, "tasks": n_tasks}
        )
    missing = {
        p: r["cell"].name for r in rows if not r["trained"] for p in _missing_inputs(r["cfg"])
    }
    if dry_run:
        for r in rows:
            c, cfg = r["cell"], r["cfg"]
            todo = []
            if not r["trained"]:
                gone = " (missing)" if str(cfg.data.path) in missing else ""
                todo.append(f"train {cfg.train.max_steps} steps on {cfg.data.path}{gone}")
            if eval_trials and not r["evaluated"]:
                todo.append(
                    f"evaluate {cfg.eval.suite} ({r['tasks']} tasks x {eval_trials} trials)"
                )
            say(f"{c.name}: {'; '.join(todo) if todo else 'done'}")
        if missing:
            say(f"warning: {_missing_text(missing)}")
        return [_record(r) for r in rows]
    if missing:
        raise FileNotFoundError(_missing_text(missing))
    from vlatune.eval.runner import EvalSpec, evaluate
    from vlatune.train.trainer import train

    for r in rows:
        c, cfg = r["cell"], r["cfg"]
        if not r["trained"]:
            say(f"[{c.name}] training {cfg.name} ({cfg.train.max_steps} steps) ...")
            r["trained"] = train(cfg, progress=progress)
        if eval_trials and not r["evaluated"]:
            say(f"[{c.name}] evaluating on {cfg.eval.suite} ...")
            spec = EvalSpec.from_config(
                cfg.eval,
                policy=str(r["trained"]["checkpoint"]),
                suite=cfg.eval.suite,
                tasks=cfg.eval.tasks,
                trials=eval_trials,
                workers=workers,
                out=c.eval_dir,
            )
            r["evaluated"] = evaluate(spec)
        write_results(Path(out), [_record(x) for x in rows])
    records = [_record(r) for r in rows]
    paths = write_results(Path(out), records)
    say(f"results: {paths[0]} and {paths[1].name}")
    return records


def _missing_inputs(cfg) -> list[str]:
    """data.path and data.annotations of a cell that do not exist (checked before any run)."""
    paths = [cfg.data.path] if cfg.data.path else []
    ann = cfg.data.annotations
    paths += [ann] if isinstance(ann, str) else list(ann or [])
    return [str(p) for p in paths if not Path(p).exists()]


def _missing_text(missing: dict[str, str]) -> str:
    listed = "; ".join(f"{p} (cell {cell})" for p, cell in missing.items())
    return (
        f"{len(missing)} input(s) of cells still to train do not exist: {listed}. Download or "
        "convert the data there, or point data.path / data.annotations at it (key=value "
        "overrides after CONFIG)."
    )


def _record(r: dict[str, Any]) -> dict[str, Any]:
    c = r["cell"]
    rec: dict[str, Any] = {
        "phase": c.phase,
        "subset": c.subset,
        "config": str(c.config_file),
        "run_dir": str(c.run_dir),
        "eval_dir": str(c.eval_dir),
        "trained": bool(r["trained"]),
        "steps": (r["trained"] or {}).get("steps"),
    }
    overall = (r["evaluated"] or {}).get("overall") if r["evaluated"] else None
    if overall:
        rec.update(
            success_rate=overall["success_rate"],
            ci95_low=overall["ci95_low"],
            ci95_high=overall["ci95_high"],
            trials=overall["trials"],
            successes=overall["successes"],
        )
    return rec


def _cell_text(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return ""
    if rec.get("success_rate") is not None:
        return (
            f"{100 * rec['success_rate']:.1f}% [{100 * rec['ci95_low']:.1f}, "
            f"{100 * rec['ci95_high']:.1f}] (n={rec['trials']})"
        )
    return "trained, not evaluated" if rec["trained"] else "not run"


def write_results(out: Path, records: list[dict[str, Any]]) -> tuple[Path, Path]:
    """results.md (phases x subsets, with links) and results.csv (one row per cell)."""
    out.mkdir(parents=True, exist_ok=True)
    phases = list(dict.fromkeys(r["phase"] for r in records))
    subsets = list(dict.fromkeys(r["subset"] for r in records))
    at = {(r["phase"], r["subset"]): r for r in records}
    lines = [
        "# Results",
        "",
        "Success rate over every task of the suite, Wilson 95% interval in brackets.",
        "",
        "| phase | " + " | ".join(subsets) + " |",
        "|---|" + "---|" * len(subsets),
    ]
    for p in phases:
        cells = []
        for s in subsets:
            rec = at.get((p, s))
            text = _cell_text(rec)
            if rec is not None:
                run = (
                    Path(rec["run_dir"]).relative_to(out)
                    if rec["run_dir"].startswith(str(out))
                    else rec["run_dir"]
                )
                text += f" ([run]({run})"
                if rec.get("success_rate") is not None:
                    ev = (
                        Path(rec["eval_dir"]).relative_to(out)
                        if rec["eval_dir"].startswith(str(out))
                        else rec["eval_dir"]
                    )
                    text += f", [eval]({ev}/results.json)"
                text += ")"
            cells.append(text)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    md = out / "results.md"
    write_text(md, "\n".join(lines) + "\n")
    fields = [
        "phase", "subset", "success_rate", "ci95_low", "ci95_high", "trials", "successes",
        "steps", "trained", "config", "run_dir", "eval_dir",
    ]  # fmt: skip
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow(r)
    csv_path = out / "results.csv"
    write_text(csv_path, buf.getvalue())
    write_json(out / "results.json", {"cells": records})
    return md, csv_path

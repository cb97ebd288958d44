"""Evaluation results: success rates with 95% Wilson intervals, per task, per suite, overall.

Episodes that ended in an error (a crashed worker, twice) are counted apart, never as failures:
rates are over finished episodes, and the error count is printed next to them.

    >>> wilson(45, 50)   # (0.7864..., 0.9565...)
    >>> summary = summarize(episodes); write_results(out_dir, summary, meta)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (0, 1) bounds; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _row(name: str, eps: list[dict[str, Any]]) -> dict[str, Any]:
    done = [e for e in eps if e.get("error") is None]
    k = sum(1 for e in done if e["success"])
    lo, hi = wilson(k, len(done))
    return {
        "name": name,
        "trials": len(done),
        "successes": k,
        "success_rate": k / len(done) if done else None,
        "ci95_low": lo,
        "ci95_high": hi,
        "errors": len(eps) - len(done),
    }


def summarize(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[tuple[str, int], list[dict[str, Any]]] = {}
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for e in episodes:
        by_task.setdefault((e["suite"], e["task_id"]), []).append(e)
        by_suite.setdefault(e["suite"], []).append(e)
    tasks = []
    for (suite, tid), eps in sorted(by_task.items()):
        row = _row(f"{suite} task {tid}", eps)
        row.update(
            {
                "suite": suite,
                "task_id": tid,
                "task_name": eps[0]["task_name"],
                "instruction": eps[0]["instruction"],
            }
        )
        tasks.append(row)
    return {
        "tasks": tasks,
        "suites": [dict(_row(s, eps), suite=s) for s, eps in sorted(by_suite.items())],
        "overall": _row("overall", episodes),
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, summary: dict[str, Any], meta: dict[str, Any]) -> dict[str, Path]:
    """results.json, results.csv and success_rates.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps({**meta, **summary}, indent=2) + "\n")
    buf = io.StringIO()
    cols = [
        "level",
        "name",
        "instruction",
        "trials",
        "successes",
        "success_rate",
        "ci95_low",
        "ci95_high",
        "errors",
    ]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for level, rows in (
        ("task", summary["tasks"]),
        ("suite", summary["suites"]),
        ("overall", [summary["overall"]]),
    ):
        for r in rows:
            w.writerow({"level": level, "instruction": r.get("instruction", ""), **r})
    _atomic_write(out / "results.csv", buf.getvalue())
    plot = out / "success_rates.png"
    plot_success_rates(summary, plot)
    return {"json": out / "results.json", "csv": out / "results.csv", "plot": plot}


def plot_success_rates(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["tasks"] if r["trials"]]
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(rows) + 2), 3.5))
    xs = range(len(rows))
    rates = [100 * r["success_rate"] for r in rows]
    lo = [100 * (r["success_rate"] - r["ci95_low"]) for r in rows]
    hi = [100 * (r["ci95_high"] - r["success_rate"]) for r in rows]
    ax.bar(xs, rates, color="#4C72B0", yerr=[lo, hi], capsize=4, ecolor="#333333")
    ax.set_xticks(
        list(xs),
        [f"{r['suite'].replace('libero_', '')}\nt{r['task_id']}" for r in rows],
        fontsize=8,
    )
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate (%)")
    o = summary["overall"]
    if o["success_rate"] is not None:
        ax.set_title(
            f"overall {100 * o['success_rate']:.1f}% [{100 * o['ci95_low']:.1f}, {100 * o['ci95_high']:.1f}] (n={o['trials']}, 95% Wilson)",
            fontsize=9,
        )
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)

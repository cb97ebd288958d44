"""Evaluation results: success rates with 95% Wilson intervals, per task, per suite, overall.

Counting rule (also stored in results.json as `counting_rule`; docs/evaluation.md):
- every planned episode that has a record is a trial;
- an episode ends in *success*, *failure* or *error*. An exception raised by the policy (load,
  reset, predict) or by the simulator during the episode is a failure of that episode, recorded
  with its message and traceback. Only an episode whose worker process died twice (segfault,
  GL failure) or whose environment could not be built is an *error*;
- `success_rate` = successes / trials, errors counted as failures. When there are errors,
  `success_rate_finished` (successes / episodes that finished) is given next to it, never
  instead of it;
- fallbacks: each episode records the policy's fallback counters (queries answered by a
  fallback: undecodable tokens replaced by the safe action, clipped actions, ...) and its number
  of queries; rows sum them ("fallbacks: k of n queries").

    >>> wilson(45, 50)   # (0.7864..., 0.9565...)
    >>> summary = summarize(episodes); write_results(out_dir, summary, meta)
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from vlatune.fsutil import write_json

COUNTING_RULE = (
    "success_rate = successes / trials over every episode run; a policy or simulator exception "
    "inside an episode is a failure (message and traceback in episodes.jsonl); an episode whose "
    "worker crashed twice or whose environment could not be built is an error and is counted as "
    "a failure in success_rate; success_rate_finished = successes / (trials - errors) is given "
    "next to it when there are errors"
)
FALLBACK_WARN_FRACTION = 0.01  # warn when more than 1% of a row's queries took a fallback


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (0, 1) bounds; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def is_error(e: dict[str, Any]) -> bool:
    """An infrastructure error (no outcome), as opposed to a success or a failure."""
    return e.get("error") is not None or e.get("success") is None


def outcome(e: dict[str, Any]) -> str:
    if is_error(e):
        return "error"
    return "success" if e["success"] else "failure"


def _row(name: str, eps: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(eps)
    errors = sum(1 for e in eps if is_error(e))
    k = sum(1 for e in eps if not is_error(e) and e["success"])
    raised = sum(1 for e in eps if not is_error(e) and e.get("exception"))
    lo, hi = wilson(k, n)
    finished = n - errors
    fallbacks: dict[str, int] = {}
    for e in eps:
        for key, v in (e.get("fallbacks") or {}).items():
            fallbacks[key] = fallbacks.get(key, 0) + int(v)
    return {
        "name": name,
        "trials": n,
        "successes": k,
        "failures": finished - k,
        "errors": errors,
        "success_rate": k / n if n else None,
        "ci95_low": lo,
        "ci95_high": hi,
        "success_rate_finished": (k / finished if finished else None) if errors else None,
        "policy_exceptions": raised,
        "queries": sum(int(e.get("queries") or 0) for e in eps),
        "fallback_queries": sum(fallbacks.values()),
        "fallbacks": fallbacks,
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
        named = next((e for e in eps if e.get("task_name")), eps[0])
        row.update(
            {
                "suite": suite,
                "task_id": tid,
                "task_name": named.get("task_name"),
                "instruction": named.get("instruction"),
            }
        )
        tasks.append(row)
    return {
        "counting_rule": COUNTING_RULE,
        "tasks": tasks,
        "suites": [dict(_row(s, eps), suite=s) for s, eps in sorted(by_suite.items())],
        "overall": _row("overall", episodes),
    }


def headline(row: dict[str, Any]) -> str:
    """`12/20 (60.0%, 95% CI [38.7, 78.1]%)`, with the errors and the rate over finished
    episodes next to it when there are errors."""
    n, k = row["trials"], row["successes"]
    if not n:
        return "no trials"
    text = (
        f"{k}/{n} ({100 * row['success_rate']:.1f}%, 95% CI "
        f"[{100 * row['ci95_low']:.1f}, {100 * row['ci95_high']:.1f}]%)"
    )
    if row["errors"]:
        fin = row["success_rate_finished"]
        text += (
            f"; {row['errors']} error(s) counted as failures (over the "
            f"{n - row['errors']} finished episodes: "
            f"{'-' if fin is None else f'{100 * fin:.1f}%'})"
        )
    return text


def fallback_text(row: dict[str, Any]) -> str:
    """`fallbacks: 3 of 120 queries (undecodable_tokens 3)`."""
    detail = ", ".join(f"{k} {v}" for k, v in sorted(row["fallbacks"].items()) if v)
    return f"fallbacks: {row['fallback_queries']} of {row['queries']} queries" + (
        f" ({detail})" if detail else ""
    )


def warnings_for(summary: dict[str, Any]) -> list[str]:
    """Lines a console should print above the table: errors, policy exceptions, fallbacks above
    1% of a task's queries."""
    out = []
    o = summary["overall"]
    if o["errors"]:
        fin = o["success_rate_finished"]
        out.append(
            f"{o['errors']} of {o['trials']} episodes ended in an error (worker crashed twice or "
            f"environment not built): counted as failures, success {100 * o['success_rate']:.1f}%; "
            f"over the {o['trials'] - o['errors']} finished episodes "
            f"{'-' if fin is None else f'{100 * fin:.1f}%'} (see episodes.jsonl)"
        )
    if o["policy_exceptions"]:
        out.append(
            f"the policy raised in {o['policy_exceptions']} episode(s): counted as failures "
            "(message and traceback in episodes.jsonl)"
        )
    for r in summary["tasks"]:
        if r["queries"] and r["fallback_queries"] > FALLBACK_WARN_FRACTION * r["queries"]:
            out.append(f"{r['name']}: {fallback_text(r)}, above 1% of its queries")
    return out


CSV_COLUMNS = [
    "level",
    "name",
    "instruction",
    "trials",
    "successes",
    "failures",
    "errors",
    "success_rate",
    "ci95_low",
    "ci95_high",
    "success_rate_finished",
    "policy_exceptions",
    "queries",
    "fallback_queries",
    "fallbacks",
]


def write_results(out: Path, summary: dict[str, Any], meta: dict[str, Any]) -> dict[str, Path]:
    """results.json, results.csv and success_rates.png in `out` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {**meta, **summary})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for level, rows in (
        ("task", summary["tasks"]),
        ("suite", summary["suites"]),
        ("overall", [summary["overall"]]),
    ):
        for r in rows:
            w.writerow(
                {
                    **r,
                    "level": level,
                    "instruction": r.get("instruction") or "",
                    "fallbacks": ";".join(f"{k}={v}" for k, v in sorted(r["fallbacks"].items())),
                }
            )
    _atomic_text(out / "results.csv", buf.getvalue())
    plot = out / "success_rates.png"
    plot_success_rates(summary, plot)
    return {"json": out / "results.json", "csv": out / "results.csv", "plot": plot}


def _atomic_text(path: Path, text: str) -> None:
    from vlatune.fsutil import write_text

    write_text(path, text)


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
        errors = f", {o['errors']} errors as failures" if o["errors"] else ""
        ax.set_title(
            f"overall {100 * o['success_rate']:.1f}% [{100 * o['ci95_low']:.1f}, "
            f"{100 * o['ci95_high']:.1f}] (n={o['trials']}{errors}, 95% Wilson)",
            fontsize=9,
        )
    fig.tight_layout()
    from vlatune.fsutil import atomic_file

    with atomic_file(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)

"""Helpers shared by the released families' recipe tests (tests/test_<family>_recipes.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def one_libero_episode(
    policy: Path,
    out: Path,
    max_steps: int,
    replan: int,
    resolution: int = 64,
    video: str = "none",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one libero_object task-0 episode of `policy` (a trained checkpoint) through the
    `vlatune eval` runner; returns (the episode record, the summary). The episode must run its
    `max_steps` without a policy exception (a tiny random policy does not succeed)."""
    from vlatune.eval.runner import EvalSpec, evaluate, read_episodes

    spec = EvalSpec(
        policy=str(policy),
        suite="libero_object",
        tasks=[0],
        trials=1,
        max_steps=max_steps,
        replan=replan,
        resolution=resolution,
        video=video,
        out=Path(out),
    )
    summary = evaluate(spec)
    (episode,) = read_episodes(Path(out) / "episodes.jsonl")
    assert episode.get("exception") is None, episode["exception"]
    assert episode["steps"] == max_steps, episode
    assert summary["overall"]["trials"] == 1
    return episode, summary

"""Helpers shared by the released families' recipe tests (tests/test_<family>_recipes.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the overrides that make a released recipe a 2-step CPU run on the tiny dataset
TINY_RUN_OVERRIDES = (
    "data.batch_size=2",
    "data.num_workers=0",
    "data.val_fraction=0",
    "policy.dtype=float32",
    "train.mixed_precision=no",
    "train.max_steps=2",
    "train.save_every=2",
    "train.log_every=1",
    "train.val_every=null",
)


def tiny_libero_data(root: Path) -> Path:
    """The recipe tests' LIBERO HDF5 dataset: 2 demos of 10 steps, 32 px images, in root/data."""
    from data_fixtures import make_libero_hdf5

    return make_libero_hdf5(Path(root) / "data", demos=2, T=10, res=32)


def tiny_run_config(recipe: Path, data: Path, pretrained: Path, out: Path, *extra: str):
    """The recipe file `recipe` on `data`, from `pretrained`, writing to `out`, shrunk to a tiny
    run (TINY_RUN_OVERRIDES); `extra` overrides come last (they win)."""
    from vlatune.config import load_config

    return load_config(
        recipe,
        [
            f"data.path={data}",
            f"policy.pretrained={pretrained}",
            *TINY_RUN_OVERRIDES,
            f"train.output_dir={out}",
            *extra,
        ],
    )


def train_config(cfg) -> dict[str, Any]:
    """`vlatune train` on `cfg` without the progress bar; its summary."""
    from vlatune.train.trainer import train

    return train(cfg, progress=False)


def data_stats(data: Path) -> dict[str, Any]:
    """vlatune's statistics of the dataset at `data`."""
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats

    return dataset_stats(open_dataset(data))


def random_observation(
    cameras: tuple[str, ...] | list[str],
    seed: int = 0,
    res: int = 32,
    instruction: str = "pick up the alphabet soup and place it in the basket",
) -> dict[str, Any]:
    """An evaluation observation (`vlatune.keys`) of random uint8 images and an 8-d state."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 255, (res, res, 3), dtype=np.uint8) for c in cameras},
        "state": rng.normal(size=8),
        "instruction": instruction,
    }


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

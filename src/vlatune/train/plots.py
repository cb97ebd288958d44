"""Curves of a training run from its metrics.jsonl: losses (train and validation) and lr.

Series with identical values (a head's `l1` that is also its `action_loss` and the total
`loss`) are drawn once, labelled with every name (`loss = action_loss = l1`), so the legend
matches the lines. A run with fewer than 3 logged steps is drawn with markers and warned about
(`plot_warnings`): a single point on empty axes says nothing.

>>> plot_run(Path("runs/demo"), Path("runs/demo"))   # [loss.png, lr.png]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("vlatune")

MIN_POINTS = 3


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run folder?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


def plot_warnings(rows: list[dict], run_dir: Path) -> list[str]:
    """Why the curves of `rows` (metrics.jsonl) may say little; empty when they are fine."""
    steps = sorted({r["step"] for r in rows if "step" in r and r.get("loss") is not None})
    if len(steps) >= MIN_POINTS:
        return []
    every = _log_every(run_dir)
    where = f" (step {', '.join(map(str, steps))})" if steps else ""
    return [
        f"{Path(run_dir) / 'metrics.jsonl'} has {len(steps)} logged training step(s){where}: "
        f"the curves are {'single points' if len(steps) == 1 else 'nearly empty'}. Train longer "
        f"or log more often (train.log_every=N{f', now {every}' if every else ''})."
    ]


def _log_every(run_dir: Path) -> int | None:
    try:
        import yaml

        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        return int(cfg["train"]["log_every"])
    except Exception:  # no config.yaml (a copied metrics file): the hint goes without the value
        return None


def loss_series(rows: list[dict]) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, points) per distinct loss series; identical series share one label."""
    keys = sorted(
        {k for r in rows for k in r if (k.endswith("loss") or k.endswith("mse") or k == "l1")},
        key=lambda k: (k != "loss", k.startswith("val_"), k),
    )
    groups: list[tuple[list[str], list[tuple[int, float]]]] = []
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if not pts:
            continue
        for names, other in groups:
            if other == pts:
                names.append(k)
                break
        else:
            groups.append(([k], pts))
    return [(" = ".join(names), pts) for names, pts in groups]


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = loss_series(rows)
    if not series:
        raise ValueError(f"{run_dir}/metrics.jsonl has no loss rows yet")
    for w in plot_warnings(rows, run_dir):
        log.warning("warning: %s", w)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series:
        few = len(pts) < MIN_POINTS or label.startswith("val_")
        ax.plot(*zip(*pts, strict=True), label=label, marker="o" if few else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    loss_png = out_dir / "loss.png"
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    for k in ("lr", "lr_energy"):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k, marker="o" if len(pts) < MIN_POINTS else None)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    lr_png = out_dir / "lr.png"
    fig.savefig(lr_png, dpi=100)
    plt.close(fig)
    return [loss_png, lr_png]

"""Curves of a training run from its metrics.jsonl: losses (train and validation) and lr.

>>> plot_run(Path("runs/demo"), Path("runs/demo"))   # [loss.png, lr.png]
"""

from __future__ import annotations

import json
from pathlib import Path


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


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_keys = sorted(
        {k for r in rows for k in r if (k.endswith("loss") or k.endswith("mse") or k == "l1")}
    )
    if not loss_keys:
        raise ValueError(f"{run_dir}/metrics.jsonl has no loss rows yet")
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k, marker="o" if k.startswith("val_") else None)
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
            ax.plot(*zip(*pts, strict=True), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    lr_png = out_dir / "lr.png"
    fig.savefig(lr_png, dpi=100)
    plt.close(fig)
    return [loss_png, lr_png]

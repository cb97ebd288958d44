"""`vlatune annotate show`: one frame (upright) with its reasoning beside it, as a PNG; gripper
points and object boxes are drawn when the annotation has them (pixels of the upright frame)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np


def render_annotation(
    annotations: Path, dataset: Path, episode: int, frame: int, camera: str | None, out: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlatune.conventions import to_upright
    from vlatune.data import open_dataset
    from vlatune.data.annotations import load_annotations

    rows = load_annotations(annotations)
    entry = rows.get((episode, frame))
    if entry is None or "reasoning" not in entry:
        raise KeyError(f"{annotations}: no reasoning for episode {episode} frame {frame}")
    with open_dataset(dataset) as ds:
        cam = camera or ds.info.cameras[0]
        e = ds.load_episode(episode, cameras=[cam])
        if frame >= len(e.actions):
            raise IndexError(f"episode {episode} has {len(e.actions)} frames; asked for {frame}")
        image = np.asarray(e.images[cam][frame])
        if ds.info.image_orientation != "upright":
            image = to_upright(image)
    tags = entry["reasoning"]
    fig, (ax_img, ax_txt) = plt.subplots(
        1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.4]}
    )
    ax_img.imshow(image)
    ax_img.set_title(f"episode {episode}, frame {frame} ({cam})")
    ax_img.axis("off")
    if "GRIPPER POSITION" in tags:
        pts = np.asarray(ast.literal_eval(tags["GRIPPER POSITION"]), dtype=float).reshape(-1, 2)
        ax_img.plot(pts[:, 0], pts[:, 1], "o-", color="yellow", markersize=4)
    for name, box in re.findall(
        r"([\w ]+?) \[(\d+, \d+, \d+, \d+)\]", tags.get("VISIBLE OBJECTS", "")
    ):
        x0, y0, x1, y1 = map(int, box.split(","))
        ax_img.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="cyan"))
        ax_img.text(x0, y0, name.strip(), color="cyan", fontsize=7)
    text = "\n".join(f"{k}: {v}" for k, v in tags.items())
    ax_txt.text(0, 1, text, va="top", ha="left", wrap=True, fontsize=8, family="monospace")
    ax_txt.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out

"""`vlatune annotate flow-vq`: train the flow VQ-VAE, then tokenise every frame's flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vlatune.fsutil import write_json


def run_flow_vq(
    source: Path,
    out_dir: Path,
    codebook: int = 512,
    steps: int = 2000,
    batch: int = 64,
    seed: int = 0,
    progress_factory=None,
) -> dict:
    from vlatune.data.annotations import write_annotations
    from vlatune.reasoning.flow import dataset_flows, load_flows
    from vlatune.reasoning.vq import VQConfig, train_flow_vq

    source = Path(source)
    if not (source / "flows.h5").is_file() and not source.name.endswith(".h5"):
        # a dataset: compute its flows first (DIS, k = 4, 64 px) into OUT/flows
        from vlatune.data import open_dataset

        with open_dataset(source) as reader:
            source = dataset_flows(reader, Path(out_dir) / "flows")
    flows = load_flows(source)
    if not flows:
        raise ValueError(f"{source}: no episodes in the flow file")
    episodes = sorted(flows)
    stacked = np.concatenate([flows[e] for e in episodes])
    size = stacked.shape[1]
    cfg = VQConfig(codebook=codebook, size=size)
    if progress_factory is not None:
        bar, tick = progress_factory(steps)
        with bar:
            model, report = train_flow_vq(
                stacked, cfg, steps, batch, seed=seed, progress=lambda i, n: tick(i - 1)
            )
    else:
        model, report = train_flow_vq(stacked, cfg, steps, batch, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "vq")
    frames = []
    with torch.no_grad():
        for ep in episodes:
            x = torch.from_numpy(flows[ep]).permute(0, 3, 1, 2).contiguous()
            codes = torch.cat([model.encode(x[i : i + 256]) for i in range(0, len(x), 256)])
            frames += [
                {"episode": ep, "frame": t, "flow_tokens": c.tolist()} for t, c in enumerate(codes)
            ]
    write_annotations(
        out_dir / "flow_tokens.json",
        frames,
        annotator="flow-vq",
        model=str(out_dir / "vq"),
        codebook=codebook,
        tokens_per_frame=len(frames[0]["flow_tokens"]),
        source=str(source),
    )
    write_json(out_dir / "report.json", report)
    _picture(model, flows, episodes, source, out_dir / "flow_vq.png")
    return report


def _frames(source: Path, picks: list[tuple[int, int]]) -> list[np.ndarray] | None:
    """The camera frames the flows came from, when the dataset is still where it was."""
    from vlatune.conventions import to_upright
    from vlatune.reasoning.flow import flows_source

    dataset, camera = flows_source(source)
    if not dataset or not Path(dataset).exists():
        return None
    from vlatune.data import open_dataset

    with open_dataset(dataset) as reader:
        out = []
        for ep, t in picks:
            img = np.asarray(reader.load_episode(ep, cameras=[camera]).images[camera][t])
            out.append(img if reader.info.image_orientation == "upright" else to_upright(img))
    return out


def _picture(model, flows: dict, episodes: list[int], source: Path, out: Path, n: int = 4) -> None:
    """Frame, flow (HSV) and its VQ reconstruction for n frames spread over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlatune.reasoning.flow import flow_to_rgb

    index = [(ep, t) for ep in episodes for t in range(len(flows[ep]))]
    picks = [index[i] for i in np.linspace(0, len(index) - 1, n).astype(int)]
    sel = np.stack([flows[ep][t] for ep, t in picks])
    x = torch.from_numpy(sel).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        recon = model.decode(model.encode(x)).permute(0, 2, 3, 1).numpy()
    frames = _frames(source, picks)
    rows = 3 if frames is not None else 2
    fig, axes = plt.subplots(rows, n, figsize=(2.4 * n, 2.5 * rows))
    labels = (["frame"] if frames is not None else []) + ["flow", "VQ"]
    for j in range(n):
        top = max(float(np.linalg.norm(sel[j], axis=-1).max()), 1e-6)
        panels = ([frames[j]] if frames is not None else []) + [
            flow_to_rgb(sel[j], top),
            flow_to_rgb(recon[j], top),
        ]
        for i, img in enumerate(panels):
            axes[i, j].imshow(img)
            axes[i, j].axis("off")
        axes[0, j].set_title(f"episode {picks[j][0]} frame {picks[j][1]}", fontsize=8)
    for i, label in enumerate(labels):
        axes[i, 0].text(-0.1, 0.5, label, transform=axes[i, 0].transAxes, rotation=90, va="center")
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)


def read_report(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text())

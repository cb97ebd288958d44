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
    from vlatune.reasoning.flow import load_flows
    from vlatune.reasoning.vq import VQConfig, train_flow_vq

    flows = load_flows(Path(source))
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
    _picture(model, stacked, out_dir / "flow_vq.png")
    return report


def _picture(model, flows: np.ndarray, out: Path, n: int = 4) -> None:
    """Flow (HSV) beside its VQ reconstruction for n frames spread over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlatune.reasoning.flow import flow_to_rgb

    picks = np.linspace(0, len(flows) - 1, n).astype(int)
    x = torch.from_numpy(flows[picks]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        recon = model.decode(model.encode(x)).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 5))
    for j in range(n):
        top = max(float(np.linalg.norm(flows[picks[j]], axis=-1).max()), 1e-6)
        axes[0, j].imshow(flow_to_rgb(flows[picks[j]], top))
        axes[1, j].imshow(flow_to_rgb(recon[j], top))
        axes[0, j].set_title(f"frame {picks[j]}", fontsize=8)
        for a in axes[:, j]:
            a.axis("off")
    axes[0, 0].text(-0.1, 0.5, "flow", transform=axes[0, 0].transAxes, rotation=90, va="center")
    axes[1, 0].text(-0.1, 0.5, "VQ", transform=axes[1, 0].transAxes, rotation=90, va="center")
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)


def read_report(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text())

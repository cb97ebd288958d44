"""Optical-flow tokens: flow frames/s per backend on real LIBERO frames, and the flow VQ-VAE's
reconstruction end-point error (EPE) and codebook perplexity.

Frames come from a dataset vlatune reads (default: the demo's scripted LIBERO demonstrations,
agentview). Flows t -> t + 4 at the frames' resolution; the VQ-VAE is trained on 64 px flows of
80% of the episodes and measured on the other 20%.

    $ .venv/bin/python benchmarks/flow.py [--data outputs/demo/data/libero_hdf5] [--steps 1500]

Prints a table and writes benchmarks/results/flow.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlatune.conventions import to_upright  # noqa: E402
from vlatune.data import open_dataset  # noqa: E402
from vlatune.reasoning.flow import compute_flow, resize_flow  # noqa: E402
from vlatune.reasoning.vq import VQConfig, train_flow_vq  # noqa: E402
from vlatune.versions import version_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("outputs/demo/data/libero_hdf5"))
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flow.json")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(
            f"{args.data} does not exist: run `vlatune demo` (or sim synth) first, or pass --data"
        )
    with open_dataset(args.data) as reader:
        cam = reader.info.cameras[0]
        videos = []
        for i in range(min(args.episodes, len(reader))):
            frames = np.asarray(reader.load_episode(i, cameras=[cam]).images[cam])
            videos.append(
                frames if reader.info.image_orientation == "upright" else to_upright(frames)
            )
    res = videos[0].shape[1]
    backends = []
    flows_by_episode = []
    for backend in ("dis", "farneback", "raft"):
        pairs = [(v[t], v[min(t + 4, len(v) - 1)]) for v in videos[:2] for t in range(0, len(v), 4)]
        try:
            t0 = time.perf_counter()
            for a, b in pairs:
                compute_flow(a, b, backend)
            fps = len(pairs) / (time.perf_counter() - t0)
            backends.append({"backend": backend, "frames_per_s": round(fps, 1), "resolution": res})
        except ImportError as e:
            backends.append(
                {"backend": backend, "frames_per_s": None, "note": str(e).split(";")[0]}
            )
    for v in videos:
        flows_by_episode.append(
            np.stack(
                [
                    resize_flow(compute_flow(v[t], v[min(t + 4, len(v) - 1)]), 64)
                    for t in range(len(v))
                ]
            )
        )
    n_fit = max(1, int(0.8 * len(flows_by_episode)))
    fit, held = (
        np.concatenate(flows_by_episode[:n_fit]),
        np.concatenate(flows_by_episode[n_fit:] or flows_by_episode[-1:]),
    )
    t0 = time.perf_counter()
    cfg = VQConfig(codebook=args.codebook)
    model, report = train_flow_vq(fit, cfg, steps=args.steps, batch=64)
    train_s = time.perf_counter() - t0
    import torch

    x = torch.from_numpy(held).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = model.eval()(x)
    vq = {
        "train_frames": len(fit),
        "held_out_frames": len(held),
        "steps": args.steps,
        "train_s": round(train_s, 1),
        "train": report["after"],
        "held_out_epe_px": round(float(out["epe"]), 4),
        "held_out_zero_flow_epe_px": round(float(x.norm(dim=1).mean()), 4),
        "held_out_perplexity": round(float(out["perplexity"]), 2),
        "codebook": args.codebook,
        "tokens_per_frame": 64,
    }
    print(f"{'backend':10} {'frames/s':>9}  ({res} px, {cam})")
    for b in backends:
        print(
            f"{b['backend']:10} {b['frames_per_s'] if b['frames_per_s'] is not None else 'n/a':>9}  {b.get('note', '')}"
        )
    print(
        f"VQ-VAE {args.codebook} codes: held-out EPE {vq['held_out_epe_px']} px (zero flow "
        f"{vq['held_out_zero_flow_epe_px']} px), perplexity {vq['held_out_perplexity']}, "
        f"usage {report['after']['codebook_usage']:.0%} ({train_s:.0f} s training)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"data": str(args.data), "flow": backends, "vq": vq, "versions": version_block()},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

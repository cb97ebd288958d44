"""Training throughput: samples/s and peak memory per head at tiny and small sizes.

Times forward + backward + AdamW step of the policy on a fixed in-memory batch (data loading is
measured apart by data_loading.py), on CPU here and on a GPU when one is available.

    $ .venv/bin/python benchmarks/train_throughput.py [--steps 10]

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlatune.config import Config  # noqa: E402
from vlatune.policies import build_policy  # noqa: E402
from vlatune.versions import version_block  # noqa: E402

SIZES = {
    # name: (image size, cameras, tiny dim, layers, batch)
    "tiny": (64, ["agentview"], 64, 2, 16),
    "small": (128, ["agentview", "wrist"], 128, 3, 32),
}
STATS = {
    "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7},
    "state": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
}


def measure(head: str, size: str, steps: int, device: str) -> dict:
    res, cams, dim, layers, B = SIZES[size]
    cfg = Config.model_validate(
        {
            "data": {"image_size": res, "cameras": cams, "action_horizon": 8},
            "policy": {"head": head, "tiny": {"dim": dim, "layers": layers}},
        }
    )
    policy = build_policy(cfg, STATS).to(device)
    batch = {
        "images": {
            c: torch.randint(0, 255, (B, 3, res, res), dtype=torch.uint8, device=device)
            for c in cams
        },
        "image_mask": torch.ones(B, len(cams), dtype=torch.bool, device=device),
        "state": torch.randn(B, 8, device=device),
        "actions": torch.rand(B, 8, 7, device=device) * 2 - 1,
        "action_mask": torch.ones(B, 8, dtype=torch.bool, device=device),
        "instruction": ["pick up the alphabet soup and place it in the basket"] * B,
    }
    opt = torch.optim.AdamW(policy.parameters(), 1e-4)

    def step():
        loss = policy(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    mem = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "head": head,
        "size": size,
        "device": device,
        "batch": B,
        "image_size": res,
        "cameras": len(cams),
        "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
        "step_s": round(dt, 4),
        "samples_per_s": round(B / dt, 1),
        "peak_memory_mb": round(mem, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json"
    )
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [
        measure(h, s, args.steps, d)
        for d in devices
        for s in SIZES
        for h in ("l1", "diffusion", "flow")
    ]
    print(
        f"{'device':6} {'size':6} {'head':10} {'params M':>8} {'step s':>8} {'samples/s':>10} {'peak MB':>8}"
    )
    for r in rows:
        print(
            f"{r['device']:6} {r['size']:6} {r['head']:10} {r['params_m']:8.2f} {r['step_s']:8.3f} "
            f"{r['samples_per_s']:10.1f} {r['peak_memory_mb']:8.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"versions": version_block(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

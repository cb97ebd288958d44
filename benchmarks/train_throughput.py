"""Training throughput per recipe: samples/s and peak memory at tiny and small sizes.

Each recipe in configs/ is loaded as is, with its pretrained parts replaced by random-weight
models of the same architecture built from configs (no hub here): `tiny` as in the tests
(Qwen2.5-VL hidden 64 / 2 layers, SigLIP 32 px, T5 d 32), `small` (Qwen2.5-VL hidden 256 /
4 layers, SigLIP 64 px hidden 128, T5 d 128). Times forward + backward + AdamW step on a fixed
in-memory batch (data loading is measured by data_loading.py); each measurement runs in its own
process so the peak RSS is its own. On a GPU the same runs go to CUDA; pass --model-id to time
a real checkpoint you have locally.

    $ .venv/bin/python benchmarks/train_throughput.py [--steps 5] [--recipes nora/baseline,oft/l1]

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RECIPES = [
    "demo/tiny",
    "nora/baseline",
    "nora/text_cot",
    "oft/l1",
    "oft/diffusion",
    "oft/l1_energy",
    "flow/pi0_style",
    "flow/groot_style",
    "rdt/diffusion_transformer",
]
SIZES = {
    # image px, batch, qwen (hidden, layers), siglip (hidden, layers, px), t5 d, head width
    "tiny": (56, 8, (64, 2), (32, 1, 32), 32, 64),
    "small": (112, 8, (256, 4), (128, 2, 64), 128, 256),
}
STATS = {
    "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7},
    "state": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
}


def _models(size: str, root: Path) -> dict[str, Path]:
    from hf_fixtures import tiny_qwen2_5_vl, tiny_siglip_vision, tiny_t5_encoder

    _, _, (qh, ql), (sh, sl, spx), td, _ = SIZES[size]
    return {
        "qwen": tiny_qwen2_5_vl(root / "qwen", hidden=qh, layers=ql),
        "siglip": tiny_siglip_vision(root / "siglip", hidden=sh, layers=sl, image_size=spx),
        "t5": tiny_t5_encoder(root / "t5", d_model=td),
    }


def measure(recipe: str, size: str, steps: int, device: str, model_id: str | None, out) -> None:
    import numpy as np
    import torch

    from vlatune.config import load_config
    from vlatune.policies import build_policy

    res, B, _, _, _, width = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(ROOT / "configs" / f"{recipe}.yaml")
        if base.policy.backbone == "tiny":
            res = max(res, 64)  # the tiny conv net needs 16 px per token side
        over = [
            f"data.image_size={res}",
            "data.cameras=[agentview,wrist]"
            if len(base.data.cameras) > 1
            else "data.cameras=[agentview]",
        ]
        if base.policy.backbone != "tiny":
            models = _models(size, Path(tmp))
            over += [
                "policy.dtype=float32",
                "policy.action_tokenizer_path=null",
                "policy.fast_vocab=256",
            ]
            over += [
                f"policy.heads.expert_dim={width}",
                f"policy.heads.mlp_dim={width}",
                f"policy.energy.hidden={width}",
            ]
            if base.policy.backbone == "hf-vlm":
                over.append(f"policy.model_id={model_id or models['qwen']}")
            else:
                over += [
                    f"policy.model_id={models['siglip']}",
                    f"policy.rdt.text_model_id={models['t5']}",
                    f"policy.rdt.dim={width}",
                    f"policy.rdt.language_cache={tmp}/lang",
                    "policy.heads.expert_layers=2",
                ]
        cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", over)
        H = cfg.data.action_horizon
        rng = np.random.default_rng(0)

        def chunks():
            return [np.clip(np.cumsum(rng.normal(0, 0.2, (H, 7)), 0), -1, 1) for _ in range(500)]

        torch.manual_seed(0)
        policy = build_policy(cfg, STATS, chunks=chunks).to(device)
        cams = cfg.data.cameras
        batch = {
            "images": {
                c: torch.randint(0, 255, (B, 3, res, res), dtype=torch.uint8, device=device)
                for c in cams
            },
            "image_mask": torch.ones(B, len(cams), dtype=torch.bool, device=device),
            "state": torch.randn(B, 8, device=device),
            "actions": torch.rand(B, H, 7, device=device) * 2 - 1,
            "action_mask": torch.ones(B, H, dtype=torch.bool, device=device),
            "instruction": ["pick up the alphabet soup and place it in the basket"] * B,
        }
        if cfg.policy.reasoning.enabled:
            batch["reasoning"] = [{"PLAN": "reach the soup", "MOVE": "move left"}] * B
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, 1e-4)

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
        out.put(
            {
                "recipe": recipe,
                "size": size,
                "device": device,
                "backbone": cfg.policy.backbone,
                "head": cfg.policy.head,
                "lora": cfg.policy.lora is not None,
                "batch": B,
                "image_size": res,
                "cameras": len(cams),
                "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
                "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
                "step_s": round(dt, 4),
                "samples_per_s": round(B / dt, 1),
                "peak_memory_mb": round(mem, 1),
            }
        )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--model-id", default=None, help="a local hf-vlm checkpoint to time instead")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json"
    )
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ctx = mp.get_context("spawn")
    rows = []
    for d in devices:
        for size in args.sizes.split(","):
            for recipe in args.recipes.split(","):
                q = ctx.Queue()
                p = ctx.Process(
                    target=measure, args=(recipe, size, args.steps, d, args.model_id, q)
                )
                p.start()
                p.join()
                if p.exitcode != 0:
                    print(f"{recipe} {size} {d}: failed (exit {p.exitcode})")
                    continue
                rows.append(q.get())
    from vlatune.versions import version_block

    print(
        f"{'device':6} {'size':6} {'recipe':28} {'params M':>8} {'train M':>8} {'step s':>8} {'samples/s':>10} {'peak MB':>8}"
    )
    for r in rows:
        print(
            f"{r['device']:6} {r['size']:6} {r['recipe']:28} {r['params_m']:8.2f} {r['trainable_m']:8.2f} "
            f"{r['step_s']:8.3f} {r['samples_per_s']:10.1f} {r['peak_memory_mb']:8.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"versions": version_block(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

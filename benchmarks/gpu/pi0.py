"""pi0 / pi0.5 on one GPU: bf16 training step (full and LoRA) and chunk sampling latency.

The released configuration (`released_config(variant)`: PaliGemma 3B + Gemma 300M expert,
3,238,048,528 parameters used for pi0, 3,353,433,872 for pi0.5) with random weights (no hub
needed), fed model-level inputs of the released sizes: `--cameras` 224 px images, 48 (pi0) / 200
(pi0.5) prompt tokens, the 32-d padded state and a 50-step chunk of 32-d actions.
- full: fp32 master weights, `torch.autocast` bfloat16, AdamW (lr 2e-5, weight decay 0, the
  LIBERO recipe), `--steps` timed steps after `--warmup`: step time (median), samples/s, peak memory.
- lora: the base in LeRobot's bf16 layout (`set_precision("bfloat16")`: vision, projector and
  norms stay float32), peft adapters rank `--lora-rank` on q/k/v/o of both stacks and on the
  state / action projections, everything else frozen; AdamW lr 5e-4; same measurements.
- sample: batch 1, bf16 weights, 10 Euler steps with the prefix KV cache, median latency of
  `--sample-runs` calls after three warm-up calls; eager PyTorch, or with `--compile` the
  per-step expert pass under torch.compile's CUDA graphs (`mode="reduce-overhead"`).
Sized to finish well within 10 minutes on one H200. `--tiny` runs the same code at a reduced size
on the CPU (the test suite does, so the script is known to work before a GPU is lent).

    $ .venv/bin/python benchmarks/gpu/pi0.py --out benchmarks/results/gpu_pi0.json
    $ .venv/bin/python benchmarks/gpu/pi0.py --tiny --out /tmp/pi0_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from vlatune.fsutil import write_json  # noqa: E402
from vlatune.policies.pi0.configuration import GemmaSpec, Pi0Config, VisionSpec, released_config  # noqa: E402
from vlatune.policies.pi0.modeling import Pi0Model  # noqa: E402
from vlatune.policies.pi0.policy import Pi0Policy  # noqa: E402
from vlatune.versions import version_block  # noqa: E402


def tiny_config(variant: str) -> Pi0Config:
    return Pi0Config(
        variant=variant,
        vlm=GemmaSpec(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
        expert=GemmaSpec(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16),
        vision=VisionSpec(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        ),
        vocab_size=1024,
        image_size=56,
        chunk_size=8,
        n_action_steps=8,
        tokenizer_max_length=16,
    )


def make_batch(cfg: Pi0Config, bsz: int, cameras: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    s = cfg.image_size
    b = {
        "images": [torch.rand(bsz, 3, s, s, generator=g) * 2 - 1 for _ in range(cameras)],
        "img_masks": [torch.ones(bsz, dtype=torch.bool) for _ in range(cameras)],
        "tokens": torch.randint(0, cfg.vocab_size, (bsz, cfg.tokenizer_max_length), generator=g),
        "token_masks": torch.ones(bsz, cfg.tokenizer_max_length, dtype=torch.bool),
        "state": torch.randn(bsz, cfg.max_state_dim, generator=g),
        "actions": torch.randn(bsz, cfg.chunk_size, cfg.max_action_dim, generator=g),
    }
    return {
        k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
        for k, v in b.items()  # fmt: skip
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    )


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU (--tiny): float32, the code path is what is tested


def train(cfg: Pi0Config, mode: str, args, device: torch.device) -> dict:
    reset(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Pi0Model(cfg)
    policy = Pi0Policy(model)
    if mode == "lora":
        if device.type == "cuda":
            model.set_precision("bfloat16")
        policy.apply_lora(r=args.lora_rank, alpha=args.lora_rank, dropout=0.0)
        lr = 5e-4
    else:
        lr = 2e-5
    policy.to(device).train()
    build_s = time.perf_counter() - t0
    total, trainable = policy.num_parameters()
    opt = torch.optim.AdamW(policy.param_groups(lr=lr, weight_decay=0.0), lr=lr)
    batch = make_batch(cfg, args.batch, args.cameras, device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        with autocast(device):
            loss, _ = policy.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        opt.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    step = statistics.median(times)
    out = {
        "mode": mode,
        "batch": args.batch,
        "parameters": total,
        "trainable": trainable,
        "build_s": round(build_s, 2),
        "step_s_median": round(step, 4),
        "samples_per_s": round(args.batch / step, 2),
        "peak_memory_gib": peak_gib(device),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "finite": all(map(lambda x: x == x and abs(x) < float("inf"), losses)),
    }
    del policy, model, opt, batch
    reset(device)
    return out


def sample(cfg: Pi0Config, args, device: torch.device) -> dict:
    reset(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Pi0Model(cfg)
    if device.type == "cuda":
        model.set_precision("bfloat16")
    model.eval()
    if (
        args.compile
    ):  # CUDA graphs around the per-step expert pass (the launch-bound part at batch 1)
        model.velocity = torch.compile(model.velocity, mode="reduce-overhead")
    batch = make_batch(cfg, 1, args.cameras, device)
    state = batch["state"] if cfg.variant == "pi0" else None
    prefix_args = (batch["images"], batch["img_masks"], batch["tokens"], batch["token_masks"])
    times, prefix_times = [], []
    first_s = 0.0
    for i in range(3 + args.sample_runs):
        sync(device)
        t = time.perf_counter()
        with autocast(device):
            chunk = model.sample_actions(*prefix_args, state)
        sync(device)
        if i == 0:
            first_s = time.perf_counter() - t
        if i >= 3:
            times.append(time.perf_counter() - t)
            with torch.no_grad(), autocast(device):
                sync(device)
                t = time.perf_counter()
                model.prefix_cache(*prefix_args)
                sync(device)
                prefix_times.append(time.perf_counter() - t)
    out = {
        "batch": 1,
        "chunk": list(chunk.shape[1:]),
        "steps": cfg.num_inference_steps,
        "compiled": bool(args.compile),
        "first_call_s": round(first_s, 2),
        "latency_ms_median": round(1000 * statistics.median(times), 2),
        "latency_ms_min": round(1000 * min(times), 2),
        "prefix_ms_median": round(1000 * statistics.median(prefix_times), 2),
        "peak_memory_gib": peak_gib(device),
        "finite": bool(torch.isfinite(chunk).all()),
    }
    del model
    reset(device)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["pi0", "pi05"], choices=["pi0", "pi05"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-runs", type=int, default=20)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--modes", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile (CUDA graphs) the sampling step"
    )
    ap.add_argument("--tiny", action="store_true", help="reduced size on the CPU (tests)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "results" / "gpu_pi0.json"
    )
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.steps, args.warmup, args.sample_runs = 2, 2, 1, 2
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA device: this benchmark needs a GPU (use --tiny for the CPU smoke run)"
            )
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "versions": version_block(),
        "variants": {},
    }
    for variant in args.variants:
        cfg = tiny_config(variant) if args.tiny else released_config(variant)
        entry: dict = {}
        for mode in args.modes:
            entry[mode] = train(cfg, mode, args, device)
            print(variant, mode, entry[mode], flush=True)
        entry["sample"] = sample(cfg, args, device)
        print(variant, "sample", entry["sample"], flush=True)
        result["variants"][variant] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

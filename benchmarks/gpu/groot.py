"""GR00T N1.5 on one GPU: bf16 training step (full, LoRA, frozen backbone) and chunk latency.

The released configuration (`GrootConfig.released()`: SigLIP so400m/14 at 224 px, Qwen3-1.7B cut
at 12 layers, 16-layer DiT; 2,413,522,880 parameters) with random weights (no hub needed), fed
model-level inputs of the released sizes: `--cameras` images of 256 tokens each plus `--text`
prompt tokens, the 64-d padded state, a chunk of `action_horizon` 32-d actions, embodiment 31.
- full: every parameter trained (LLM included; the unused SigLIP pooling head and lm_head stay
  frozen), fp32 master weights, `torch.autocast` bfloat16, AdamW lr 2e-5 (the LIBERO recipe).
- frozen_backbone: the Eagle backbone frozen, the action head trained (GR00T's cheap fine-tune).
- lora: peft adapters rank `--lora-rank` on the LLM's q/k/v/o and SigLIP's q/k/v/out, the action
  head trained in full; AdamW lr 1e-4.
Each: `--steps` timed steps after `--warmup`: median step time, samples/s, peak memory.
- sample: batch 1, bf16 weights, 4 Euler steps (`num_inference_timesteps`; the backbone runs once,
  the DiT four times), median latency of `--sample-runs` calls after three warm-up calls; with
  `--compile` the DiT velocity under torch.compile. GR00T's own report: 47.9 ms per chunk on an
  H100 (N1.5, 4 steps).
Sized to finish within 10 minutes on one H200. `--tiny` runs the same code at a reduced size on
the CPU (the test suite does, so the script is known to work before a GPU is lent).

    $ .venv/bin/python benchmarks/gpu/groot.py --out benchmarks/results/gpu_groot.json
    $ .venv/bin/python benchmarks/gpu/groot.py --tiny --out /tmp/groot_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from vlatune.fsutil import write_json  # noqa: E402
from vlatune.policies.groot.configuration import (  # noqa: E402
    DEFAULT_EMBODIMENT_ID,
    RELEASED_CONFIG,
    RELEASED_EAGLE,
    GrootConfig,
)
from vlatune.policies.groot.convert import rebuild_buffers  # noqa: E402
from vlatune.policies.groot.modeling import GrootModel, count_parameters  # noqa: E402


def tiny_config() -> GrootConfig:
    raw, eagle = copy.deepcopy(RELEASED_CONFIG), copy.deepcopy(RELEASED_EAGLE)
    raw["backbone_cfg"]["select_layer"] = 2
    head = raw["action_head_cfg"]
    head.update(backbone_embedding_dim=64, hidden_size=48, input_embedding_dim=32)
    head["diffusion_model_cfg"].update(
        attention_head_dim=8,
        num_attention_heads=4,
        num_layers=2,
        output_dim=48,
        cross_attention_dim=64,
    )
    head["vl_self_attention_cfg"].update(attention_head_dim=8, num_attention_heads=8, num_layers=1)
    eagle["vision_config"].update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
    )
    eagle["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1024,
    )
    eagle.update(image_token_index=1000, force_image_size=56)
    return GrootConfig(raw, eagle, source="tiny")


def build(cfg: GrootConfig, device: torch.device) -> GrootModel:
    """Random weights without a CPU round trip: meta -> empty on `device` -> N(0, 0.02)."""
    with torch.device("meta"):
        model = GrootModel(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm scales
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    rebuild_buffers(model)
    return model


def make_batch(cfg: GrootConfig, bsz: int, cameras: int, text: int, device, actions: bool):
    g = torch.Generator().manual_seed(0)
    n_img, s, h = cfg.tokens_per_image, cfg.image_size, cfg.head
    seq = cameras * n_img + text
    ids = torch.randint(0, min(cfg.eagle.image_token_index, 1000), (bsz, seq), generator=g)
    ids[:, 1 : 1 + cameras * n_img] = cfg.eagle.image_token_index
    b = {
        "eagle_input_ids": ids,
        "eagle_attention_mask": torch.ones(bsz, seq, dtype=torch.long),
        "eagle_pixel_values": torch.rand(bsz * cameras, 3, s, s, generator=g) * 2 - 1,
        "state": torch.randn(bsz, 1, h.max_state_dim, generator=g),
        "embodiment_id": torch.full((bsz,), DEFAULT_EMBODIMENT_ID, dtype=torch.long),
    }
    if actions:
        b["action"] = torch.rand(bsz, h.action_horizon, h.action_dim, generator=g) * 2 - 1
        b["action_mask"] = torch.ones(bsz, h.action_horizon, h.action_dim)
    return {k: v.to(device) for k, v in b.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU (--tiny): float32, the code path is what is tested


def set_mode(model: GrootModel, mode: str, rank: int) -> float:
    bb = model.backbone
    if mode == "full":
        model.set_trainable(tune_llm=True, tune_visual=True)
        return 2e-5
    if mode == "frozen_backbone":
        bb.requires_grad_(False)
        return 2e-5
    from peft import LoraConfig, inject_adapter_in_model

    bb.requires_grad_(False)
    lcfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=r".*\.(self_attn)\.(q_proj|k_proj|v_proj|o_proj|out_proj)",
    )
    inject_adapter_in_model(lcfg, bb)
    for n, p in bb.named_parameters():
        p.requires_grad_("lora_" in n)
    return 1e-4


def train(cfg: GrootConfig, mode: str, args, device: torch.device) -> dict:
    reset(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(cfg, device)
    lr = set_mode(model, mode, args.lora_rank)
    model.to(device).train()
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = make_batch(cfg, args.batch, args.cameras, args.text, device, actions=True)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t = time.perf_counter()
        with autocast(device):
            loss, _ = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    step = statistics.median(times)
    out = {
        "mode": mode,
        "batch": args.batch,
        "sequence": int(batch["eagle_input_ids"].shape[1]),
        "parameters": count_parameters(model),
        "trainable": trainable,
        "lr": lr,
        "build_s": round(build_s, 2),
        "step_time_s": round(step, 4),
        "samples_per_s": round(args.batch / step, 2),
        "peak_memory_gib": peak_gib(device),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "finite": all(x == x and abs(x) < float("inf") for x in losses),
    }
    del model, opt, batch, params
    reset(device)
    return out


def sample(cfg: GrootConfig, args, device: torch.device) -> dict:
    reset(device)
    torch.manual_seed(0)
    model = build(cfg, device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
        rebuild_buffers(model)  # rotary frequencies back to float32
    model.eval()
    if args.compile:
        model.head.velocity = torch.compile(model.head.velocity)
    batch = make_batch(cfg, 1, args.cameras, args.text, device, actions=False)
    times = []
    first_s = 0.0
    for i in range(3 + args.sample_runs):
        sync(device)
        t = time.perf_counter()
        chunk = model.sample_actions(batch)
        sync(device)
        if i == 0:
            first_s = time.perf_counter() - t
        if i >= 3:
            times.append(time.perf_counter() - t)
    out = {
        "batch": 1,
        "sequence": int(batch["eagle_input_ids"].shape[1]),
        "chunk": list(chunk.shape[1:]),
        "steps": cfg.head.num_inference_timesteps,
        "dtype": str(next(model.parameters()).dtype),
        "compiled": bool(args.compile),
        "first_call_s": round(first_s, 2),
        "latency_ms": round(1000 * statistics.median(times), 2),
        "latency_ms_min": round(1000 * min(times), 2),
        "peak_memory_gib": peak_gib(device),
        "finite": bool(torch.isfinite(chunk).all()),
    }
    del model
    reset(device)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="reduced size on the CPU (for tests)")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--batch", type=int, default=None, help="training batch (16; tiny: 2)")
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--text", type=int, default=40, help="prompt tokens besides the images")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (3; tiny: 1)")
    ap.add_argument("--sample-runs", type=int, default=None, help="timed chunks (20; tiny: 2)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT velocity")
    ap.add_argument(
        "--modes",
        nargs="*",
        default=["full", "frozen_backbone", "lora"],
        choices=["full", "frozen_backbone", "lora"],
    )
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (2 if tiny else 16)
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.sample_runs = args.sample_runs or (2 if tiny else 20)
    if not tiny and not torch.cuda.is_available():
        print("benchmarks/gpu/groot.py needs a CUDA GPU; run with --tiny for the CPU check")
        return 2
    device = torch.device("cpu" if tiny else "cuda")
    cfg = tiny_config() if tiny else GrootConfig.released()
    with torch.device("meta"):
        n = count_parameters(GrootModel(cfg))
    res: dict = {
        "config": "tiny" if tiny else "nvidia/GR00T-N1.5-3B sizes (random weights)",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": n,
    }
    for mode in args.modes:
        res[mode] = train(cfg, mode, args, device)
        print(mode, res[mode], flush=True)
    res["sample"] = sample(cfg, args, device)
    print("sample", res["sample"], flush=True)
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

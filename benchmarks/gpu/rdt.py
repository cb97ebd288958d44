"""RDT-1B on one GPU: bf16 training step (full and LoRA) and 5-step sampling latency.

The released configuration (`RDTConfig()`: 1,228,319,872 parameters) with random weights (no
hub needed), fed model-level inputs of the released sizes: T5-XXL language tokens (4096-d,
`--lang-len` of them), 4374 SigLIP tokens (2 frames x 3 cameras x 729 patches, 1152-d), the
128-d state and a 64-step action chunk. Training: fp32 master weights, `torch.autocast`
bfloat16, AdamW (lr 1e-4, as the LIBERO recipe), `--steps` timed steps after `--warmup`;
reports step time (median), samples/s and peak memory. LoRA: peft adapters (rank `--lora-rank`)
on every linear of the transformer, adaptors and transformer base frozen. Sampling: batch 1,
`predict_action` (5 DPM-Solver++ steps) under bf16 autocast, median latency.
Sized to finish well within 10 minutes on one H200. `--tiny` runs the same code at a reduced
size on the CPU (the test suite does, so the script is known to work before a GPU is lent).

    $ .venv/bin/python benchmarks/gpu/rdt.py --out benchmarks/results/gpu_rdt.json
    $ .venv/bin/python benchmarks/gpu/rdt.py --tiny --out /tmp/rdt_tiny.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from vlatune.fsutil import write_json  # noqa: E402
from vlatune.policies.rdt.configuration import RDTConfig  # noqa: E402
from vlatune.policies.rdt.modeling import RDTRunner  # noqa: E402
from vlatune.versions import version_block  # noqa: E402

LORA_TARGETS = ["qkv", "proj", "q", "kv", "fc1", "fc2"]  # linears inside model.blocks / final


def tiny_config() -> RDTConfig:
    return RDTConfig.from_dict(
        {
            "pred_horizon": 4,
            "lang_token_dim": 32,
            "img_token_dim": 16,
            "max_lang_cond_len": 16,
            "img_cond_len": 54,
            "lang_pos_embed_config": [["lang", -16]],
            "img_pos_embed_config": [["image", [2, 3, -9]]],
            "rdt": {"hidden_size": 64, "depth": 2, "num_heads": 4},
        },
        source="tiny config",
        released=False,
    )


def make_batch(cfg: RDTConfig, B: int, lang_len: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    mask = torch.zeros(B, 1, cfg.action_dim)
    mask[..., [39, 40, 41, 42, 43, 44, 10, *range(30, 39)]] = 1  # LIBERO's slots (unified.py)
    b = {
        "lang_tokens": torch.randn(B, lang_len, cfg.lang_token_dim, generator=g),
        "lang_attn_mask": torch.ones(B, lang_len, dtype=torch.bool),
        "img_tokens": torch.randn(B, cfg.img_cond_len, cfg.img_token_dim, generator=g),
        "state_tokens": torch.rand(B, 1, cfg.state_token_dim, generator=g) * mask,
        "action_gt": torch.rand(B, cfg.pred_horizon, cfg.action_dim, generator=g) * mask,
        "action_mask": mask,
        "ctrl_freqs": torch.full((B,), 20.0),
    }
    return {k: v.to(device) for k, v in b.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(cfg: RDTConfig, device: torch.device, lora_rank: int | None):
    torch.manual_seed(0)
    with torch.device(device):
        model = RDTRunner(cfg)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model.model = get_peft_model(
            model.model,
            LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS),
        )
    return model


def time_training(model, batch, device, steps: int, warmup: int, dtype) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    reset_peak(device)
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = model.compute_loss(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss is {loss.item()} at step {i}")
    B = batch["action_gt"].shape[0]
    step = statistics.median(times)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "batch": B,
        "step_s_median": step,
        "step_s_all": times,
        "samples_per_s": B / step,
        "peak_memory_gib": peak_gib(device),
        "last_loss": loss.item(),
    }


def time_sampling(model, batch, device, runs: int, dtype) -> dict:
    model.eval()
    one = {k: v[:1] for k, v in batch.items() if k not in ("action_gt",)}
    times = []
    reset_peak(device)
    for i in range(runs + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            actions = model.predict_action(**one)
        sync(device)
        if i:  # the first run warms up kernels
            times.append(time.perf_counter() - t0)
    return {
        "batch": 1,
        "steps": model.cfg.noise_scheduler.num_inference_timesteps,
        "latency_s_median": statistics.median(times),
        "latency_s_all": times,
        "peak_memory_gib": peak_gib(device),
        "finite": bool(torch.isfinite(actions).all()),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="reduced size on the CPU (a smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (32; tiny: 2)")
    ap.add_argument("--lang-len", type=int, default=None, help="language tokens (32; tiny: 5)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (3; tiny: 1)")
    ap.add_argument("--sample-runs", type=int, default=None, help="sampling runs (10; tiny: 2)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--modes", default="full,lora,sample")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    tiny = a.tiny
    d = {"batch": 2, "lang_len": 5, "steps": 2, "warmup": 1, "sample_runs": 2} if tiny else {
        "batch": 32, "lang_len": 32, "steps": 10, "warmup": 3, "sample_runs": 10}  # fmt: skip
    for k in d:
        if getattr(a, k) is not None:
            d[k] = getattr(a, k)
    if tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit(
            "benchmarks/gpu/rdt.py measures the released size on a CUDA GPU and none is visible; "
            "install a CUDA build of torch on a GPU machine, or pass --tiny for the CPU smoke run"
        )
    cfg = tiny_config() if tiny else RDTConfig()
    dtype = torch.bfloat16
    result: dict = {
        "model": "rdt (tiny)" if tiny else "rdt-1b released config, random weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast_dtype": "bfloat16",
        "settings": d,
        "versions": version_block(),
    }
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = set(modes) - {"full", "lora", "sample"}
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from full, lora, sample")
    batch = make_batch(cfg, d["batch"], d["lang_len"], device)
    t_start = time.perf_counter()
    if "full" in modes or "sample" in modes:
        model = build(cfg, device, None)
        if "full" in modes:
            result["full"] = time_training(model, batch, device, d["steps"], d["warmup"], dtype)
            print(f"full: {result['full']['step_s_median']:.3f} s/step", flush=True)
        if "sample" in modes:
            result["sample"] = time_sampling(model, batch, device, d["sample_runs"], dtype)
            print(f"sample: {result['sample']['latency_s_median'] * 1e3:.1f} ms", flush=True)
        del model
    if "lora" in modes:
        model = build(cfg, device, a.lora_rank)
        result["lora"] = time_training(model, batch, device, d["steps"], d["warmup"], dtype)
        result["lora"]["rank"] = a.lora_rank
        print(f"lora: {result['lora']['step_s_median']:.3f} s/step", flush=True)
        del model
    result["wall_s"] = time.perf_counter() - t_start
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()

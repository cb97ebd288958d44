"""OpenVLA-OFT on one GPU: a LoRA r32 bf16 training step at batch 8 and one 8-step chunk latency.

The released configuration (`openvla/openvla-7b`: fused DINOv2 + SigLIP at 224 px, Llama-2 7B;
7,541,237,184 parameters) with random weights (no hub needed), built as OFT's LIBERO recipe runs
it: two images (12-channel `pixel_values`), the proprio token, a prompt of `--prompt-len` ids,
8 x 7 action positions + the stop token, the L1-regression head on the action hidden states
(parallel decoding, `OFTConfig.attention`), L1 loss. Training ("lora"): the VLA in bfloat16,
frozen, peft LoRA (rank `--lora-rank`, alpha min(rank, 16), dropout 0, every linear but the LM
head, as OFT's `all-linear`), head and proprio projector trained in fp32, `torch.autocast`
bfloat16, AdamW lr 5e-4; median step time, samples/s, peak memory (OFT's README: about 62 GB at
batch 8). "full" trains every weight with fp32 master weights (tiny runs only by default: at the
released size AdamW state alone is about 120 GB). "sample": batch 1, one forward pass of the
VLA + head (one 8 x 7 chunk), median latency. Sized to finish well within 10 minutes on one
H200. `--tiny` runs the same code at a reduced size on the CPU (the test suite does).

    $ .venv/bin/python benchmarks/gpu/openvla.py --out benchmarks/results/gpu_openvla.json
    $ .venv/bin/python benchmarks/gpu/openvla.py --tiny --out /tmp/openvla_tiny.json
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
from vlatune.policies.openvla.configuration import OFTConfig, OpenVLAConfig  # noqa: E402
from vlatune.policies.openvla.convert import _materialise_buffers  # noqa: E402
from vlatune.policies.openvla.modeling import OpenVLAForActionPrediction  # noqa: E402
from vlatune.policies.openvla.oft_heads import L1RegressionActionHead, ProprioProjector  # noqa: E402
from vlatune.versions import version_block  # noqa: E402

DINO, SIGLIP = "vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"


def config(tiny: bool) -> OpenVLAConfig:
    text = {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}
    raw = {
        "image_sizes": [224, 224],
        "n_action_bins": 256,
        "pad_to_multiple_of": 64,
        "text_config": text,
        "timm_model_ids": [DINO, SIGLIP],
        "use_fused_vision_backbone": True,
    }
    if not tiny:
        return OpenVLAConfig.from_dict(raw)
    raw["image_sizes"] = [28, 28]
    text.update(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    text["num_key_value_heads"] = 2
    over = {
        DINO: {"embed_dim": 16, "depth": 2, "num_heads": 2},
        SIGLIP: {"embed_dim": 24, "depth": 2, "num_heads": 2},
    }
    return OpenVLAConfig.from_dict(raw, over)


def make_batch(cfg: OpenVLAConfig, oft: OFTConfig, B: int, prompt_len: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    n = oft.num_actions_chunk * oft.action_dim
    prompt = torch.randint(3, 29000, (B, prompt_len), generator=g)
    acts = torch.randint(31744, 32000, (B, n), generator=g)
    ids = torch.cat(
        [
            torch.ones(B, 1, dtype=torch.long),
            prompt,
            torch.full((B, 1), 29871),
            acts,
            torch.full((B, 1), 2),
        ],
        1,
    )
    labels = torch.full_like(ids, -100)
    labels[:, prompt_len + 2 :] = ids[:, prompt_len + 2 :]
    size = cfg.raw["image_sizes"][0]
    b = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids, dtype=torch.bool),
        "labels": labels,
        "pixel_values": torch.randn(B, 6 * oft.num_images, size, size, generator=g),
        "proprio": torch.rand(B, oft.proprio_dim, generator=g) * 2 - 1,
        "target": torch.rand(B, oft.num_actions_chunk, oft.action_dim, generator=g) * 2 - 1,
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


def build(cfg: OpenVLAConfig, oft: OFTConfig, device, vla_dtype, lora_rank: int | None):
    """Random weights, allocated once on `device` (meta build, then to_empty)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        vla = OpenVLAForActionPrediction(cfg)
    vla = vla.to(vla_dtype).to_empty(device=device)
    with torch.no_grad():
        for p in vla.parameters():
            p.normal_(0.0, 0.02)
    _materialise_buffers(vla)
    vla.language_model.model.rotary_emb.to(device)
    d = vla.language_model.config.hidden_size
    with torch.device(device):
        head = L1RegressionActionHead(d, d, oft.action_dim, oft.num_actions_chunk)
        proj = ProprioProjector(d, oft.proprio_dim)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        vla.requires_grad_(False)
        targets = [
            n
            for n, m in vla.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "language_model.lm_head"
        ]
        lcfg = LoraConfig(
            r=lora_rank, lora_alpha=min(lora_rank, 16), lora_dropout=0.0, target_modules=targets
        )
        vla = get_peft_model(vla, lcfg)
    return vla, head, proj


def oft_step(vla, head, proj, batch, oft):
    model = vla.get_base_model() if hasattr(vla, "get_base_model") else vla
    feats = proj(batch["proprio"])
    h = model.oft_action_hidden_states(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        oft,
        feats,
    )
    return head.predict_action(h.float())


def time_training(vla, head, proj, batch, oft, device, steps: int, warmup: int) -> dict:
    modules = [vla, head, proj]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    for m in modules:
        m.train()
    times = []
    reset_peak(device)
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = oft_step(vla, head, proj, batch, oft)
        loss = torch.nn.functional.l1_loss(pred.float(), batch["target"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss is {loss.item()} at step {i}")
    B = batch["input_ids"].shape[0]
    step = statistics.median(times)
    return {
        "parameters": sum(p.numel() for m in modules for p in m.parameters()),
        "trainable": sum(p.numel() for p in params),
        "batch": B,
        "sequence_length": batch["input_ids"].shape[1],
        "step_s_median": step,
        "step_s_all": times,
        "samples_per_s": B / step,
        "peak_memory_gib": peak_gib(device),
        "last_loss": loss.item(),
    }


@torch.no_grad()
def time_sampling(vla, head, proj, batch, oft, device, runs: int) -> dict:
    for m in (vla, head, proj):
        m.eval()
    one = {k: v[:1] for k, v in batch.items()}
    times = []
    reset_peak(device)
    for i in range(runs + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            chunk = oft_step(vla, head, proj, one, oft)
        sync(device)
        if i:  # the first run warms up kernels
            times.append(time.perf_counter() - t0)
    return {
        "batch": 1,
        "chunk": list(chunk.shape[1:]),
        "latency_s_median": statistics.median(times),
        "latency_s_all": times,
        "peak_memory_gib": peak_gib(device),
        "finite": bool(torch.isfinite(chunk).all()),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="reduced size on the CPU (a smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (8; tiny: 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt ids (20; tiny: 5)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (3; tiny: 1)")
    ap.add_argument("--sample-runs", type=int, default=None, help="latency runs (10; tiny: 2)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--modes", default=None, help="full,lora,sample (GPU default: lora,sample)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    tiny = a.tiny
    d = {"batch": 2, "prompt_len": 5, "steps": 2, "warmup": 1, "sample_runs": 2} if tiny else {
        "batch": 8, "prompt_len": 20, "steps": 10, "warmup": 3, "sample_runs": 10}  # fmt: skip
    for k in d:
        if getattr(a, k) is not None:
            d[k] = getattr(a, k)
    if tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit(
            "benchmarks/gpu/openvla.py measures the released size on a CUDA GPU and none is "
            "visible; install a CUDA build of torch on a GPU machine, or pass --tiny for the CPU "
            "smoke run"
        )
    modes = [
        m.strip() for m in (a.modes or ("full,lora,sample" if tiny else "lora,sample")).split(",")
    ]
    unknown = set(modes) - {"full", "lora", "sample"}
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from full, lora, sample")
    cfg = config(tiny)
    oft = OFTConfig.for_platform("libero", num_images=2)
    result: dict = {
        "model": "openvla-oft (tiny)"
        if tiny
        else "openvla-7b released config + OFT L1 head, random weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast_dtype": "bfloat16",
        "oft": {
            "chunk": oft.num_actions_chunk,
            "action_dim": oft.action_dim,
            "images": oft.num_images,
        },
        "settings": d,
        "versions": version_block(),
    }
    batch = make_batch(cfg, oft, d["batch"], d["prompt_len"], device)
    t_start = time.perf_counter()
    if "full" in modes:
        vla, head, proj = build(cfg, oft, device, torch.float32, None)
        result["full"] = time_training(vla, head, proj, batch, oft, device, d["steps"], d["warmup"])
        print(f"full: {result['full']['step_s_median']:.3f} s/step", flush=True)
        del vla, head, proj
    if "lora" in modes or "sample" in modes:
        vla, head, proj = build(cfg, oft, device, torch.bfloat16, a.lora_rank)
        if "lora" in modes:
            result["lora"] = time_training(
                vla, head, proj, batch, oft, device, d["steps"], d["warmup"]
            )
            result["lora"]["rank"] = a.lora_rank
            print(f"lora: {result['lora']['step_s_median']:.3f} s/step", flush=True)
        if "sample" in modes:
            result["sample"] = time_sampling(vla, head, proj, batch, oft, device, d["sample_runs"])
            print(f"sample: {result['sample']['latency_s_median'] * 1e3:.1f} ms", flush=True)
        del vla, head, proj
    result["wall_s"] = time.perf_counter() - t_start
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()

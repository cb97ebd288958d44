"""NORA / NORA-Long on one GPU: LoRA r16 bf16 training steps at batch 16 and greedy chunk decoding.

NORA (`declare-lab/nora`) is Qwen2.5-VL-3B-Instruct whose tokenizer gained the 2048 FAST+ action
tokens `<robot_action_0..2047>` (ids 151665 + k, NORA's `training/train.py`: action_token_min
151665, action_token_max 153712). It is built here at full size from the configuration written
out in `qwen2_5_vl_3b()` (random weights, no hub) as a
`transformers.Qwen2_5_VLForConditionalGeneration` in bfloat16, allocated directly on the device.
Inputs follow NORA's sample layout: one 224 x 224 image (16 x 16 patches of 14 px, merged 2 x 2
into 64 vision tokens) inside the Qwen2.5-VL chat template with its default system prompt,
`--prompt-len` text tokens in all (template + instruction), then `--horizon` x 7 FAST+ action
tokens (1: nora, 5: nora-long; FAST's BPE makes the real count vary per chunk, 7 per step is the
nominal size) and `<|im_end|>` + newline. Labels run from the first action token to the end
(NORA's collate_fn); nothing is padded (all samples have one length).
- lora: peft LoRA r16, alpha 32, dropout 0.05 on every nn.Linear of the language model (not the
  vision tower, not the LM head): vlatune's NORA baseline recipe (`nora/baseline.yaml`,
  `all-linear`); NORA's own train.py fine-tunes every weight. Gradient checkpointing
  (non-reentrant), AdamW as NORA (lr 5e-5, betas 0.9 / 0.95, eps 1e-8, weight decay 1e-8),
  `--steps` timed steps after `--warmup`: median step time, tokens/s (all sequence positions,
  vision tokens included), samples/s, peak memory.
- sample: the adapters merged (NORA's inference runs a plain Qwen2.5-VL), batch 1, greedy
  `generate` with the KV cache, `max_new_tokens` = `min_new_tokens` = the chunk's action-token
  count; median latency of `--sample-runs` calls after one warm-up call.
Sized to finish within about 4 minutes on one H200. `--tiny` runs the same code at a reduced size
on the CPU (the test suite does, so the script is known to work before a GPU is lent).

    $ .venv/bin/python benchmarks/gpu/nora.py --out benchmarks/results/gpu_nora.json
    $ .venv/bin/python benchmarks/gpu/nora.py --horizon 5 --out benchmarks/results/gpu_nora5.json
    $ .venv/bin/python benchmarks/gpu/nora.py --tiny --out /tmp/nora_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from vlatune.fsutil import write_json  # noqa: E402
from vlatune.versions import version_block  # noqa: E402

ACTION_DIM = 7  # FAST+ tokens per action step (nominal)
IMAGE_SIZE = 224  # NORA resizes every image to 224 x 224 (train.py resize_resolution)

# Qwen2.5-VL special ids (tokenizer_config.json of Qwen2.5-VL-*-Instruct; also the defaults of
# transformers' Qwen2_5_VLConfig for the vision ids): the chat template's structure tokens.
QWEN_IDS = {
    "im_start": 151644,
    "im_end": 151645,  # eos of the Instruct models
    "newline": 198,  # "\n" in Qwen2's byte-level BPE
    "vision_start": 151652,
    "vision_end": 151653,
    "image": 151655,
    "video": 151656,
    "text_max": 151643,  # ordinary BPE ids are below <|endoftext|> = 151643
    "action_base": 151665,  # len(Qwen2.5 tokenizer): <robot_action_k> = 151665 + k
    "action_vocab": 2048,  # FAST+ vocabulary
}
# --tiny: the same layout in a small vocabulary (special ids at the top of the base vocabulary)
TINY_IDS = {
    "im_start": 990,
    "im_end": 991,
    "newline": 10,
    "vision_start": 992,
    "vision_end": 993,
    "image": 994,
    "video": 995,
    "text_max": 900,
    "action_base": 1000,
    "action_vocab": 256,
}


def qwen2_5_vl_3b(tiny: bool) -> tuple[Qwen2_5_VLConfig, dict]:
    """NORA's architecture: Qwen2.5-VL-3B-Instruct's config.json values, vocabulary grown by the
    2048 action tokens. transformers' Qwen2_5_VLConfig defaults are the 7B/72B sizes, so every
    size is written out here. Sources: Qwen/Qwen2.5-VL-3B-Instruct config.json (text: hidden 2048,
    36 layers, 16 heads, 2 KV heads, intermediate 11008, rms eps 1e-6, rope theta 1e6, mrope
    sections [16, 24, 24], tied embeddings; vision: depth 32, hidden 1280, 16 heads, intermediate
    3420, out hidden 2048, patch 14, temporal patch 2, spatial merge 2, window 112 px, full
    attention in blocks 7 / 15 / 23 / 31, tokens_per_second 2); the vision values other than
    hidden / out hidden / tokens_per_second equal transformers' defaults. Check: the model built
    from it has 3,758,262,272 parameters: 3,754,622,976 at the base vocabulary 151936 (Qwen2.5-VL-3B
    is published as 3.75B) plus the 1,777 added embedding rows x 2048 (the LM head is tied)."""
    ids = TINY_IDS if tiny else QWEN_IDS
    # rows for every action token: the largest id is action_base + 2047 = 153712 (train.py's
    # action_token_max), so the smallest embedding holding it has 153713 rows (the base
    # checkpoint's 151936 rows end before 151665 + 2048). The released checkpoint's exact row
    # count cannot be read here without the hub; a few hundred rows change the cost < 0.1%.
    vocab = ids["action_base"] + ids["action_vocab"]
    if tiny:
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
        text.update(num_attention_heads=4, num_key_value_heads=2)
        mrope = [2, 3, 3]  # sums to head_dim / 2 = 8
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
        vision.update(out_hidden_size=64, fullatt_block_indexes=[1])
    else:
        text = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36}
        text.update(num_attention_heads=16, num_key_value_heads=2)
        mrope = [16, 24, 24]  # sums to head_dim / 2 = 64
        vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16}
        vision.update(out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31])
    text.update(
        vocab_size=vocab,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        bos_token_id=151643 if not tiny else 996,
        eos_token_id=ids["im_end"],
        pad_token_id=ids["im_end"],
        tie_word_embeddings=True,  # pre-v5 placement; Qwen2_5_VLConfig forwards it outward
    )
    vision.update(
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        tokens_per_second=2,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    return cfg, ids


def make_batch(cfg: Qwen2_5_VLConfig, ids: dict, B: int, prompt_len: int, horizon: int) -> dict:
    """NORA-shaped samples: chat template + image + instruction, then the action tokens.

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|> x 64<|vision_end|>{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n{<robot_action_k> x horizon*7}<|im_end|>\\n
    Words are random ordinary ids; structure tokens are the real ones. `prompt_len` counts every
    token before the actions but the image pads (21 of them are the template's, vision_start /
    vision_end included; the rest is the instruction)."""
    g = torch.Generator().manual_seed(0)
    vc = cfg.vision_config
    grid = IMAGE_SIZE // vc.patch_size  # 16 patches a side
    n_vision = grid * grid // vc.spatial_merge_size**2  # 64 tokens after the 2 x 2 merger
    S, NL, E = ids["im_start"], ids["newline"], ids["im_end"]
    template = 14 + 2 + 5  # before the image, vision_start / _end, after the instruction
    n_instr = prompt_len - template
    if n_instr < 1:
        raise SystemExit(f"--prompt-len {prompt_len}: must be at least {template + 1}")
    n_act = horizon * ACTION_DIM

    def words(n: int) -> torch.Tensor:
        return torch.randint(11, ids["text_max"], (B, n), generator=g)

    def tok(*v: int) -> torch.Tensor:
        return torch.tensor(v).expand(B, -1)

    prompt = torch.cat(
        [
            tok(S), words(1), tok(NL), words(6), tok(E, NL, S), words(1), tok(NL),
            tok(ids["vision_start"]), tok(*[ids["image"]] * n_vision), tok(ids["vision_end"]),
            words(n_instr), tok(E, NL, S), words(1), tok(NL),
        ],
        1,
    )  # fmt: skip
    actions = ids["action_base"] + torch.randint(0, ids["action_vocab"], (B, n_act), generator=g)
    input_ids = torch.cat([prompt, actions, tok(E, NL)], 1)
    labels = torch.full_like(input_ids, -100)
    labels[:, prompt.shape[1] :] = input_ids[:, prompt.shape[1] :]
    # the image processor's layout: per patch C x temporal(2, the image repeated) x 14 x 14
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixel_values = torch.randn(B * grid * grid, patch_dim, generator=g)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, grid, grid]] * B),
    }
    return {"batch": batch, "prompt_len": prompt.shape[1], "vision_tokens": n_vision}


def with_token_types(model, batch: dict, ids: dict) -> dict:
    """transformers releases whose forward takes `mm_token_type_ids` (text 0, image 1) compute
    Qwen2.5-VL's 3-D rope positions only from it; older ones read image tokens from input_ids.
    Passed exactly when the forward accepts it, so both give the same positions."""
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        return batch
    types = (batch["input_ids"] == ids["image"]).to(torch.int32)
    return {**batch, "mm_token_type_ids": types}


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


def build(cfg: Qwen2_5_VLConfig, device: torch.device, dtype: torch.dtype, attn: str):
    """Random weights (transformers' init), allocated once, directly on `device`, in `dtype`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, dtype=dtype, attn_implementation=attn
        )
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        raise RuntimeError(
            "the LM head is not tied to the input embeddings (Qwen2.5-VL-3B ties them); this "
            f"transformers release ({version_block()['transformers']}) reads the config differently"
        )
    return model


def lora_targets(model) -> list[str]:
    """Every nn.Linear of the language model: not the vision tower (`visual`), not the LM head."""
    return sorted(
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "visual" not in name and not name.endswith("lm_head")
    )


def apply_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model)
    if not targets:
        raise RuntimeError("no nn.Linear found in the language model for LoRA")
    model.requires_grad_(False)
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old
    # names warn); use whichever this release has
    enable = getattr(model, "activation_checkpointing_enable", None)
    enable = enable or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # the kwargs dict is the first argument of both
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets)
    return get_peft_model(model, lcfg), len(targets)


def time_training(model, batch: dict, device, steps: int, warmup: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-8)
    model.train()
    times, losses = [], []
    reset(device)
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"training loss is {losses[-1]} at step {i}")
    B, L = batch["input_ids"].shape
    step = statistics.median(times)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "batch": B,
        "sequence_length": L,
        "label_tokens_per_sample": int((batch["labels"][0] != -100).sum()),
        "step_s_median": round(step, 4),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(B * L / step, 1),
        "samples_per_s": round(B / step, 2),
        "peak_memory_gib": peak_gib(device),
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
    }


@torch.no_grad()
def time_decoding(model, batch: dict, prompt_len: int, n_new: int, device, runs: int) -> dict:
    model.eval()
    one = {
        "input_ids": batch["input_ids"][:1, :prompt_len],
        "attention_mask": batch["attention_mask"][:1, :prompt_len],
        "pixel_values": batch["pixel_values"][: int(batch["image_grid_thw"][0].prod())],
        "image_grid_thw": batch["image_grid_thw"][:1],
    }
    if "mm_token_type_ids" in batch:
        one["mm_token_type_ids"] = batch["mm_token_type_ids"][:1, :prompt_len]
    times = []
    reset(device)
    for i in range(runs + 1):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            **one,
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            use_cache=True,
            pad_token_id=model.config.text_config.eos_token_id,
        )
        sync(device)
        if i:  # the first call warms up kernels
            times.append(time.perf_counter() - t0)
    generated = out.shape[1] - prompt_len
    if generated != n_new:
        raise RuntimeError(f"greedy decoding produced {generated} tokens, expected {n_new}")
    lat = statistics.median(times)
    return {
        "batch": 1,
        "prompt_tokens": prompt_len,
        "new_tokens": generated,
        "latency_s_median": round(lat, 4),
        "latency_s_all": [round(t, 4) for t in times],
        "ms_per_token": round(1e3 * lat / generated, 2),
        "peak_memory_gib": peak_gib(device),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="reduced size on the CPU (a smoke run)")
    ap.add_argument("--horizon", type=int, default=1, help="FAST+ time horizon: 1 nora, 5 long")
    ap.add_argument("--batch", type=int, default=None, help="training batch (16; tiny: 2)")
    ap.add_argument("--prompt-len", type=int, default=30, help="text tokens before the actions")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (8; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (2; tiny: 1)")
    ap.add_argument("--sample-runs", type=int, default=None, help="decode runs (10; tiny: 2)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (NORA: flash_attention_2)")
    ap.add_argument("--modes", default="lora,sample", help="lora,sample")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    tiny = a.tiny
    d = {"batch": 2, "steps": 2, "warmup": 1, "sample_runs": 2} if tiny else {
        "batch": 16, "steps": 8, "warmup": 2, "sample_runs": 10}  # fmt: skip
    for k in d:
        if getattr(a, k) is not None:
            d[k] = getattr(a, k)
    d.update(horizon=a.horizon, prompt_len=a.prompt_len, lora_rank=a.lora_rank, attn=a.attn)
    if a.horizon < 1:
        raise SystemExit(f"--horizon {a.horizon}: must be at least 1 (nora 1, nora-long 5)")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = set(modes) - {"lora", "sample"}
    if unknown or not modes:
        raise SystemExit(f"--modes {a.modes!r}: choose from lora, sample")
    if tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit(
            "benchmarks/gpu/nora.py measures the released size on a CUDA GPU and none is visible; "
            "install a CUDA build of torch on a GPU machine, or pass --tiny for the CPU smoke run"
        )
    cfg, ids = qwen2_5_vl_3b(tiny)
    name = "nora-long" if a.horizon == 5 else "nora" if a.horizon == 1 else f"nora-h{a.horizon}"
    result: dict = {
        "model": f"{name} (tiny)"
        if tiny
        else f"{name}: Qwen2.5-VL-3B config + 2048 FAST+ action tokens, random weights",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "config": {
            "vocab_size": cfg.text_config.vocab_size,
            "hidden_size": cfg.text_config.hidden_size,
            "layers": cfg.text_config.num_hidden_layers,
            "vision_depth": cfg.vision_config.depth,
            "vision_hidden_size": cfg.vision_config.hidden_size,
        },
        "settings": d,
        "versions": version_block(),
    }
    t_start = time.perf_counter()
    reset(device)
    model = build(cfg, device, dtype, a.attn)
    result["build_s"] = round(time.perf_counter() - t_start, 2)
    result["attn_implementation"] = model.config._attn_implementation
    made = make_batch(cfg, ids, d["batch"], a.prompt_len, a.horizon)
    batch = with_token_types(model, {k: v.to(device) for k, v in made["batch"].items()}, ids)
    result["rope_positions_from"] = (
        "mm_token_type_ids" if "mm_token_type_ids" in batch else "input_ids"
    )
    result["sequence"] = {
        "vision_tokens": made["vision_tokens"],
        "prompt_tokens": made["prompt_len"],
        "action_tokens": a.horizon * ACTION_DIM,
        "total": batch["input_ids"].shape[1],
    }
    model, n_targets = apply_lora(model, a.lora_rank)
    base = model.get_base_model()
    on = getattr(type(base), "is_activation_checkpointing", None)
    result["gradient_checkpointing"] = bool(
        base.is_activation_checkpointing if on is not None else base.is_gradient_checkpointing
    )
    if "lora" in modes:
        result["lora"] = time_training(model, batch, device, d["steps"], d["warmup"])
        result["lora"].update(rank=a.lora_rank, target_modules=n_targets)
        print(
            f"lora: {result['lora']['step_s_median']:.3f} s/step, "
            f"{result['lora']['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    if "sample" in modes:
        model = model.merge_and_unload()
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
        result["sample"] = time_decoding(
            model, batch, made["prompt_len"], a.horizon * ACTION_DIM, device, d["sample_runs"]
        )
        print(f"sample: {result['sample']['latency_s_median'] * 1e3:.1f} ms", flush=True)
    del model
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()

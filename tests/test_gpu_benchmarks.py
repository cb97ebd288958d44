"""The prepared GPU benchmarks of `benchmarks/gpu/`, run at reduced size on the CPU (`--tiny`).

Each runs the same code as on a GPU in a subprocess (as the coordinator runs it on the device
machine) and its JSON is checked: keys present, losses finite, shapes as the model's rules give.

    $ .venv/bin/python -m pytest tests/test_gpu_benchmarks.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / script), "--tiny", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("horizon", [1, 5])
def test_nora_tiny(tmp_path, horizon):
    out = tmp_path / "nora.json"
    r = run_script("benchmarks/gpu/nora.py", out, "--horizon", str(horizon))
    assert r["model"] == ("nora (tiny)" if horizon == 1 else "nora-long (tiny)")
    assert {"device", "dtype", "config", "settings", "versions", "wall_s"} <= set(r)
    assert r["settings"]["horizon"] == horizon and r["settings"]["batch"] == 2
    assert r["versions"]["transformers"] and r["gradient_checkpointing"] is True
    # one 224 x 224 image: 16 x 16 patches merged 2 x 2 -> 64 vision tokens; 30 text tokens;
    # horizon x 7 action tokens, then <|im_end|> and the newline
    seq = r["sequence"]
    assert seq == {
        "vision_tokens": 64,
        "prompt_tokens": 94,
        "action_tokens": 7 * horizon,
        "total": 94 + 7 * horizon + 2,
    }
    lora = r["lora"]
    assert lora["sequence_length"] == seq["total"]
    assert lora["label_tokens_per_sample"] == 7 * horizon + 2  # from the first action to the end
    assert lora["target_modules"] == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert 0 < lora["trainable"] < lora["parameters"] / 5  # only the adapters train
    assert len(lora["losses"]) == 3 and all(math.isfinite(x) for x in lora["losses"])
    assert lora["losses"][-1] < lora["losses"][0]  # the adapters learn
    assert lora["step_s_median"] > 0 and lora["tokens_per_s"] > 0
    assert lora["peak_memory_gib"] is None  # CPU: no CUDA allocator to read
    sample = r["sample"]
    assert sample["new_tokens"] == 7 * horizon and sample["prompt_tokens"] == seq["prompt_tokens"]
    assert sample["latency_s_median"] > 0 and len(sample["latency_s_all"]) == 2


def test_nora_rejects_bad_arguments(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks/gpu/nora.py"), "--tiny", "--out"]
    for extra, msg in ((["--horizon", "0"], "--horizon 0"), (["--modes", "full"], "--modes")):
        proc = subprocess.run(
            [*cmd, str(tmp_path / "x.json"), *extra], capture_output=True, text=True, cwd=REPO
        )
        assert proc.returncode != 0 and msg in proc.stderr
        assert not (tmp_path / "x.json").exists()


def test_nora_full_size_config_is_qwen2_5_vl_3b_plus_action_tokens():
    """Built on the meta device (no memory): the released sizes, checked by parameter count."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_nora", REPO / "benchmarks/gpu/nora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg, ids = bench.qwen2_5_vl_3b(tiny=False)
    assert cfg.text_config.vocab_size == 151665 + 2048 == ids["action_base"] + ids["action_vocab"]
    with torch.device("meta"):
        model = bench.Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    # 3,754,622,976 at the base vocabulary 151936 (Qwen2.5-VL-3B, published as 3.75B) plus
    # the (153713 - 151936) added rows x 2048 (the LM head is tied)
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976 + 1777 * 2048
    targets = bench.lora_targets(model)
    assert len(targets) == 36 * 7 and not any("visual" in t for t in targets)
    made = bench.make_batch(cfg, ids, 16, 30, 5)
    assert made["batch"]["input_ids"].shape == (16, 94 + 35 + 2)
    assert made["batch"]["pixel_values"].shape == (16 * 256, 3 * 2 * 14 * 14)

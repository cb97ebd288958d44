"""The `nora` family trained and evaluated through vlatune: the recipes `nora_libero.yaml`
(declare-lab/nora, FAST horizon 1) and `nora_long_libero.yaml` (declare-lab/nora-long,
horizon 5), the processor (training path == evaluation path, and NORA's own sample), save /
load / resume, a released folder, and one LIBERO episode.

The tiny NORA is a random 2-layer Qwen2.5-VL (tests/hf_fixtures.py) whose `<robot_action_k>`,
k < 128, are added first (so at its base vocabulary + k, as NORA's at 151665 + k), with
`norm_stats.json` and a FAST tokenizer (vocabulary 128) fitted on normalised chunks in its
`fast_tokenizer/`.

    $ .venv/bin/python -m pytest tests/test_nora_recipes.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from family_fixtures import (
    data_stats,
    one_libero_episode,
    random_observation,
    read_metrics,
    tiny_libero_data,
    tiny_run_config,
    train_config,
)
from hf_fixtures import tiny_qwen2_5_vl

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "src" / "vlatune" / "configs" / "nora"
V = 128
NORM_STATS = {
    "libero_goal_no_noops": {
        "action": {
            "q01": [-0.9, -0.8, -0.9, -0.1, -0.2, -0.3, 0.0],
            "q99": [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0],
            "mask": [True] * 6 + [False],
        }
    }
}


def _fast(folder: Path) -> None:
    from vlatune.policies.tokenizers.fast import FastTokenizer

    rng = np.random.default_rng(0)
    chunks = []
    for h in (1, 5):
        for _ in range(40):
            c = np.clip(rng.normal(0, 0.5, (h, 7)), -1, 1)
            c[:, -1] = rng.choice([0.0, 1.0], h)
            chunks.append(c)
        chunks += [np.ones((h, 7)), -np.ones((h, 7))]
    FastTokenizer.fit(chunks, scale=4, vocab_size=V).save(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("nora")
    nora = tiny_qwen2_5_vl(root / "nora", with_template=False)
    tok = AutoTokenizer.from_pretrained(nora)
    tok.add_tokens([f"<robot_action_{k}>" for k in range(V)], special_tokens=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(nora)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(nora)
    tok.save_pretrained(nora)
    (nora / "norm_stats.json").write_text(json.dumps(NORM_STATS))
    _fast(nora / "fast_tokenizer")
    return {"nora": nora, "data": tiny_libero_data(root)}


def _cfg(recipe: str, folders: dict, out: Path, *extra: str):
    small = ("policy.lora.r=4", "optim.warmup_steps=0")
    return tiny_run_config(
        RECIPES / f"{recipe}.yaml", folders["data"], folders["nora"], out, *small, *extra
    )


def _train(recipe, folders, out, *extra):
    return train_config(_cfg(recipe, folders, out, *extra))


def _stats(folders) -> dict:
    return data_stats(folders["data"])


# -- recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,horizon", [("nora_libero", 1), ("nora_long_libero", 5)])
def test_recipe_trains_two_steps(recipe, horizon, folders, tmp_path):
    from vlatune.config import load_config

    full = load_config(RECIPES / f"{recipe}.yaml")
    assert full.policy.type == "nora" and full.data.action_horizon == horizon
    assert full.policy.pretrained == (
        "declare-lab/nora-long" if horizon == 5 else "declare-lab/nora"
    )
    assert (full.policy.lora.r, full.policy.lora.alpha) == (16, 32)  # NORA's LoRA recipe
    summary = _train(recipe, folders, tmp_path / "run")
    assert summary["steps"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert "action_token_accuracy" in rows[0]
    policy_dir = tmp_path / "run" / "checkpoint-2" / "policy"
    files = {p.name for p in policy_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "norm_stats.json",
        "processor.json",
        "nora_config.json",
        "lora_adapters.safetensors",
        "fast_tokenizer",
        "tokenizer.json",
    } <= files
    assert json.loads((policy_dir / "nora_config.json").read_text())["horizon"] == horizon
    # the saved folder is still a NORA folder (merged weights, unresized vocabulary)
    from vlatune.policies.nora.convert import is_released_folder

    assert is_released_folder(policy_dir)


def test_hub_id_and_missing_fast_are_refused(folders, tmp_path):
    from vlatune.policies import registry

    cfg = _cfg("nora_long_libero", folders, tmp_path, "policy.pretrained=declare-lab/nora-long")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download declare-lab/nora-long"):
        registry.build(cfg, _stats(folders))
    cfg = _cfg("nora_long_libero", folders, tmp_path, f"policy.fast_tokenizer={tmp_path}/none")
    with pytest.raises(FileNotFoundError, match="physical-intelligence/fast"):
        registry.build(cfg, _stats(folders))


# -- the processor: training path == evaluation path == NORA's sample --------------------------
def test_training_and_evaluation_inputs_are_identical(folders):
    from vlatune.data.training import FrameDataset, collate
    from vlatune.policies import registry
    from vlatune.policies.nora import processor as P

    cfg = _cfg("nora_long_libero", folders, Path("/unused"))
    stats = _stats(folders)
    ds = FrameDataset.from_config(folders["data"], cfg.data, stats, train=False)
    policy = registry.build(cfg, stats)
    ds.use_processor(policy.processor)
    k = 3
    frame = ds.frame(k)
    batch = collate([ds[k]])
    obs = {"images": frame["images"], "state": frame["state"], "instruction": frame["instruction"]}
    evald = policy.observation_batch([obs])
    keys = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    assert keys <= set(evald) and "target_ids" not in evald
    for key in keys:
        assert torch.equal(batch[key], evald[key]), key

    # the training batch joined is NORA's sample: the image at 224, the prompt + the FAST ids
    # of the chunk normalised by NORA's rule (gripper to [0, 1], masked) as <robot_action_k>
    entry = P.stats_entry(stats, -1)
    chunk = np.array(frame["actions"], dtype=np.float64)
    chunk[:, -1] = np.where(chunk[:, -1] > 0, 0.0, 1.0)  # env +1 close -> NORA 0
    fast_ids = policy.fast.encode(P.normalize(chunk, entry))
    want = P.encode_sample(
        policy.tokenizer,
        frame["images"]["agentview"],
        frame["instruction"],
        fast_ids,
        policy.cfg,
        image_processor=policy.image_processor,
    )
    joined = P.join_batch(batch, policy.pad_id, policy.cfg, with_labels=True)
    for key in ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(joined[key].reshape(want[key].shape), want[key]), key
    assert joined["labels"][0].ne(-100).sum() == len(fast_ids) + 2  # + <|im_end|> and "\n"
    # the conventions the evaluator checks
    assert policy.conventions["gripper"] == "-1_open" and policy.conventions["action_horizon"] == 5


def test_inverse_unnormalises_and_converts_the_gripper(folders):
    from vlatune.policies import registry
    from vlatune.policies.nora import processor as P

    cfg = _cfg("nora_libero", folders, Path("/unused"), "policy.keep_norm_stats=true")
    policy = registry.build(cfg, _stats(folders))
    st = NORM_STATS["libero_goal_no_noops"]["action"]
    chunk = np.array([[[0.0] * 6 + [1.0]], [[1.0] * 6 + [-1.0]]])  # (B=2, H=1, 7) normalised
    env = policy.processor.postprocess(chunk)
    assert np.allclose(env[0, 0, :6], 0.5 * (np.array(st["q99"][:6]) + np.array(st["q01"][:6])))
    assert np.allclose(env[1, 0, :6], st["q99"][:6])
    assert env[:, 0, -1].tolist() == [-1.0, 1.0]  # NORA 1 (open) -> -1; 0 (close) -> +1
    assert np.allclose(env, P.chunk_to_env(P.unnormalize(chunk, st)))  # NORA's own rule


# -- save / load / resume ----------------------------------------------------------------------
def test_save_load_predicts_the_same_and_resume_continues(folders, tmp_path):
    from vlatune.policies import load as load_any
    from vlatune.policies import registry

    cfg = _cfg("nora_long_libero", folders, tmp_path, "policy.max_new_tokens=40")
    policy = registry.build(cfg, _stats(folders))
    torch.manual_seed(0)
    with torch.no_grad():  # as after training: adapters away from their init
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    policy.eval().save(tmp_path / "checkpoint-4" / "policy")
    back = load_any(tmp_path / "checkpoint-4" / "policy")
    assert type(back).__name__ == "NoraFamilyPolicy" and back.lora is not None
    obs = random_observation(("agentview",), seed=1)
    batch = policy.observation_batch([obs])
    with torch.no_grad():
        la = policy.model(**policy._model_inputs(batch, False)).logits
        lb = back.eval().model(**back._model_inputs(dict(batch), False)).logits
    assert torch.allclose(la, lb, atol=1e-4)  # merged - B A: equal to float rounding
    a, b = policy.predict_chunk(batch), back.predict_chunk(dict(batch))
    assert policy.last_action_ids == back.last_action_ids
    assert torch.equal(a, b) and a.shape == (1, 5, 7)
    act = back.predict(obs)
    assert act.shape == (5, 7) and set(np.unique(act[:, -1])) <= {-1.0, 1.0}
    assert set(back.fallbacks()) >= {"undecodable_tokens"}

    # resume: 2 steps, then the same run to 3
    _train("nora_long_libero", folders, tmp_path / "run")
    summary = _train("nora_long_libero", folders, tmp_path / "run", "train.max_steps=3")
    assert summary["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_released_folder_loads_with_its_norm_stats(folders):
    from vlatune.policies import load as load_any

    policy = load_any(folders["nora"])
    assert type(policy).__name__ == "NoraFamilyPolicy" and policy.cfg.horizon == 1
    assert policy.processor.steps[1].source == "NORA norm_stats.json"
    assert policy.conventions["cameras"] == ["agentview"]
    obs = {
        "images": {"agentview": np.zeros((32, 32, 3), dtype=np.uint8)},
        "state": np.zeros(8),
        "instruction": "go",
    }
    policy.cfg = type(policy.cfg)(**{**policy.cfg.to_json(), "max_new_tokens": 4})
    act = policy.predict(obs)  # a random model: whatever it decodes, or the safe action, counted
    assert act.shape == (1, 7)
    if policy.fallbacks()["undecodable_tokens"]:
        assert act[0].tolist() == pytest.approx([0, 0, 0, 0, 0, 0, -1], abs=1e-6)


# -- one LIBERO episode ------------------------------------------------------------------------
@pytest.mark.sim
def test_trained_nora_runs_one_libero_episode(folders, tmp_path):
    _train("nora_long_libero", folders, tmp_path / "run", "policy.max_new_tokens=40")
    one_libero_episode(tmp_path / "run" / "checkpoint-2", tmp_path / "eval", max_steps=10, replan=5)


# -- the FAST round trip benchmark (README: NORA's round trip on LIBERO chunks) ---------------
def test_fast_roundtrip_benchmark_runs_on_libero_hdf5(folders, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_fast_roundtrip", REPO / "benchmarks" / "fast_roundtrip.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fast_roundtrip.json"
    result = bench.main(["--data", str(folders["data"]), "--vocab", "256", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["horizon"] for r in result["rows"]] == [1, 5]
    for r in result["rows"]:
        assert r["chunks"] > 0 and r["undecodable"] == 0 and r["gripper_mismatches"] == 0
        assert r["tokens_mean"] >= 1
        # FAST's own loss stays within its rounding bound on every continuous dimension
        assert all(
            e <= b + 1e-9
            for e, b in zip(r["fast_max_abs_per_dim"], r["bound_per_dim"], strict=True)
        )
        assert r["total_max_abs"] >= r["fast_max_abs"] - 1e-12

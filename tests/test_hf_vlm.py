"""The `hf-vlm` backbone on a tiny random-weight Qwen2.5-VL (the real NORA architecture, built
from its config) with the `tokens` head (FAST / bins, NORA's `<robot_action_k>` tokens), the
continuous heads, reasoning targets, LoRA adapter-only saving and merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_fixtures import tiny_qwen2_5_vl
from test_policies import CAMS, STATS, fixed_batch, observation
from vlatune.config import Config
from vlatune.policies import VLAPolicy, build_policy
from vlatune.policies.composed.hf_vlm import ACTION_TOKEN


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen"))


def make(folder, head: str, **policy) -> VLAPolicy:
    cfg = Config.model_validate(
        {
            "data": {"image_size": 56, "cameras": CAMS, "action_horizon": 4},
            "policy": {
                "backbone": "hf-vlm",
                "model_id": str(folder),
                "head": head,
                "heads": {"mlp_dim": 32, "expert_dim": 32, "expert_layers": 1},
                **policy,
            },
        }
    )
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def chunks():
        return [np.cumsum(rng.normal(0, 0.2, (4, 7)), 0).clip(-1, 1) for _ in range(300)]

    return build_policy(cfg, STATS, chunks=chunks)


def train(policy, batch, steps: int, lr: float = 1e-2) -> list[dict]:
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    log = []
    for _ in range(steps):
        torch.manual_seed(1)
        out = policy(batch)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        log.append({k: float(v.detach()) for k, v in out.items()})
    return log


def env_targets(policy, batch) -> np.ndarray:
    """The batch's normalised action chunks in env units, gripper binarised (what predict returns)."""
    a = batch["actions"].numpy().astype(np.float64)
    env = policy.action_norm.inverse(np.clip(a, -1, 1))
    env[..., -1] = np.where(a[..., -1] > 0, 1.0, -1.0)
    return env


def two_obs_batch():
    """A batch of 2 whose images, states and instruction equal observation(0) / observation(1)
    after the policy's own preprocessing (the images are resized to 56 px by predict)."""
    from vlatune.data.transforms import ImageTransform

    obs = [observation(0), observation(1)]
    tf = ImageTransform(56, crop_area=1.0, train=False)
    batch = fixed_batch(2)
    batch["images"] = {c: torch.stack([tf(o["images"][c]) for o in obs]) for c in CAMS}
    batch["instruction"] = [o["instruction"] for o in obs]
    batch["state"] = torch.from_numpy(np.stack([o["state"] for o in obs])).float()
    return obs, batch


@pytest.mark.parametrize("tokenizer", ["fast", "bins"])
def test_tokens_head_learns_and_decodes_with_kv_cache(qwen, tokenizer, tmp_path):
    policy = make(qwen, "tokens", action_tokenizer=tokenizer, fast_vocab=128)
    assert policy.backbone.tokenizer.convert_tokens_to_ids(ACTION_TOKEN.format(0)) is not None
    obs, batch = two_obs_batch()
    if tokenizer == "fast":  # targets FAST represents well: smooth chunks
        t = torch.linspace(-0.5, 0.5, 4)[None, :, None]
        batch["actions"] = (t * torch.tensor([[[1, -1, 0.5, 0, 0.2, -0.3, 1]]])).repeat(2, 1, 1)
        batch["actions"][1] *= -1
    log = train(policy, batch, 100, lr=3e-3)
    assert log[-1]["action_ce"] < 0.2 * log[0]["action_ce"]
    assert log[-1]["token_accuracy"] == 1.0
    # the policy must reproduce its training targets through greedy decoding with the cache
    pred = policy.predict(obs)
    assert pred.shape == (2, 4, 7)
    assert policy.head.decode_failures == 0
    tol = (
        policy.action_tokenizer.quantization_bound(4)
        if tokenizer == "fast"
        else policy.action_tokenizer.quantization_bound()
    )
    scale = (policy.action_norm.high - policy.action_norm.low) / 2
    np.testing.assert_allclose(pred, env_targets(policy, batch), atol=tol * scale.max() + 1e-6)
    # folder round trip: identical predictions; the tokenizer folder travels with the policy
    policy.save(tmp_path / "p")
    if tokenizer == "fast":
        assert (tmp_path / "p" / "action_tokenizer" / "processor_config.json").is_file()
    again = VLAPolicy.from_pretrained(tmp_path / "p")
    np.testing.assert_array_equal(again.predict(obs), pred)


def test_invalid_token_sequence_gives_the_safe_action(qwen):
    policy = make(qwen, "tokens", action_tokenizer="bins", safe_action=[0.0] * 7)
    bb = policy.backbone
    text_token = bb.tokenizer("pick", add_special_tokens=False)["input_ids"][0]
    rows = torch.tensor(
        [
            [*bb.action_ids[:5].tolist(), bb.eos_id, bb.eos_id, bb.eos_id],  # 5 of 28 values
            [text_token] * 8,  # no action tokens at all
        ]
    )
    chunks = policy.head.decode(bb, rows)
    assert policy.head.decode_failures == 2
    expected = policy.action_norm(np.zeros((1, 7)))[0]
    expected[-1] = 0.0
    np.testing.assert_allclose(chunks[0], np.broadcast_to(expected, (4, 7)), atol=1e-6)


@pytest.mark.parametrize("head", ["l1", "diffusion", "flow"])
def test_continuous_heads_on_the_vlm(qwen, head, tmp_path):
    policy = make(qwen, head)
    batch = fixed_batch(4)
    log = train(policy, batch, 25, lr=3e-3)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    torch.manual_seed(3)
    pred = policy.predict([observation(0), observation(1)])
    assert pred.shape == (2, 4, 7) and np.isfinite(pred).all()
    policy.save(tmp_path / "p")
    again = VLAPolicy.from_pretrained(tmp_path / "p")
    torch.manual_seed(3)
    np.testing.assert_allclose(again.predict([observation(0), observation(1)]), pred, atol=1e-6)


def test_dropped_camera_leaves_the_prompt(qwen):
    policy = make(qwen, "l1")
    batch = fixed_batch(2)
    batch["image_mask"] = torch.tensor([[True, True], [True, False]])
    inputs = policy.with_vlm(batch)["vlm"]
    pad = policy.backbone.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_row = (inputs["input_ids"] == pad).sum(1).tolist()
    assert per_row[0] == 2 * per_row[1] > 0
    assert inputs["image_grid_thw"].shape[0] == 3
    assert torch.isfinite(policy(batch)["loss"])


def test_lora_adapter_only_save_and_exact_merge(qwen, tmp_path):
    policy = make(
        qwen, "tokens", action_tokenizer="bins", lora={"r": 4, "alpha": 8, "dropout": 0.0}
    )
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # the vision tower stays frozen
    obs, batch = two_obs_batch()
    train(policy, batch, 40, lr=3e-3)
    pred = policy.predict(obs)
    policy.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert config["weights"] == "adapter" and config["base_model"] == str(qwen)
    full = sum(p.numel() for p in policy.parameters()) * 4
    assert (tmp_path / "adapter" / "model.safetensors").stat().st_size < 0.8 * full
    again = VLAPolicy.from_pretrained(tmp_path / "adapter")
    np.testing.assert_array_equal(again.predict(obs), pred)
    merged = policy.merge_lora()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    policy.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        a = policy(batch)["action_ce"]
        torch.manual_seed(0)
        b = merged(batch)["action_ce"]
    assert abs(float(a) - float(b)) < 1e-4
    np.testing.assert_array_equal(merged.predict(obs), pred)


def test_reasoning_dropout_rate_and_generation(qwen):
    policy = make(
        qwen,
        "tokens",
        action_tokenizer="bins",
        reasoning={
            "enabled": True,
            "dropout": 0.3,
            "flow_tokens": 16,
            "inference": "generate",
            "max_new_tokens": 40,
        },
    )
    head, bb = policy.head, policy.backbone
    B = 2000
    batch = {
        "actions": torch.zeros(B, 4, 7),
        "reasoning": [{"PLAN": "pick", "MOVE": "move left"}] * B,
        "flow_tokens": [[1, 2, 3]] * B,
    }
    torch.manual_seed(0)
    kept = [len(r) > 0 for r in head._reasoning(bb, batch, B)]
    assert abs(np.mean(kept) - 0.7) < 0.04
    flows = [r for r in head._reasoning(bb, batch, 4) if r]
    assert all(r[-3:] == [bb.flow_ids[k] for k in (1, 2, 3)] for r in flows)
    # with no dropout the model learns reasoning + actions and writes both at inference
    policy.cfg.reasoning.dropout = 0.0
    obs, small = two_obs_batch()
    obs[1]["instruction"] = small["instruction"][1] = "open the drawer"
    small["reasoning"] = [{"MOVE": "move left"}, {"MOVE": "move up"}]
    small["flow_tokens"] = None
    log = train(policy, small, 100, lr=3e-3)
    assert log[-1]["cot_loss"] < 0.2 * log[0]["cot_loss"]
    pred = policy.predict(obs)
    assert [t.strip() for t in policy.head.last_text] == ["MOVE: move left", "MOVE: move up"]
    assert policy.head.decode_failures == 0
    np.testing.assert_allclose(
        pred, env_targets(policy, small), atol=policy.action_tokenizer.quantization_bound() * 2
    )


def test_chat_template_fallback_matches(qwen, tmp_path):
    """A tokenizer saved without its chat template gets Qwen's template written out."""
    policy = make(qwen, "l1")
    prompt = policy.backbone.prompt
    with_template = prompt.text("pick up the soup", [4])
    prompt.tokenizer.chat_template = None
    assert prompt.text("pick up the soup", [4]).endswith(
        with_template.split("<|im_start|>user\n", 1)[1]
    )


def test_unsupported_model_and_missing_folder_are_clear(qwen, tmp_path):
    from transformers import LlavaConfig

    other = tmp_path / "other"
    other.mkdir()
    for f in qwen.iterdir():
        if f.name != "model.safetensors":
            (other / f.name).write_bytes(f.read_bytes())
    LlavaConfig().save_pretrained(other)
    with pytest.raises(ValueError, match="'llava' model.*supports model types"):
        make(other, "l1")
    with pytest.raises(FileNotFoundError, match="policy.model_id"):
        make(tmp_path / "nowhere", "l1")
    with pytest.raises(ValueError, match="hf-vlm"):
        Config.model_validate({"policy": {"head": "tokens", "action_tokenizer": "bins"}})


def test_gradient_checkpointing_gives_the_same_gradients(qwen):
    policy = make(qwen, "l1")
    batch = fixed_batch(2)
    policy.train()
    torch.manual_seed(0)
    policy(batch)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    assert policy.enable_gradient_checkpointing() == "on the VLM"
    model = policy.backbone.model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    torch.manual_seed(0)
    policy(batch)["loss"].backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(policy.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["paligemma", "smolvlm"])
def test_other_vlm_families(family, tmp_path):
    """PaliGemma and SmolVLM: continuous and token heads train, generate and round-trip."""
    from hf_fixtures import tiny_paligemma, tiny_smolvlm

    folder = (tiny_paligemma if family == "paligemma" else tiny_smolvlm)(tmp_path / family)
    obs, batch = two_obs_batch()
    batch["image_mask"] = torch.tensor([[True, True], [True, False]])  # a dropped camera
    policy = make(folder, "tokens", action_tokenizer="bins")
    log = train(policy, batch, 60, lr=3e-3)
    assert log[-1]["action_ce"] < 0.3 * log[0]["action_ce"]
    pred = policy.predict(obs)
    assert pred.shape == (2, 4, 7) and policy.head.decode_failures == 0
    policy.save(tmp_path / "p")
    np.testing.assert_array_equal(VLAPolicy.from_pretrained(tmp_path / "p").predict(obs), pred)
    flow = make(folder, "flow")
    log = train(flow, fixed_batch(4), 15, lr=3e-3)
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.parametrize("family", ["qwen", "paligemma"])
def test_film_conditions_the_vision_tower_on_the_instruction(qwen, family, tmp_path):
    """OFT's FiLM: zero-initialised (the tower is unchanged at first); once trained, the same
    images give different vision features under different instructions; it round-trips."""
    from hf_fixtures import tiny_paligemma

    folder = qwen if family == "qwen" else tiny_paligemma(tmp_path / "pg")
    policy = make(folder, "l1", film=True)
    plain = make(folder, "l1")
    missing, _ = policy.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("backbone.film.") for k in missing)
    batch = fixed_batch(2)
    torch.manual_seed(0)
    assert torch.allclose(policy(batch)["loss"], plain(batch)["loss"], atol=1e-6)
    train(policy, batch, 5, lr=1e-2)
    blocks, _ = policy.backbone._vision_blocks()
    seen = []
    blocks[-1].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    policy.eval()
    with torch.no_grad():
        for instruction in ("put the bowl on the plate", "open the top drawer of the cabinet"):
            policy(dict(batch, instruction=[instruction] * 2))
    assert seen[0].shape == seen[1].shape and not torch.allclose(seen[0], seen[1])
    obs = observation(0)
    policy.save(tmp_path / "p")
    np.testing.assert_allclose(
        VLAPolicy.from_pretrained(tmp_path / "p").predict(obs), policy.predict(obs), atol=1e-6
    )

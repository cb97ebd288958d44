"""The pi0 family (pi0, pi0.5): reference fixtures, released layout both ways, sizes, processor.

The fixture comparison runs `vlatune.policies.pi0.reference.check_reference` on
`$VLATUNE_REFERENCE_DIR/<pi0|pi05>` (default `<repo>/../shared/reference`), skipped with one
sentence when the folder is absent. The other tests build their own tiny models.

    $ .venv/bin/python -m pytest tests/test_pi0_family.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlatune.policies.pi0 import processor as P
from vlatune.policies.pi0.configuration import GemmaSpec, Pi0Config, VisionSpec, released_config
from vlatune.policies.pi0.convert import build_model, load_released, save_released
from vlatune.policies.pi0.modeling import count_parameters
from vlatune.policies.pi0.reference import check_reference

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference"
)


def _fixture(name: str) -> Path:
    folder = REFERENCE_DIR / name
    if not (folder / "config.json").is_file():
        pytest.skip(
            f"no {name} reference fixture at {folder} (set VLATUNE_REFERENCE_DIR to shared/reference)"
        )
    return folder


def _tiny(variant: str = "pi0", **kw) -> Pi0Config:
    base = dict(
        variant=variant,
        vlm=GemmaSpec(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=8),
        expert=GemmaSpec(width=24, depth=2, mlp_dim=40, num_heads=4, num_kv_heads=2, head_dim=8),
        vision=VisionSpec(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=7,
        ),
        vocab_size=64,
        image_size=28,
        num_cameras=2,
        state_dim=5,
        action_dim=3,
        chunk_size=6,
        n_action_steps=6,
        max_state_dim=12,
        max_action_dim=10,
    )
    base.update(kw)
    return Pi0Config(**base)


def _batch(cfg: Pi0Config, bsz: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [
        torch.rand(bsz, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
        for _ in range(cfg.num_cameras)
    ]
    img_masks = [torch.ones(bsz, dtype=torch.bool) for _ in range(cfg.num_cameras)]
    img_masks[-1][0] = False  # an absent camera in sample 0
    tokens = torch.randint(0, cfg.vocab_size, (bsz, 5), generator=g)
    token_masks = torch.ones(bsz, 5, dtype=torch.bool)
    token_masks[1, -2:] = False
    state = torch.randn(bsz, cfg.max_state_dim, generator=g) if cfg.variant == "pi0" else None
    actions = torch.randn(bsz, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return images, img_masks, tokens, token_masks, state, actions


# ---- the reference fixtures ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_reference_fixture(name):
    check_reference(_fixture(name))


@pytest.mark.parametrize("name", ["pi0_b", "pi05_b"])
def test_lerobot_fixture_at_other_sizes(name):
    """LeRobot-made fixtures with 3 layers, GQA, 2 cameras, 28 px, chunk 6 (tests/fixtures/pi0_variants)."""
    check_reference(REPO / "tests" / "fixtures" / "pi0_variants" / name)


def test_reference_check_fails_on_a_wrong_weight(tmp_path):
    """The comparison can fail: one perturbed expert weight breaks the loss match."""
    src = _fixture("pi0")
    dst = tmp_path / "pi0"
    shutil.copytree(src, dst)
    (dst / "model.safetensors").chmod(0o644)
    sd = load_file(str(dst / "model.safetensors"))
    key = "model.paligemma_with_expert.gemma_expert.model.layers.0.mlp.down_proj.weight"
    sd[key] = sd[key] * 1.01
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(AssertionError, match="loss_elementwise"):
        check_reference(dst)


# ---- released layout: round trip and strictness ---------------------------------------------------
@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_released_round_trip_is_bit_identical(name, tmp_path):
    src = _fixture(name)
    model, _ = load_released(src)
    save_released(model, tmp_path / "out")
    original = load_file(str(src / "model.safetensors"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for k, v in original.items():
        assert written[k].dtype == v.dtype and torch.equal(written[k], v), k
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out == cfg_in  # LeRobot's own config.json comes back unchanged
    again, _ = load_released(tmp_path / "out")  # sizes from the pi0_arch.json we wrote
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_round_trip_of_a_model_built_here(tmp_path):
    cfg = _tiny("pi05")
    model = build_model(cfg)
    save_released(model, tmp_path / "m")
    cfg_json = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg_json["type"] == "pi05" and cfg_json["output_features"]["action"]["shape"] == [3]
    again, _ = load_released(tmp_path / "m")
    assert again.cfg.model_dump(exclude={"lerobot_config"}) == cfg.model_dump(
        exclude={"lerobot_config"}
    )
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def _copy_with(tmp_path: Path, name: str, edit) -> Path:
    src = _fixture(name)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    sd = load_file(str(dst / "model.safetensors"))
    save_file(edit(sd), str(dst / "model.safetensors"))
    return dst


def test_missing_key_fails_naming_it(tmp_path):
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.k_proj.weight"
    dst = _copy_with(tmp_path, "pi0", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=r"missing 1: " + key.replace(".", r"\.")):
        load_released(dst)


def test_extra_key_fails_naming_it(tmp_path):
    key = "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.extra.weight"
    dst = _copy_with(tmp_path, "pi05", lambda sd: {**sd, key: torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected 1: " + key.replace(".", r"\.")):
        load_released(dst)
    other = "vision_encoder.weight"
    dst2 = _copy_with(tmp_path / "b", "pi05", lambda sd: {**sd, other: torch.zeros(2)})
    with pytest.raises(ValueError, match="model.vision_encoder.weight"):
        load_released(dst2)


def test_wrong_shape_fails_naming_key_and_shapes(tmp_path):
    key = "model.action_in_proj.weight"
    dst = _copy_with(tmp_path, "pi0", lambda sd: {**sd, key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"model\.action_in_proj\.weight has shape \(3, 3\)"):
        load_released(dst)


def test_openpi_converted_keys_load_with_lerobots_renames(tmp_path):
    """No `model.` prefix, pi0's `time_mlp_*` name and lm_head only: renamed as LeRobot does, reported."""

    def openpi_style(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("language_model.embed_tokens.weight"):
                continue
            k = k.removeprefix("model.").replace("action_time_mlp_", "time_mlp_")
            out[k] = v
        return out

    dst = _copy_with(tmp_path, "pi0", openpi_style)
    model, report = load_released(dst)
    assert report.tied_from_lm_head
    assert ("time_mlp_in.weight", "model.action_time_mlp_in.weight") in report.renamed
    assert len(report.renamed) == report.tensors - 1  # every key but the copied embed_tokens
    assert torch.equal(model.embed_tokens.weight, model.vlm_lm_head.weight)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"model\.safetensors not found.*found: config\.json"
    ):
        load_released(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="key 'type' is None"):
        load_released(tmp_path)


# ---- architecture at other sizes ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_cached_sampling_velocity_equals_joint_pass(variant):
    """The prefix KV cache gives the same velocity as one pass over prefix + suffix (2 cameras, GQA 2)."""
    torch.manual_seed(0)
    cfg = _tiny(variant)
    model = build_model(cfg).eval()
    for p in model.parameters():  # non-trivial norms / adaRMS
        if p.ndim == 1 or p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    images, img_masks, tokens, token_masks, state, actions = _batch(cfg)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        joint = model.velocity_joint(images, img_masks, tokens, token_masks, state, actions, t)
        pre_pad, cache = model.prefix_cache(images, img_masks, tokens, token_masks)
        cached = model.velocity(state, pre_pad, cache, actions, t)
    assert joint.shape == (2, cfg.chunk_size, cfg.max_action_dim)
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=1e-5)
    # and the suffix depends on the prefix: other tokens, other velocity
    with torch.no_grad():
        other = model.velocity_joint(
            images, img_masks, (tokens + 1) % cfg.vocab_size, token_masks, state, actions, t
        )
    assert not torch.allclose(other, joint)


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    cfg = _tiny("pi0")
    model = build_model(cfg)
    images, img_masks, tokens, token_masks, state, actions = _batch(cfg)
    noise, time = torch.randn_like(actions), torch.full((2,), 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(images, img_masks, tokens, token_masks, state, actions, noise, time).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (
        model.state_proj.weight.grad is not None
        and model.vision.post_layernorm.weight.grad is not None
    )


def test_bfloat16_keeps_vision_and_norms_float32():
    cfg = _tiny("pi05", num_cameras=1)
    model = build_model(cfg)
    model.set_precision("bfloat16")
    assert model.vlm_layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.expert_layers[0].input_layernorm.dense.weight.dtype == torch.float32
    assert model.vision.post_layernorm.weight.dtype == torch.float32
    assert model.action_in_proj.weight.dtype == torch.float32
    images, img_masks, tokens, token_masks, _, actions = _batch(cfg)
    loss = model(images, img_masks, tokens, token_masks, None, actions)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_released_size_parameter_count_on_meta():
    """Measured (meta device, no memory): pi0 3.24B parameters used, as openpi's ~3.3B."""
    c0 = count_parameters(released_config("pi0"))
    c5 = count_parameters(released_config("pi05"))
    assert c0["total_used"] == 3_238_048_528
    assert c5["total_used"] == 3_353_433_872
    assert c0["vision"] == 414_803_696 and c0["lm_heads_unused"] == 789_970_944


def test_released_config_at_depth_one_runs_on_cpu():
    """Released widths, heads, 224 px, chunk 50, dims 32; depth 1 everywhere and a 1,024-token
    vocabulary (the full embedding tables alone would be 5 GB in float32)."""
    cfg = released_config("pi0")
    cfg = cfg.model_copy(
        update=dict(
            vlm=cfg.vlm.model_copy(update={"depth": 1}),
            expert=cfg.expert.model_copy(update={"depth": 1}),
            vision=cfg.vision.model_copy(update={"num_hidden_layers": 1}),
            vocab_size=1024,
        )
    )
    assert (cfg.vlm.width, cfg.expert.width, cfg.vision.hidden_size, cfg.image_size, cfg.chunk_size) == (
        2048, 1024, 1152, 224, 50,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = [torch.rand(1, 3, 224, 224) * 2 - 1]
    tokens = torch.randint(0, 1024, (1, cfg.tokenizer_max_length))
    with torch.no_grad():
        loss = model(images, [torch.ones(1, dtype=torch.bool)], tokens, torch.ones_like(tokens, dtype=torch.bool),
                     torch.randn(1, 32), torch.randn(1, 50, 32))  # fmt: skip
        chunk = model.sample_actions(images, [torch.ones(1, dtype=torch.bool)], tokens,
                                     torch.ones_like(tokens, dtype=torch.bool), torch.randn(1, 32), num_steps=2)  # fmt: skip
    assert loss.shape == (1, 50, 32) and torch.isfinite(loss).all()
    assert chunk.shape == (1, 50, 32) and torch.isfinite(chunk).all()


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="joint attention needs the same head_dim"):
        _tiny(
            expert=GemmaSpec(width=24, depth=2, mlp_dim=40, num_heads=4, num_kv_heads=2, head_dim=4)
        )
    with pytest.raises(ValueError, match="key 'type' is 'act'"):
        Pi0Config.from_lerobot({"type": "act"})
    with pytest.raises(ValueError, match="unknown Gemma variant 'gemma_7b'"):
        Pi0Config.from_lerobot({"type": "pi0", "paligemma_variant": "gemma_7b"})
    cfg = Pi0Config.from_lerobot({"type": "pi05"})
    assert (cfg.variant, cfg.tokenizer_max_length, cfg.vlm.width, cfg.expert.width) == (
        "pi05",
        200,
        2048,
        1024,
    )


# ---- processor ------------------------------------------------------------------------------------------
def test_resize_with_pad_centres_and_keeps_aspect():
    img = torch.ones(
        1, 1, 2, 4
    )  # wide: 2 x 4 -> 2 x 4 inside a 4 x 4 frame, one black row above and below
    out = P.resize_with_pad(img, 4)
    expected = torch.tensor(
        [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32
    )
    assert torch.equal(out[0, 0], expected)
    same = torch.rand(2, 3, 4, 4)
    assert P.resize_with_pad(same, 4) is same
    assert torch.equal(
        P.to_siglip_range(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0])
    )


def test_padding_and_unpadding():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(P.pad_vector(x, 5), torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0]]))
    assert torch.equal(
        P.unpad_actions(torch.arange(10.0).view(1, 1, 10), 3), torch.tensor([[[0.0, 1.0, 2.0]]])
    )
    with pytest.raises(ValueError, match="does not fit max dim 2"):
        P.pad_vector(x, 2)


def test_pi05_state_bins_and_prompt():
    state = np.array([[-1.0, -0.99, 0.0, 0.999, 1.0]])
    assert P.discretize_state(state).tolist() == [[0, 1, 128, 255, 255]]
    prompts = P.pi05_prompts(["pick_up the\nsoup "], state)
    assert prompts == ["Task: pick up the soup, State: 0 1 128 255 255;\nAction: "]
    assert P.pi0_prompts(["open the drawer", "done\n"]) == ["open the drawer\n", "done\n"]


def test_tokenize_pads_right_to_max_length():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "open": 2, "the": 3, "drawer": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    ids, mask = P.tokenize(fast, ["open the drawer", "open the door the drawer the"], 5)
    assert ids.tolist() == [[2, 3, 4, 0, 0], [2, 3, 1, 3, 4]]
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool


# ---- policy interface, LoRA ------------------------------------------------------------------------------
def _policy_batch(cfg: Pi0Config) -> dict:
    images, img_masks, tokens, token_masks, state, actions = _batch(cfg)
    return dict(
        images=images,
        img_masks=img_masks,
        tokens=tokens,
        token_masks=token_masks,
        state=state,
        actions=actions,
    )


def test_lora_trains_only_adapters_and_merges_to_the_same_outputs(tmp_path):
    from vlatune.policies.pi0.policy import Pi0Policy, lora_targets

    torch.manual_seed(0)
    cfg = _tiny("pi0")
    policy = Pi0Policy(build_model(cfg))
    targets = lora_targets(policy.model)
    assert (
        "vlm_layers.0.self_attn.q_proj" in targets and "expert_layers.1.self_attn.o_proj" in targets
    )
    assert (
        "state_proj" in targets
        and "action_time_mlp_in" in targets
        and "vlm_layers.0.mlp.up_proj" not in targets
    )
    policy.apply_lora(r=4, alpha=8)
    total, trainable = policy.num_parameters()
    assert 0 < trainable < total / 5
    frozen_before = policy.model.vision.post_layernorm.weight.clone()
    batch = _policy_batch(cfg)
    batch["noise"], batch["time"] = torch.randn_like(batch["actions"]), torch.full((2,), 0.4)
    opt = torch.optim.AdamW(policy.param_groups(lr=1e-2))
    for _ in range(2):
        loss, metrics = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(policy.model.vision.post_layernorm.weight, frozen_before)
    with pytest.raises(ValueError, match="merge_lora"):
        policy.save(tmp_path / "x")
    policy.eval()
    with torch.no_grad():
        before = policy.compute_loss(batch)[0]
        policy.merge_lora()
        after = policy.compute_loss(batch)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    policy.save(tmp_path / "merged")
    again, _ = load_released(tmp_path / "merged")
    torch.testing.assert_close(
        Pi0Policy(again).eval().compute_loss(batch)[0], before, atol=1e-5, rtol=1e-5
    )


def test_predict_chunk_and_freezing():
    from vlatune.policies.pi0.policy import Pi0Policy

    cfg = _tiny("pi05")
    policy = Pi0Policy(build_model(cfg)).freeze(vlm=True)
    assert (
        not policy.model.embed_tokens.weight.requires_grad
        and not policy.model.vision.post_layernorm.weight.requires_grad
    )
    assert policy.model.expert_layers[0].self_attn.q_proj.weight.requires_grad
    batch = _policy_batch(cfg)
    chunk = policy.predict_chunk(batch)
    assert chunk.shape == (2, cfg.chunk_size, cfg.action_dim)
    policy.freeze(vision=True)
    for p in policy.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="everything is frozen"):
        policy.param_groups(lr=1e-4)


# ---- the GPU benchmark, at reduced size on the CPU ---------------------------------------------------------
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pi0", REPO / "benchmarks/gpu/pi0.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pi0.json"
    result = bench.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for variant in ("pi0", "pi05"):
        full, lora, sample = (result["variants"][variant][k] for k in ("full", "lora", "sample"))
        assert full["trainable"] == full["parameters"] > 0
        assert 0 < lora["trainable"] < lora["parameters"] / 5  # only the adapters train
        assert (
            full["samples_per_s"] > 0
            and lora["step_s_median"] > 0
            and full["finite"]
            and lora["finite"]
        )
        assert sample["steps"] == 10 and sample["chunk"] == [8, 32] and sample["finite"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = _tiny("pi05")
    model = build_model(cfg).train()
    images, img_masks, tokens, token_masks, _, actions = _batch(cfg)
    noise, time = torch.randn_like(actions), torch.full((2,), 0.7)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        loss = model(images, img_masks, tokens, token_masks, None, actions, noise, time).mean()
        loss.backward()
        grads.append(
            (loss.detach(), model.expert_layers[0].input_layernorm.dense.weight.grad.clone())
        )
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_model_inputs_adds_empty_cameras_and_detects_folders(tmp_path):
    from vlatune.policies.pi0.convert import is_released_folder

    out = P.model_inputs([torch.ones(2, 3, 4, 4)], torch.ones(2, 3), None, 4, 5, 6, empty_cameras=1)
    assert torch.equal(out["images"][0], torch.ones(2, 3, 4, 4)) and torch.equal(
        out["images"][1], -torch.ones(2, 3, 4, 4)
    )
    assert [m.tolist() for m in out["img_masks"]] == [[True, True], [False, False]]
    assert out["state"].tolist() == [[1, 1, 1, 0, 0]] * 2 and "actions" not in out
    assert not is_released_folder(tmp_path)
    save_released(build_model(_tiny("pi0")), tmp_path / "m")
    assert is_released_folder(tmp_path / "m")

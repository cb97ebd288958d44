"""The `rdt` backbone (SigLIP image tokens + T5 instruction tokens) with the diffusion
transformer head, precomputed language embeddings, saving without the text encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_fixtures import tiny_siglip_vision, tiny_t5_encoder
from test_policies import CAMS, STATS, fixed_batch, observation
from vlatune.config import Config
from vlatune.policies import VLAPolicy, build_policy


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdt")
    return tiny_siglip_vision(root / "siglip"), tiny_t5_encoder(root / "t5")


def make(encoders, cache, **policy) -> VLAPolicy:
    siglip, t5 = encoders
    cfg = Config.model_validate(
        {
            "data": {"image_size": 32, "cameras": CAMS, "action_horizon": 4},
            "policy": {
                "backbone": "rdt",
                "model_id": str(siglip),
                "head": "diffusion",
                "rdt": {"text_model_id": str(t5), "dim": 32, "language_cache": str(cache)},
                "heads": {
                    "expert": "cross_attention",
                    "expert_dim": 32,
                    "expert_layers": 1,
                    "train_steps": 1000,
                    "inference_steps": 5,
                    "sampler": "dpm++",
                },
                **policy,
            },
        }
    )
    torch.manual_seed(0)
    return build_policy(cfg, STATS)


def test_rdt_trains_with_precomputed_language_and_round_trips(encoders, tmp_path):
    cache = tmp_path / "lang"
    policy = make(encoders, cache)
    bb = policy.backbone
    assert not any(p.requires_grad for p in bb.vision.parameters())  # frozen SigLIP
    batch = fixed_batch(4)
    batch["images"] = {c: v[:, :, :32, :32].contiguous() for c, v in batch["images"].items()}
    texts = sorted(set(batch["instruction"]))
    assert bb.encode_texts(texts) == 2
    bb.release_text_encoder()
    assert bb._text_encoder is None and len(list(cache.glob("*.safetensors"))) == 2
    # a second policy finds the embeddings on disk and never loads T5
    other = make(encoders, cache)
    assert other.backbone.encode_texts(texts) == 0 and other.backbone._text_encoder is None
    torch.testing.assert_close(other.backbone.language[texts[0]], bb.language[texts[0]])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)
        out = policy(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert bb._text_encoder is None  # trained without the text encoder
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    obs = observation(0)
    torch.manual_seed(2)
    pred = policy.predict(obs)
    assert pred.shape == (4, 7)
    policy.save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["spec"]["text_dim"] == 32
    again = VLAPolicy.from_pretrained(tmp_path / "p")
    assert obs["instruction"] in again.backbone.language  # travels with the policy
    torch.manual_seed(2)
    np.testing.assert_allclose(again.predict(obs), pred, atol=1e-5)
    assert again.backbone._text_encoder is None


def test_rdt_lora_on_the_vision_tower(encoders, tmp_path):
    policy = make(encoders, tmp_path / "lang", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.vision.") and "lora_" in n for n in trainable)
    assert not any(n.startswith("backbone.vision.") and "lora_" not in n for n in trainable)
    assert "backbone.text_proj.weight" in trainable and any(
        n.startswith("head.") for n in trainable
    )
    policy.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["weights"] == "adapter"
    again = VLAPolicy.from_pretrained(tmp_path / "a")
    torch.manual_seed(0)
    a = policy.predict(observation(0))
    torch.manual_seed(0)
    np.testing.assert_allclose(again.predict(observation(0)), a, atol=1e-5)


def test_rdt_needs_a_diffusion_or_flow_head(encoders, tmp_path):
    with pytest.raises(ValueError, match="diffusion or flow"):
        make(encoders, tmp_path, head="l1")

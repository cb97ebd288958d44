"""Policies: every head learns on a fixed batch, predicts env-unit chunks, saves and loads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vlatune.config import Config, OptimConfig
from vlatune.eval.policies import check_conventions, load_policy
from vlatune.policies import VLAPolicy, build_policy
from vlatune.policies.composed.energy import EnergyModel, infonce

CAMS = ["agentview", "wrist"]
STATS = {
    "action": {"q01": [-0.5] * 6 + [-1], "q99": [0.5] * 6 + [1]},
    "state": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
}


def make_policy(head: str, **policy) -> VLAPolicy:
    cfg = Config.model_validate(
        {
            "data": {"image_size": 64, "cameras": CAMS, "action_horizon": 4},
            "policy": {
                "head": head,
                "tiny": {"dim": 32, "layers": 1, "heads": 2},
                "heads": {"mlp_dim": 32, "expert_dim": 32, "expert_layers": 1},
                **policy,
            },
        }
    )
    torch.manual_seed(0)
    return build_policy(cfg, STATS)


def fixed_batch(B: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "images": {
            c: torch.randint(0, 255, (B, 3, 64, 64), generator=g, dtype=torch.uint8) for c in CAMS
        },
        "image_mask": torch.ones(B, 2, dtype=torch.bool),
        "state": torch.rand(B, 8, generator=g) * 2 - 1,
        "actions": torch.rand(B, 4, 7, generator=g) * 2 - 1,
        "action_mask": torch.tensor([[True] * 4] * (B - 1) + [[True, True, False, False]]),
        "instruction": ["put the bowl on the plate"] * (B // 2)
        + ["open the drawer"] * (B - B // 2),
    }


def observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for c in CAMS},
        "state": rng.uniform(-1, 1, 8),
        "instruction": "put the bowl on the plate",
    }


@pytest.mark.parametrize("head", ["l1", "l1:per_step", "diffusion", "flow"])
def test_head_learns_predicts_and_round_trips(head, tmp_path):
    head, _, queries = head.partition(":")
    heads = {"mlp_dim": 32, "expert_dim": 32, "expert_layers": 1}
    policy = make_policy(head, heads={**heads, "queries": queries} if queries else heads)
    if head == "l1":  # OFT's H x A query tokens, or one per timestep
        assert policy.head.query.shape[0] == (4 if queries == "per_step" else 4 * 7)
    batch = fixed_batch()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        torch.manual_seed(1)  # the same noise / times each step: the loss must fall
        out = policy(batch)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses

    one = policy.predict(observation())
    assert one.shape == (4, 7) and one.dtype == np.float64
    assert set(np.unique(one[:, -1])) <= {-1.0, 1.0}  # gripper in the env convention
    assert np.all(np.abs(one[:, :6]) <= 0.5 + 1e-9)  # inside the training range (q99 clip)
    many = policy.predict([observation(0), observation(1), observation(2)])
    assert many.shape == (3, 4, 7)

    policy.save(tmp_path / "p")
    loaded = VLAPolicy.from_pretrained(tmp_path / "p")
    torch.manual_seed(5)
    a = policy.predict(observation())
    torch.manual_seed(5)
    b = loaded.predict(observation())
    np.testing.assert_array_equal(a, b)
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["conventions"]["gripper"] == "-1_open"
    assert saved["conventions"]["image_orientation"] == "upright"
    assert saved["spec"]["horizon"] == 4
    if queries:
        assert loaded.head.query.shape == policy.head.query.shape


def test_padding_mask_removes_loss():
    policy = make_policy("l1")
    batch = fixed_batch()
    base = float(policy(batch)["loss"])
    batch["actions"][-1, 2:] = 100.0  # padded steps: whatever they hold costs nothing
    assert float(policy(batch)["loss"]) == pytest.approx(base)


def test_energy_infonce_matches_hand_computation():
    E = torch.tensor([[0.1, 1.0, 2.0], [0.5, -0.2, 0.3], [1.5, 0.0, 0.4]])
    tau = 0.5
    loss, metrics = infonce(E, tau)
    expected = 0.0
    for i in range(3):
        logits = [-e / tau for e in E[i].tolist()]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert float(loss) == pytest.approx(expected / 3, rel=1e-6)
    assert float(metrics["energy_pos"]) == pytest.approx((0.1 - 0.2 + 0.4) / 3)
    assert float(metrics["energy_neg"]) == pytest.approx((1.0 + 2.0 + 0.5 + 0.3 + 1.5 + 0.0) / 6)


def test_energy_model_trains_and_corrects():
    torch.manual_seed(0)
    model = EnergyModel(hidden=64, context_dim=8, horizon=2, action_dim=3)
    h = torch.randn(16, 8)
    a = torch.tanh(h[:, :6]).view(16, 2, 3)  # actions determined by the context
    E = model.pairwise(h, a)
    assert E.shape == (16, 16)
    assert torch.allclose(E.diagonal(), model(h, a), atol=1e-6)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(100):
        loss, _ = infonce(model.pairwise(h, a), tau=1.0)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    noisy = a + 0.3 * torch.randn_like(a)
    fixed = model.correct(h, noisy, alpha=0.05, steps=20, max_step=0.05)
    assert float(model(h, fixed).mean()) < float(model(h, noisy).mean())
    assert float((fixed - noisy).abs().max()) <= 20 * 0.05 + 1e-6


def test_energy_policy_groups_and_freeze():
    policy = make_policy("l1", energy={"enabled": True, "lr": 1e-3, "warmup_steps": 7})
    groups = policy.param_groups(OptimConfig(lr=1e-4, weight_decay=0.01))
    energy = [g for g in groups if g["name"] == "energy"]
    assert energy and energy[0]["lr"] == 1e-3 and energy[0]["warmup_steps"] == 7
    assert all(g["lr"] == 1e-4 and "warmup_steps" not in g for g in groups if g is not energy[0])
    out = policy(fixed_batch())
    assert {"energy_loss", "energy_pos", "energy_neg"} <= set(out)
    loss, metrics = policy.compute_loss(fixed_batch())  # the policy interface
    assert loss.requires_grad and set(metrics) == set(out)
    assert float(metrics["loss"]) == pytest.approx(float(loss))
    frozen = make_policy("l1", freeze=["backbone.conv.*"])
    assert not any(
        p.requires_grad for n, p in frozen.named_parameters() if n.startswith("backbone.conv.")
    )
    assert all(p.requires_grad for n, p in frozen.named_parameters() if n.startswith("head."))
    with pytest.raises(ValueError, match="matches no parameter"):
        make_policy("l1", freeze=["nothing.*"])


def test_eval_loads_policy_folders(tmp_path):
    policy = make_policy("l1")
    policy.save(tmp_path / "p")
    loaded = load_policy(str(tmp_path / "p"))
    check_conventions(loaded)  # upright, -1_open, libero_8d, 7-d actions
    d = loaded.describe()
    assert d["head"] == "l1" and len(d["weights_sha256"]) == 16
    (tmp_path / "p" / "normalization.json").unlink()
    with pytest.raises(FileNotFoundError, match="normalization.json"):
        VLAPolicy.from_pretrained(tmp_path / "p")


def test_observation_errors_are_clear():
    policy = make_policy("l1")
    obs = observation()
    del obs["images"]["wrist"]
    with pytest.raises(KeyError, match="wrist"):
        policy.predict(obs)
    obs = observation()
    obs["state"] = np.zeros(9)
    with pytest.raises(ValueError, match="9 dims"):
        policy.predict(obs)


def test_lora_trains_adapters_only_and_merges_exactly(tmp_path):
    policy = make_policy("l1", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any(
        n.startswith("backbone.") and "lora_" not in n and "state_proj" not in n for n in trainable
    )
    assert any(n.startswith("head.") for n in trainable)  # heads fully trained
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    batch = fixed_batch()
    for _ in range(5):  # make the adapters non-zero
        loss = policy(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    obs = [observation(0), observation(1)]
    before = policy.predict_normalized(obs)
    policy.save(tmp_path / "lora")
    reloaded = VLAPolicy.from_pretrained(tmp_path / "lora")
    torch.testing.assert_close(reloaded.predict_normalized(obs), before)
    merged = reloaded.merge_lora()
    assert merged.cfg.lora is None
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(merged.predict_normalized(obs), before, atol=1e-5, rtol=1e-4)
    merged.save(tmp_path / "merged")
    plain = VLAPolicy.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(plain.predict_normalized(obs), before, atol=1e-5, rtol=1e-4)

"""The `rdt` family (released RDT-1B): reference fixture, released layout, strictness, full size.

The fixture folder is `$VLATUNE_REFERENCE_DIR/rdt` (default `<repo>/../shared/reference/rdt`);
tests that need it skip when it is absent. Everything else builds tiny models here.

    $ .venv/bin/python -m pytest tests/test_rdt_family.py -q
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from vlatune.policies.rdt import modeling
from vlatune.policies.rdt.configuration import RDTConfig
from vlatune.policies.rdt.convert import (
    PICKLE_NAME,
    SAFETENSORS_NAME,
    CheckpointKeyError,
    load_released,
    read_released_state_dict,
    save_released,
)
from vlatune.policies.rdt.modeling import RDTRunner
from vlatune.policies.rdt.reference import check_reference

REPO = Path(__file__).resolve().parents[1]
REF = (
    Path(os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference") / "rdt"
).expanduser()
needs_fixture = pytest.mark.skipif(
    not (REF / "config.json").is_file(), reason=f"no RDT reference fixture at {REF}"
)


def tiny_config(**over) -> RDTConfig:
    d = {
        "action_dim": 128,
        "pred_horizon": 3,
        "lang_token_dim": 12,
        "img_token_dim": 8,
        "state_token_dim": 128,
        "max_lang_cond_len": 6,
        "img_cond_len": 2 * 2 * 4,
        "lang_pos_embed_config": [["lang", -6]],
        "img_pos_embed_config": [["image", [2, 2, -4]]],
        "rdt": {"hidden_size": 32, "depth": 3, "num_heads": 4},
    }
    d.update(over)
    return RDTConfig.from_dict(d, released=False)


def tiny_batch(cfg: RDTConfig, B: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, 1, cfg.action_dim)
    mask[:, :, [30, 31, 32, 10]] = 1
    lang_mask = torch.ones(B, 4, dtype=torch.bool)
    lang_mask[1, -1] = False
    return {
        "lang_tokens": torch.randn(B, 4, cfg.lang_token_dim, generator=g),
        "lang_attn_mask": lang_mask,
        "img_tokens": torch.randn(B, cfg.img_cond_len, cfg.img_token_dim, generator=g),
        "state_tokens": torch.rand(B, 1, cfg.state_token_dim, generator=g) * mask,
        "action_gt": torch.rand(B, cfg.pred_horizon, cfg.action_dim, generator=g) * mask,
        "action_mask": mask,
        "ctrl_freqs": torch.full((B,), 20.0),
    }


def random_model(cfg: RDTConfig) -> RDTRunner:
    """Upstream's init, then noise on every parameter (the last linear starts at zero)."""
    torch.manual_seed(0)
    model = RDTRunner(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def loss_of(model: RDTRunner, b: dict, **draws) -> torch.Tensor:
    return model.compute_loss(**b, **draws).loss


# ---------------------------------------------------------------------------------------------
# The reference fixture


@needs_fixture
def test_reference_fixture():
    check_reference(REF)


VARIANTS = REPO / "tests" / "fixtures" / "rdt_variants"


@pytest.mark.parametrize("name", ["sizes_a", "sizes_b"])
def test_reference_at_other_sizes(name):
    """Upstream-made fixtures at other depths / widths / horizons / adaptors / prediction types
    (tests/fixtures/rdt_variants/README.md): the same check, sizes from their own files."""
    check_reference(VARIANTS / name)


@needs_fixture
def test_reference_check_fails_with_a_true_rms_norm(monkeypatch):
    """The check can fail: RMSNorm by the mean square (not timm 1.0.3's variance) is caught."""

    def mean_square(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    monkeypatch.setattr(modeling.RmsNorm, "forward", mean_square)
    with pytest.raises(AssertionError, match="pred: max abs diff"):
        check_reference(REF)


@needs_fixture
def test_fixture_config_json_is_written_back_byte_for_byte():
    cfg = RDTConfig.from_json(REF / "config.json")
    assert cfg.to_json_string() == (REF / "config.json").read_text()


@needs_fixture
def test_initialisation_reproduces_upstream_position_embeddings():
    """The fixture's position embeddings are upstream's sin-cos initialisation (the fixture's
    README adds noise only to constant tensors): ours must be equal."""
    cfg = RDTConfig.from_json(REF / "config.json")
    released, _ = read_released_state_dict(REF)
    model = RDTRunner(cfg)
    for name in ("x_pos_embed", "lang_cond_pos_embed", "img_cond_pos_embed"):
        torch.testing.assert_close(
            getattr(model.model, name).data, released[f"model.{name}"], atol=1e-6, rtol=0
        )


# ---------------------------------------------------------------------------------------------
# Released layout: round trip and strictness


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_save_load_round_trip_is_bit_identical(tmp_path, weights):
    model = random_model(tiny_config())
    save_released(model, tmp_path / "m", weights=weights)
    name = SAFETENSORS_NAME if weights == "safetensors" else PICKLE_NAME
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(["config.json", name])
    back = load_released(tmp_path / "m")
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    batch = tiny_batch(model.cfg)
    draws = {"noise": torch.randn(2, 3, 128), "timesteps": torch.tensor([10, 900])}
    with torch.no_grad():
        assert torch.equal(loss_of(model, batch, **draws), loss_of(back, batch, **draws))


def test_save_defaults_to_safetensors(tmp_path):
    save_released(RDTRunner(tiny_config()), tmp_path / "m")
    assert (tmp_path / "m" / SAFETENSORS_NAME).is_file()
    assert not (tmp_path / "m" / PICKLE_NAME).exists()


def _rewrite(folder: Path, edit) -> None:
    sd = torch.load(folder / PICKLE_NAME, weights_only=True)
    edit(sd)
    torch.save(sd, folder / PICKLE_NAME)


def test_missing_key_fails_naming_it(tmp_path):
    save_released(RDTRunner(tiny_config()), tmp_path / "m", weights="bin")
    _rewrite(tmp_path / "m", lambda sd: sd.pop("model.blocks.1.cross_attn.kv.weight"))
    with pytest.raises(
        CheckpointKeyError, match=r"missing 1 key\(s\): model\.blocks\.1\.cross_attn\.kv\.weight"
    ):
        load_released(tmp_path / "m")


def test_extra_key_fails_naming_it(tmp_path):
    save_released(RDTRunner(tiny_config()), tmp_path / "m", weights="bin")

    def add(sd):
        sd["model.blocks.7.attn.qkv.weight"] = torch.zeros(3)  # a block the config lacks
        sd["ema.shadow"] = torch.zeros(1)  # no rule knows it

    _rewrite(tmp_path / "m", add)
    with pytest.raises(CheckpointKeyError) as e:
        load_released(tmp_path / "m")
    assert e.value.unexpected == ["ema.shadow", "model.blocks.7.attn.qkv.weight"]
    assert e.value.missing == []


def test_wrong_shape_fails_naming_it(tmp_path):
    save_released(RDTRunner(tiny_config()), tmp_path / "m", weights="bin")
    _rewrite(tmp_path / "m", lambda sd: sd.__setitem__("lang_adaptor.0.bias", torch.zeros(5)))
    with pytest.raises(
        CheckpointKeyError, match=r"lang_adaptor\.0\.bias \(5,\) \(model: \(32,\)\)"
    ):
        load_released(tmp_path / "m")


def test_pickled_objects_are_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(tiny_config().to_json_string())
    torch.save(
        {"args": argparse.Namespace(lr=1.0)}, tmp_path / "m" / PICKLE_NAME
    )  # needs full unpickling
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_released(tmp_path / "m")


def test_config_errors_name_the_file_and_key(tmp_path):
    d = tiny_config().to_released_dict()
    d["rdt"]["hidden_sise"] = 32
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json.*key 'rdt\.hidden_sise'"):
        RDTConfig.from_json(tmp_path / "config.json")
    d = tiny_config().to_released_dict()
    d["img_cond_len"] = 15
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"img_pos_embed_config covers 16 tokens but img_cond_len"):
        RDTConfig.from_json(tmp_path / "config.json")


def test_released_config_needs_upstreams_required_keys(tmp_path):
    d = tiny_config().to_released_dict()
    del d["pred_horizon"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: missing key\(s\) pred_horizon"):
        RDTConfig.from_json(tmp_path / "config.json")
    d = tiny_config().to_released_dict()
    del d["lang_pos_embed_config"]  # upstream's default is None, not rdt-1b's value
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert RDTConfig.from_json(tmp_path / "config.json").lang_pos_embed_config is None


def test_missing_weights_lists_the_files(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json_string())
    with pytest.raises(FileNotFoundError, match=r"files found: config\.json"):
        load_released(tmp_path)


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_injected_draws_are_used_and_default_draws_are_seedable():
    model = random_model(tiny_config()).eval()
    b = tiny_batch(model.cfg)
    d1 = {"noise": torch.randn(2, 3, 128), "timesteps": torch.tensor([5, 700])}
    d2 = {"noise": torch.randn(2, 3, 128), "timesteps": torch.tensor([5, 700])}
    with torch.no_grad():
        assert not torch.equal(loss_of(model, b, **d1), loss_of(model, b, **d2))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(loss_of(model, b, generator=g1), loss_of(model, b, generator=g2))
    acts = model.predict_action(
        b["lang_tokens"],
        b["lang_attn_mask"],
        b["img_tokens"],
        b["state_tokens"],
        b["action_mask"],
        b["ctrl_freqs"],
        generator=torch.Generator().manual_seed(1),
    )
    assert acts.shape == (2, 3, 128)
    assert torch.all(acts[b["action_mask"].expand(-1, 3, -1) == 0] == 0)  # masked dims zeroed


def test_language_padding_is_masked():
    """A padded language token changes nothing when masked, and changes the output otherwise."""
    model = random_model(tiny_config(rdt={"hidden_size": 32, "depth": 1, "num_heads": 4})).eval()
    b = tiny_batch(model.cfg)
    draws = {"noise": torch.randn(2, 3, 128), "timesteps": torch.tensor([100, 100])}
    with torch.no_grad():
        ref = model.compute_loss(**b, **draws).pred
        b2 = dict(b, lang_tokens=b["lang_tokens"].clone())
        b2["lang_tokens"][1, -1] += 10.0  # the masked token of sample 1
        assert torch.equal(model.compute_loss(**b2, **draws).pred, ref)
        b2["lang_tokens"][1, 0] += 10.0  # a valid token
        assert not torch.allclose(model.compute_loss(**b2, **draws).pred[1], ref[1])


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = RDTRunner(tiny_config())
    b = tiny_batch(model.cfg)
    draws = {"noise": torch.randn(2, 3, 128), "timesteps": torch.tensor([50, 300])}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = loss_of(model, b, **draws)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---------------------------------------------------------------------------------------------
# Full size without the hub

RELEASED_PARAMETERS = 1_228_319_872  # measured: RDTRunner(RDTConfig()) on the meta device


def test_released_config_parameter_count_on_meta():
    with torch.device("meta"):
        model = RDTRunner(RDTConfig())
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS


def test_released_widths_at_depth_one_run_forward_on_cpu():
    cfg = RDTConfig().model_copy(update={"rdt": RDTConfig().rdt.model_copy(update={"depth": 1})})
    cfg = RDTConfig.model_validate(cfg.model_dump())
    torch.manual_seed(0)
    model = RDTRunner(cfg).eval()
    B, L = 1, 7
    mask = torch.zeros(B, 1, cfg.action_dim)
    mask[..., [30, 31, 32, 10]] = 1
    with torch.no_grad():
        out = model.compute_loss(
            torch.randn(B, L, cfg.lang_token_dim),
            torch.ones(B, L, dtype=torch.bool),
            torch.randn(B, cfg.img_cond_len, cfg.img_token_dim),
            torch.zeros(B, 1, 128),
            torch.zeros(B, cfg.pred_horizon, 128),
            mask,
            torch.tensor([20.0]),
        )
    assert out.pred.shape == (B, 64, 128) and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# LIBERO in the unified space


def test_state_vec_table_matches_upstream_slots():
    from vlatune.policies.rdt.unified import STATE_VEC_IDX

    assert len(STATE_VEC_IDX) == 144  # upstream configs/state_vec.py defines 144 names
    assert [STATE_VEC_IDX[f"right_eef_pos_{a}"] for a in "xyz"] == [30, 31, 32]
    assert [STATE_VEC_IDX[f"eef_angle_{i}"] for i in range(6)] == list(range(33, 39))
    assert STATE_VEC_IDX["gripper_open"] == STATE_VEC_IDX["right_gripper_joint_0_pos"] == 10
    assert STATE_VEC_IDX["left_gripper_open"] == 60
    assert STATE_VEC_IDX["left_eef_angular_vel_yaw"] == 94
    assert STATE_VEC_IDX["base_angular_vel"] == 102


def test_libero_action_goes_in_and_comes_out_unchanged():
    import numpy as np

    from vlatune.policies.rdt.unified import LiberoUnified

    m = LiberoUnified()
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(4, 10, 7))
    actions[..., 6] = rng.choice([-1.0, 1.0], size=(4, 10))  # LIBERO's gripper is +-1
    u = m.action_to_unified(actions)
    assert u.shape == (4, 10, 128)
    assert m.action_indices == [39, 40, 41, 42, 43, 44, 10]
    assert np.array_equal(m.unified_to_action(u), actions)
    # Gripper in RDT's convention: open (-1 in LIBERO) is 1, closed is 0.
    assert set(np.unique(u[..., 10])) == {0.0, 1.0}
    assert np.array_equal(u[..., 10] == 1.0, actions[..., 6] == -1.0)
    # Nothing outside the mask.
    assert np.all(u[..., m.mask() == 0] == 0)


def test_libero_state_in_the_unified_space():
    import numpy as np

    from vlatune.policies.rdt.unified import LiberoUnified

    m = LiberoUnified()
    # Identity rotation, fingers fully open; then a half-turn about z, gripper closed.
    s = np.array([[0.1, -0.2, 0.9, 0, 0, 0, 0.04, -0.04], [0.0, 0.0, 1.0, 0, 0, np.pi, 0.0, 0.0]])
    u = m.state_to_unified(s)
    assert np.allclose(u[0, 30:33], [0.1, -0.2, 0.9])
    assert np.allclose(u[0, 33:39], [1, 0, 0, 0, 1, 0])  # columns of the identity
    assert np.allclose(u[1, 33:39], [-1, 0, 0, 0, -1, 0], atol=1e-12)  # Rz(pi)
    assert u[0, 10] == 1.0 and u[1, 10] == 0.0
    assert sorted(np.flatnonzero(m.mask())) == [10, *range(30, 45)]


def test_libero_mapping_is_changed_in_config_and_checked():
    from vlatune.policies.rdt.unified import LiberoUnified

    pos = ["eef_pos_x", "eef_pos_y", "eef_pos_z", "eef_angle_0", "eef_angle_1", "eef_angle_2"]
    m = LiberoUnified.model_validate({"action": [*pos, "gripper_open"]})
    assert m.action_indices == [30, 31, 32, 33, 34, 35, 10]
    with pytest.raises(ValueError, match="unknown unified-vector slot name"):
        LiberoUnified.model_validate({"action": [*pos, "gripper_opn"]})
    with pytest.raises(ValueError, match="two LIBERO dims to one index"):
        LiberoUnified.model_validate({"action": [*pos[:5], "eef_pos_x", "gripper_open"]})


# ---------------------------------------------------------------------------------------------
# The GPU benchmark, at reduced size on the CPU


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_rdt", REPO / "benchmarks/gpu/rdt.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rdt.json"
    result = bench.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    full, lora = result["full"], result["lora"]
    assert full["trainable"] == full["parameters"] > 0
    assert 0 < lora["trainable"] < lora["parameters"]  # only the adapters train
    assert full["samples_per_s"] > 0 and lora["step_s_median"] > 0
    assert result["sample"]["steps"] == 5 and result["sample"]["finite"]

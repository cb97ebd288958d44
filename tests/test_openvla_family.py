"""The `openvla` family (OpenVLA and OpenVLA-OFT): reference fixtures, released layout, strictness,
OFT's parallel-decoding pass and the full-size configuration.

The fixtures are `$VLATUNE_REFERENCE_DIR/openvla{,_oft}` (default `<repo>/../shared/reference`);
the tests that need them skip when they are absent. Everything else builds tiny models here.

    $ .venv/bin/python -m pytest tests/test_openvla_family.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlatune.policies.openvla import modeling
from vlatune.policies.openvla.configuration import OFTConfig, OpenVLAConfig
from vlatune.policies.openvla.convert import (
    SAFETENSORS_NAME,
    CheckpointKeyError,
    OFTHeads,
    load_released,
    save_released,
)
from vlatune.policies.openvla.modeling import OpenVLAForActionPrediction, bidirectional_span_mask
from vlatune.policies.openvla.oft_heads import L1RegressionActionHead, ProprioProjector
from vlatune.policies.openvla.reference import check_reference

REPO = Path(__file__).resolve().parents[1]
REF_ROOT = Path(os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference")


def _fixture(name: str) -> Path:
    folder = (REF_ROOT / name).expanduser()
    if not (folder / "config.json").is_file():
        pytest.skip(f"no {name} reference fixture at {folder} (set VLATUNE_REFERENCE_DIR)")
    return folder


TINY_OVERRIDES = {
    "vit_large_patch14_reg4_dinov2.lvd142m": {"embed_dim": 16, "depth": 2, "num_heads": 2},
    "vit_so400m_patch14_siglip_224": {"embed_dim": 24, "depth": 3, "num_heads": 2},
}


def tiny_raw() -> dict:
    """A config.json as OpenVLA writes it, with tiny sizes (42 px: 9 patches per tower)."""
    stats = {
        "ds": {
            "action": {"q01": [-1.0] * 7, "q99": [2.0] * 7, "mask": [True] * 6 + [False]},
            "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
        }
    }
    return {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "image_sizes": [42, 42],
        "n_action_bins": 256,
        "norm_stats": stats,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": {
            "hidden_size": 12,
            "intermediate_size": 20,
            "model_type": "llama",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "pad_token_id": 32000,
            "vocab_size": 32064,
        },
        "timm_model_ids": list(TINY_OVERRIDES),
        "timm_override_act_layers": [None, None],
        "use_fused_vision_backbone": True,
    }


def tiny_model(seed: int = 0) -> OpenVLAForActionPrediction:
    torch.manual_seed(seed)
    model = OpenVLAForActionPrediction(OpenVLAConfig.from_dict(tiny_raw(), TINY_OVERRIDES))
    with torch.no_grad():  # make every tensor distinct (no constant LayerNorm / LayerScale)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_heads(llm_dim: int = 12) -> OFTHeads:
    oft = OFTConfig.for_platform("libero")
    head = L1RegressionActionHead(llm_dim, llm_dim, oft.action_dim, oft.num_actions_chunk)
    return OFTHeads(head, ProprioProjector(llm_dim, oft.proprio_dim), oft, step=5)


# -- reference fixtures ---------------------------------------------------------------------
def test_reference_openvla():
    check_reference(_fixture("openvla"))


def test_reference_openvla_oft():
    check_reference(_fixture("openvla_oft"))


def test_reference_detects_a_wrong_feature_layer(monkeypatch):
    """The comparison can fail: reading the last block instead of the second-to-last does."""
    folder = _fixture("openvla")

    def last_block(self, pixels, lang=None):
        x = self._tokens(pixels)
        for blk in self.blocks:
            x = blk(x)
        return x[:, self.num_prefix :]

    monkeypatch.setattr(modeling.VisionTransformer, "patch_features", last_block)
    with pytest.raises(AssertionError, match="patch_features"):
        check_reference(folder)


# -- released layout ------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_identical(tmp_path):
    model, heads = tiny_model(), tiny_heads()
    save_released(model, tmp_path / "a", heads=heads)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "action_head--5_checkpoint.pt",
        "config.json",
        "dataset_statistics.json",
        "model.safetensors",
        "proprio_projector--5_checkpoint.pt",
    ]
    # side files are DDP-style tensor dicts, readable with weights_only=True
    side = torch.load(tmp_path / "a" / "action_head--5_checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.") for k in side)
    back, heads2 = load_released(tmp_path / "a", TINY_OVERRIDES, oft=heads.config)
    assert heads2.step == 5
    for a, b in (
        (model, back),
        (heads.action_head, heads2.action_head),
        (heads.proprio_projector, heads2.proprio_projector),
    ):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == tiny_raw()
    # and the reloaded model computes the same
    ids = torch.tensor([[1, 300, 400, 29871]])
    pix = torch.randn(1, 6, 42, 42)
    assert torch.equal(model(ids, None, pix)["logits"], back(ids, None, pix)["logits"])


def _resave(folder: Path, edit) -> None:
    sd = load_file(str(folder / SAFETENSORS_NAME))
    edit(sd)
    save_file(sd, str(folder / SAFETENSORS_NAME))


def test_missing_key_fails_naming_it(tmp_path):
    save_released(tiny_model(), tmp_path / "m")
    _resave(tmp_path / "m", lambda sd: sd.pop("projector.fc3.bias"))
    with pytest.raises(CheckpointKeyError, match=r"missing \['projector\.fc3\.bias'\]"):
        load_released(tmp_path / "m", TINY_OVERRIDES)


def test_extra_key_fails_naming_it(tmp_path):
    save_released(tiny_model(), tmp_path / "x")
    _resave(tmp_path / "x", lambda sd: sd.__setitem__("projector.fc4.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointKeyError, match=r"unexpected \['projector\.fc4\.weight'\]"):
        load_released(tmp_path / "x", TINY_OVERRIDES)


def test_side_file_extra_key_and_shape_fail(tmp_path):
    heads = tiny_heads()
    save_released(tiny_model(), tmp_path / "h", heads=heads)
    path = tmp_path / "h" / "proprio_projector--5_checkpoint.pt"
    sd = torch.load(path, weights_only=True)
    sd["module.fc9.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointKeyError, match=r"unexpected \['fc9\.weight'\]"):
        load_released(tmp_path / "h", TINY_OVERRIDES, oft=heads.config)
    # wrong chunk length for the head: a shape mismatch naming the key
    other = OFTConfig(num_actions_chunk=8, action_dim=6, proprio_dim=8)
    with pytest.raises(CheckpointKeyError, match=r"model\.layer_norm1\.weight"):
        load_released(tmp_path / "h", TINY_OVERRIDES, oft=other)


def test_config_errors_name_the_key():
    raw = tiny_raw()
    raw["timm_model_ids"][1] = "vit_base_patch16_clip_224"
    with pytest.raises(ValueError, match="vit_base_patch16_clip_224"):
        OpenVLAConfig.from_dict(raw)
    raw = tiny_raw()
    del raw["text_config"]
    with pytest.raises(ValueError, match="text_config"):
        OpenVLAConfig.from_dict(raw)


# -- behaviour -----------------------------------------------------------------------------
def test_bin_decoding_and_unnormalisation():
    model = tiny_model()
    ids = torch.tensor([[31999, 31744, 32000, 31872, 31999, 31744, 31900]])
    norm = model.tokens_to_normalized(ids)
    centers = model.bin_centers
    assert norm[0, 0] == centers[0] and norm[0, 1] == centers[254] and norm[0, 2] == centers[0]
    assert norm[0, 3] == centers[127]
    out = model.unnormalize(norm, "ds")
    assert out[0, 0] == pytest.approx(0.5 * (centers[0] + 1) * 3 - 1)
    assert out[0, 6] == norm[0, 6]  # mask False: left normalised


def _oft_batch(b: int = 2):
    oft = OFTConfig.for_platform("libero")
    n = oft.num_actions_chunk * oft.action_dim
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 30000, (b, 5), generator=g)
    acts = torch.randint(31744, 32000, (b, n), generator=g)
    bos, space, eos = (
        torch.ones(b, 1, dtype=torch.long),
        torch.full((b, 1), 29871),
        torch.full((b, 1), 2),
    )
    ids = torch.cat([bos, prompt, space, acts, eos], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 7 : 7 + n + 1] = ids[:, 7 : 7 + n + 1]
    return oft, ids, torch.ones_like(ids, dtype=torch.bool), labels


@pytest.mark.parametrize("attention", ["bidirectional", "action_span"])
def test_oft_pass_reads_the_action_positions_bidirectionally(monkeypatch, attention):
    model, heads = tiny_model(), tiny_heads()
    oft, ids, mask, labels = _oft_batch()
    oft.num_images, oft.attention = 2, attention
    pix = torch.randn(2, 12, 42, 42)
    prop = heads.proprio_projector(torch.rand(2, 8) * 2 - 1)

    def run(input_ids):
        return model.oft_action_hidden_states(input_ids, mask, pix, labels, oft, prop)

    with torch.no_grad():
        h = run(ids)
        assert h.shape == (2, 56, 12)
        assert heads.action_head.predict_action(h).shape == (2, 8, 7)
        # action token ids do not matter (their embeddings are zeroed)
        ids2 = ids.clone()
        ids2[:, 7:63] = 31800
        assert torch.allclose(h, run(ids2))
        # the stop token after the chunk is seen only with full bidirectional attention
        ids3 = ids.clone()
        ids3[:, -1] = 500
        assert torch.allclose(h, run(ids3)) == (attention == "action_span")
        # the first read position sees later ones: differs from a purely causal pass
        causal = modeling.bidirectional_span_mask
        monkeypatch.setattr(
            modeling,
            "bidirectional_span_mask",
            lambda span, keep, dt: causal(span & False, keep, dt),
        )
        assert not torch.allclose(h[:, 0], run(ids)[:, 0])


def test_span_mask_shape_and_padding():
    span = torch.tensor([[False, True, True, False]])
    keep = torch.tensor([[True, True, True, False]])
    m = bidirectional_span_mask(span, keep, torch.float32)[0, 0] == 0
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, True, False],
        [True, True, True, False],
        [True, True, True, True],  # a padded query keeps itself (no empty row)
    ]


# -- full size without the hub -----------------------------------------------------------------
RELEASED_TEXT = {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}


def released_raw() -> dict:
    raw = tiny_raw()
    raw.update(image_sizes=[224, 224], text_config=dict(RELEASED_TEXT))
    return raw


def test_full_size_parameter_count_on_meta():
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(OpenVLAConfig.from_dict(released_raw()))
    count = sum(p.numel() for p in model.parameters())
    assert count == 7_541_237_184
    assert model.vision_backbone.num_patches == 256
    assert model.language_model.config.num_hidden_layers == 32


def test_released_widths_at_reduced_depth_run_forward():
    raw = released_raw()
    raw["text_config"]["num_hidden_layers"] = 1
    over = {k: {"depth": 2} for k in TINY_OVERRIDES}
    torch.manual_seed(0)
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(OpenVLAConfig.from_dict(raw, over))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    from vlatune.policies.openvla.convert import _materialise_buffers

    _materialise_buffers(model)
    ids = torch.tensor([[1, 512, 1000, 29871, 31900]])
    labels = torch.tensor([[-100, -100, -100, -100, 31900]])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), torch.randn(1, 6, 224, 224), labels)
    assert out["logits"].shape == (1, 1 + 256 + 4, 32064)
    assert torch.isfinite(out["loss"])


# -- the GPU benchmark, at reduced size on the CPU ---------------------------------------------
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_openvla", REPO / "benchmarks/gpu/openvla.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "openvla.json"
    result = bench.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    full, lora = result["full"], result["lora"]
    assert full["trainable"] == full["parameters"] > 0
    assert 0 < lora["trainable"] < lora["parameters"]  # adapters + head + proprio projector
    assert full["samples_per_s"] > 0 and lora["step_s_median"] > 0
    assert result["sample"]["chunk"] == [8, 7] and result["sample"]["finite"]


# -- OFT's DDIM diffusion head ------------------------------------------------------------------
def _diffusion_heads(llm_dim: int = 12) -> OFTHeads:
    from vlatune.policies.openvla.oft_heads import DiffusionActionHead, NoisyActionProjector

    oft = OFTConfig.for_platform("libero", head="diffusion", num_images=2)
    torch.manual_seed(3)
    head = DiffusionActionHead(llm_dim, llm_dim, oft.action_dim, oft.num_actions_chunk)
    return OFTHeads(head, ProprioProjector(llm_dim, 8), oft, 7, NoisyActionProjector(llm_dim))


def test_diffusion_heads_round_trip_and_need_their_projector(tmp_path):
    heads = _diffusion_heads()
    save_released(tiny_model(), tmp_path / "d", heads=heads)
    assert (tmp_path / "d" / "noisy_action_projector--7_checkpoint.pt").is_file()
    keys = torch.load(tmp_path / "d" / "action_head--7_checkpoint.pt", weights_only=True)
    assert "module.noise_predictor.mlp_resnet.fc1.weight" in keys  # OFT's key names
    _, back = load_released(tmp_path / "d", TINY_OVERRIDES, oft=heads.config)
    for a, b in (
        (heads.action_head, back.action_head),
        (heads.noisy_action_projector, back.noisy_action_projector),
    ):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    (tmp_path / "d" / "noisy_action_projector--7_checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="noisy_action_projector"):
        load_released(tmp_path / "d", TINY_OVERRIDES, oft=heads.config)
    # an L1 head file read as a diffusion head fails naming the keys
    save_released(tiny_model(), tmp_path / "l1", heads=tiny_heads())
    with pytest.raises(CheckpointKeyError, match=r"unexpected \['model\."):
        load_released(tmp_path / "l1", TINY_OVERRIDES, oft=heads.config)


def test_timestep_embedding_is_oft_sinusoid():
    from vlatune.policies.openvla.oft_heads import sinusoidal_embedding

    e = sinusoidal_embedding(torch.tensor([0.0, 7.0]), 8)
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    w = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    assert torch.allclose(e[1], torch.cat([(7 * w).sin(), (7 * w).cos()]), atol=1e-6)


def test_diffusion_sampling_uses_the_injected_noise():
    model, heads = tiny_model(), _diffusion_heads()
    oft, ids, mask, labels = _oft_batch()
    oft.head, oft.num_images = "diffusion", 2
    pix = torch.randn(2, 12, 42, 42)
    prop = heads.proprio_projector(torch.rand(2, 8) * 2 - 1)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 8, 7, generator=g)

    def sample(n):
        return modeling.oft_diffusion_sample(
            model,
            heads.action_head,
            heads.noisy_action_projector,
            ids,
            mask,
            pix,
            labels,
            oft,
            n,
            4,
            prop,
        )

    a = sample(noise)
    assert a.shape == (2, 8, 7) and torch.isfinite(a).all()
    assert torch.equal(a, sample(noise.clone()))  # deterministic given the draws (DDIM, eta 0)
    assert not torch.allclose(a, sample(torch.randn(2, 8, 7, generator=g)))
    assert heads.action_head.noise_scheduler.timesteps.tolist() == [36, 24, 12, 0]
    # training path: noisy actions replace the action embeddings, MSE on the noise
    t = torch.tensor([3, 40])
    noisy = heads.action_head.add_noise(torch.rand(2, 8, 7) * 2 - 1, noise, t)
    h = model.oft_action_hidden_states(
        ids, mask, pix, labels, oft, prop,
        noisy_action_features=heads.noisy_action_projector(noisy),
        timestep_embedding=heads.action_head.time_embedding(t),
    )  # fmt: skip
    loss = torch.nn.functional.mse_loss(heads.action_head.predict_noise(h), noise)
    loss.backward()
    assert heads.noisy_action_projector.fc1.weight.grad.abs().sum() > 0


# -- FiLM (OFT's film_vit_wrapper) ------------------------------------------------------------
def _film_model() -> OpenVLAForActionPrediction:
    torch.manual_seed(0)
    model = OpenVLAForActionPrediction(
        OpenVLAConfig.from_dict(tiny_raw(), TINY_OVERRIDES), film=True
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_film_is_identity_at_zero_and_conditions_otherwise():
    film, plain = _film_model(), tiny_model()
    sd = {k: v for k, v in film.state_dict().items() if ".scale." not in k and ".shift." not in k}
    plain.load_state_dict(sd, strict=True)
    pix, lang = torch.randn(2, 6, 42, 42), torch.randn(2, 12)
    with torch.no_grad():
        with_film = film.vision_backbone(pix, lang)
        assert not torch.allclose(with_film, plain.vision_backbone(pix))
        assert not torch.allclose(with_film, film.vision_backbone(pix, lang.flip(0)))
        for name, p in film.named_parameters():
            if ".scale." in name or ".shift." in name:
                p.zero_()
        assert torch.allclose(
            film.vision_backbone(pix, lang), plain.vision_backbone(pix), atol=1e-6
        )
    with pytest.raises(ValueError, match="FiLM"):
        film.vision_backbone(pix)
    oft, ids, mask, labels = _oft_batch()  # OFT's pass feeds the mean non-action embedding
    with torch.no_grad():
        h = film.oft_action_hidden_states(ids, mask, torch.randn(2, 6, 42, 42), labels, oft)
    assert h.shape == (2, 56, 12) and torch.isfinite(h).all()


def test_film_backbone_file_round_trip_and_lora_merge(tmp_path):
    model = _film_model()
    heads = tiny_heads()
    heads.config.use_film = True
    save_released(model, tmp_path / "f", heads=heads)
    side = torch.load(tmp_path / "f" / "vision_backbone--5_checkpoint.pt", weights_only=True)
    assert (
        "vision_backbone.featurizer.blocks.0.block.attn.qkv.weight" in side
    )  # OFT's wrapper names
    assert "vision_backbone.fused_featurizer.blocks.1.scale.weight" in side
    assert not any(".scale." in k for k in load_file(str(tmp_path / "f" / SAFETENSORS_NAME)))
    back, _ = load_released(tmp_path / "f", TINY_OVERRIDES, oft=heads.config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # as OFT's training writes it: the tower linears LoRA-wrapped (rank 32, alpha min(32, 16))
    key = "vision_backbone.featurizer.blocks.0.block.mlp.fc1"
    w, b = side.pop(f"{key}.weight"), side.pop(f"{key}.bias")
    a, bb = torch.randn(32, w.shape[1]), torch.randn(w.shape[0], 32)
    side.update({f"{key}.base_layer.weight": w, f"{key}.base_layer.bias": b})
    side.update({f"{key}.lora_A.default.weight": a, f"{key}.lora_B.default.weight": bb})
    torch.save(side, tmp_path / "f" / "vision_backbone--5_checkpoint.pt")
    merged, _ = load_released(tmp_path / "f", TINY_OVERRIDES, oft=heads.config)
    got = merged.vision_backbone.featurizer.blocks[0].mlp.fc1
    assert torch.allclose(got.weight, w + 0.5 * bb @ a, atol=1e-6)
    assert torch.equal(got.bias, b)
    # without use_film, the plain model rejects nothing and reads the VLA alone
    plain, _ = load_released(tmp_path / "f", TINY_OVERRIDES)
    assert not plain.vision_backbone.film

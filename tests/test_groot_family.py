"""The GR00T N1.5 family: reference fixture, NVIDIA's layout both ways, released sizes, processor.

The fixture comparison runs `vlatune.policies.groot.reference.check_reference` on
`$VLATUNE_REFERENCE_DIR/groot_n15` (default `<repo>/../shared/reference/groot_n15`), skipped with
one sentence when the folder is absent. The other tests build their own tiny models.

    $ .venv/bin/python -m pytest tests/test_groot_family.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlatune.policies.groot import processor as P
from vlatune.policies.groot.configuration import RELEASED_CONFIG, RELEASED_EAGLE, GrootConfig
from vlatune.policies.groot.convert import (
    build_model,
    is_released_folder,
    load_released,
    save_released,
)
from vlatune.policies.groot.modeling import GrootModel, count_parameters
from vlatune.policies.groot.reference import check_reference

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference"
)
RELEASED_PARAMETERS = 2_413_522_880  # measured on the meta device (modeling.py docstring)


def _fixture() -> Path:
    folder = REFERENCE_DIR / "groot_n15"
    if not (folder / "config.json").is_file():
        pytest.skip(
            f"no groot_n15 reference fixture at {folder} (set VLATUNE_REFERENCE_DIR to shared/reference)"
        )
    return folder


def _tiny_dicts(pixel_shuffle: bool = True, connector_layers: int = 1) -> tuple[dict, dict]:
    raw = json.loads(json.dumps(RELEASED_CONFIG))
    raw["action_horizon"] = 5
    raw["backbone_cfg"]["select_layer"] = 2
    head = raw["action_head_cfg"]
    head.update(
        action_horizon=5,
        backbone_embedding_dim=48,
        hidden_size=40,
        input_embedding_dim=24,
        num_target_vision_tokens=3,
        max_num_embodiments=4,
        max_state_dim=12,
        action_dim=10,
        max_seq_len=16,
    )
    raw["action_dim"] = 10
    head["diffusion_model_cfg"].update(
        attention_head_dim=6,
        num_attention_heads=4,
        num_layers=3,
        output_dim=40,
        cross_attention_dim=48,
        dropout=0.0,
    )
    head["vl_self_attention_cfg"].update(
        attention_head_dim=8, num_attention_heads=6, num_layers=1, dropout=0.0
    )
    eagle = json.loads(json.dumps(RELEASED_EAGLE))
    eagle["vision_config"].update(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
    )
    eagle["text_config"].update(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    eagle.update(
        use_pixel_shuffle=pixel_shuffle,
        mlp_connector_layers=connector_layers,
        image_token_index=99,
        force_image_size=28,
    )
    return raw, eagle


def _tiny(**kw) -> GrootConfig:
    raw, eagle = _tiny_dicts(**kw)
    return GrootConfig(raw, eagle, source="tiny")


def _batch(cfg: GrootConfig, bsz: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_img, h = cfg.tokens_per_image, cfg.head
    seq = n_img + 6
    ids = torch.randint(0, cfg.eagle.image_token_index, (bsz, seq), generator=g)
    ids[:, 1 : 1 + n_img] = cfg.eagle.image_token_index
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[-1, -2:] = 0
    s = cfg.image_size
    state, _ = P.pad_state(torch.randn(bsz, 8, generator=g), h.max_state_dim)
    actions, amask = P.pad_actions(
        torch.rand(bsz, h.action_horizon, 7, generator=g) * 2 - 1, h.action_horizon, h.action_dim
    )
    return {
        "eagle_input_ids": ids,
        "eagle_attention_mask": mask,
        "eagle_pixel_values": torch.rand(bsz, 3, s, s, generator=g) * 2 - 1,
        "state": state,
        "action": actions,
        "action_mask": amask,
        "embodiment_id": torch.tensor([3, 1][:bsz]),
    }


# -- the reference fixture -----------------------------------------------------------------------


def test_reference_fixture():
    check_reference(_fixture())


def test_reference_check_fails_on_a_wrong_weight(tmp_path):
    src = _fixture()
    folder = tmp_path / "groot_n15"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").chmod(0o644)
    sd = load_file(str(folder / "model.safetensors"))
    sd["action_head.model.proj_out_2.bias"] = sd["action_head.model.proj_out_2.bias"] + 0.01
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(AssertionError, match="pred_velocity"):
        check_reference(folder)


def test_released_round_trip_is_bit_identical(tmp_path):
    src = _fixture()
    model, report = load_released(src)
    assert report.tensors == 145 or report.tensors == len(load_file(str(src / "model.safetensors")))
    save_released(model, tmp_path / "out")
    a = load_file(str(src / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    assert json.loads((tmp_path / "out" / "eagle_config.json").read_text()) == json.loads(
        (src / "eagle_config.json").read_text()
    )


# -- NVIDIA's layout on a model built here ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(_tiny())
    folder = tmp_path_factory.mktemp("groot") / "tiny"
    save_released(model, folder)
    return folder


def test_round_trip_of_a_model_built_here(tiny_folder, tmp_path):
    model, _ = load_released(tiny_folder)
    keys = set(load_file(str(tiny_folder / "model.safetensors")))
    assert any(k.startswith("backbone.eagle_model.vision_model.vision_model.") for k in keys)
    assert any(k.startswith("backbone.eagle_model.language_model.model.layers.1.") for k in keys)
    assert not any(".layers.2." in k and "language_model" in k for k in keys)  # cut at select_layer
    assert any(k.startswith("action_head.model.transformer_blocks.2.") for k in keys)
    save_released(model, tmp_path / "again")
    a, b = (
        load_file(str(tiny_folder / "model.safetensors")),
        load_file(str(tmp_path / "again" / "model.safetensors")),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg = model.cfg
    batch = _batch(cfg)
    model.eval()
    x = model.sample_actions({k: v for k, v in batch.items() if k not in ("action", "action_mask")})
    assert x.shape == (2, cfg.head.action_horizon, cfg.head.action_dim) and torch.isfinite(x).all()


def _edit(tiny_folder: Path, tmp_path: Path, fn) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(tiny_folder, folder)
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def test_flat_siglip_layout_and_tied_lm_head_load(tiny_folder, tmp_path):
    """Files saved by newer transformers (flat SiglipVisionModel keys) and tied Eagle configs."""
    nested = "backbone.eagle_model.vision_model.vision_model."
    flat = "backbone.eagle_model.vision_model."

    def flatten(sd):
        for k in [k for k in sd if k.startswith(nested)]:
            sd[flat + k[len(nested) :]] = sd.pop(k)

    folder = _edit(tiny_folder, tmp_path, flatten)
    model, report = load_released(folder)
    ref, _ = load_released(tiny_folder)
    assert report.flat_vision_keys > 0 and "flat layout" in " ".join(report.lines())
    a, b = model.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a tied text config: the file holds embed_tokens only, lm_head is the same tensor
    eagle = json.loads((folder / "eagle_config.json").read_text())
    eagle["text_config"]["tie_word_embeddings"] = True
    (folder / "eagle_config.json").write_text(json.dumps(eagle))
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("backbone.eagle_model.language_model.lm_head.weight")
    save_file(sd, str(folder / "model.safetensors"))
    model, report = load_released(folder)
    assert report.lm_head_tied_from_embeddings
    bb = model.backbone
    assert bb.lm_head.weight.data_ptr() == bb.llm.embed_tokens.weight.data_ptr()


def test_missing_key_fails_naming_it(tiny_folder, tmp_path):
    key = "action_head.vlln.weight"
    folder = _edit(tiny_folder, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=rf"missing 1: {key}"):
        load_released(folder)


def test_extra_key_fails_naming_it(tiny_folder, tmp_path):
    def add(sd):
        sd["action_head.extra.weight"] = torch.zeros(2)
        sd["something.else"] = torch.zeros(2)

    folder = _edit(tiny_folder, tmp_path, add)
    with pytest.raises(ValueError, match="something.else"):
        load_released(folder)
    folder2 = _edit(
        tiny_folder,
        tmp_path / "b",
        lambda sd: sd.__setitem__("action_head.extra.weight", torch.zeros(2)),
    )
    with pytest.raises(ValueError, match=r"unexpected 1: action_head\.extra\.weight"):
        load_released(folder2)


def test_wrong_shape_fails_naming_key_and_shapes(tiny_folder, tmp_path):
    key = "action_head.future_tokens.weight"
    folder = _edit(tiny_folder, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(7, 24)))
    with pytest.raises(ValueError, match=rf"{key} has shape \(7, 24\), the config gives \(3, 24\)"):
        load_released(folder)


def test_missing_files_and_bad_config_are_named(tiny_folder, tmp_path):
    assert is_released_folder(tiny_folder) and not is_released_folder(tmp_path)
    folder = tmp_path / "no_eagle"
    shutil.copytree(tiny_folder, folder)
    (folder / "eagle_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="eagle_config.json"):
        load_released(folder)
    (tmp_path / "empty").mkdir()
    shutil.copy(tiny_folder / "config.json", tmp_path / "empty" / "config.json")
    shutil.copy(tiny_folder / "eagle_config.json", tmp_path / "empty" / "eagle_config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_released(tmp_path / "empty")
    raw, eagle = _tiny_dicts()
    raw["model_type"] = "pi0"
    with pytest.raises(ValueError, match="model_type"):
        GrootConfig(raw, eagle)
    raw, eagle = _tiny_dicts()
    raw["action_head_cfg"]["diffusion_model_cfg"]["num_attention_heads"] = 5
    with pytest.raises(ValueError, match="input_embedding_dim"):
        GrootConfig(raw, eagle)
    raw, eagle = _tiny_dicts()
    raw["backbone_cfg"]["select_layer"] = 9
    with pytest.raises(ValueError, match="select_layer 9 exceeds"):
        GrootConfig(raw, eagle)


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_shuffle,layers", [(True, 1), (True, 2), (False, 1)])
def test_connector_variants_and_image_token_count(pixel_shuffle, layers):
    cfg = _tiny(pixel_shuffle=pixel_shuffle, connector_layers=layers)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert cfg.tokens_per_image == (4 if pixel_shuffle else 16)  # 28 px / 7 px patches = 16
    batch = _batch(cfg)
    feats = model.features(batch)
    assert feats.shape == (2, batch["eagle_input_ids"].shape[1], 48)
    bad = dict(batch, eagle_input_ids=batch["eagle_input_ids"].clone())
    bad["eagle_input_ids"][:, 1] = 0
    with pytest.raises(ValueError, match="image tokens"):
        model.features(bad)


def test_image_features_reach_the_output_and_padding_does_not_leak():
    cfg = _tiny()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = _batch(cfg)
    a = model.features(batch)
    other = dict(batch, eagle_pixel_values=batch["eagle_pixel_values"].flip(-1))
    assert not torch.allclose(a, model.features(other))
    # causal LLM: changing a padded last token leaves the earlier positions unchanged
    ids = batch["eagle_input_ids"].clone()
    ids[-1, -1] = (ids[-1, -1] + 1) % cfg.eagle.image_token_index
    b = model.features(dict(batch, eagle_input_ids=ids))
    torch.testing.assert_close(a[:, :-2], b[:, :-2])


def test_training_step_reduces_the_loss_and_default_freezing():
    cfg = _tiny()
    torch.manual_seed(0)
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.llm.") for n in trainable)  # tune_llm false
    assert not any(n.startswith("backbone.vision.head.") for n in trainable)  # unused pooling head
    assert any(n.startswith("backbone.vision.encoder.") for n in trainable)  # tune_visual true
    assert any(n.startswith("head.dit.") for n in trainable)
    batch = _batch(cfg)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch["action"].shape, generator=g)
    t = torch.tensor([0.3, 0.7])
    model.draw = lambda kind, shape, device, dtype: noise if kind == "noise" else 0.999 * (1 - t)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        loss, _ = model.compute_loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_loss_is_masked_and_time_follows_groot_convention():
    cfg = _tiny()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = _batch(cfg)
    torch.manual_seed(3)
    t = model.head.time_from_beta(model.head.beta_sample(20_000))
    assert t.min() >= (0.999 - 1) / 0.999 and t.max() <= 1  # NVIDIA: t may dip to -0.001
    # t = (s - Beta(1.5, 1)) / s: mean (0.999 - 0.6) / 0.999
    assert abs(t.mean().item() - (0.999 - 0.6) / 0.999) < 0.01
    noise = torch.randn(batch["action"].shape)
    beta = torch.tensor([0.5, 0.2])
    model.draw = lambda kind, shape, device, dtype: noise if kind == "noise" else beta
    with torch.no_grad():
        loss, parts = model.compute_loss(batch)
    mask = batch["action_mask"]
    assert torch.allclose(loss, (parts["loss_elementwise"] * mask).sum() / mask.sum())
    torch.testing.assert_close(parts["time"], (0.999 - beta) / 0.999)
    assert mask[..., 7:].sum() == 0 and mask[..., :7].all()


def test_embodiment_rows_are_independent():
    cfg = _tiny()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = _batch(cfg)
    batch = {k: v for k, v in batch.items() if k not in ("action", "action_mask")}
    start = torch.randn(2, cfg.head.action_horizon, cfg.head.action_dim)
    model.draw = lambda kind, shape, device, dtype: start.clone()
    a = model.sample_actions(batch)
    with torch.no_grad():
        model.head.action_decoder.layer2.b[2] += 1.0  # a row no sample uses (ids 3 and 1)
    torch.testing.assert_close(model.sample_actions(batch), a)
    with torch.no_grad():
        model.head.action_decoder.layer2.b[3] += 1.0
    b = model.sample_actions(batch)
    assert not torch.allclose(b[0], a[0]) and torch.allclose(b[1], a[1])


def test_released_size_parameter_count_on_meta():
    cfg = GrootConfig.released()
    with torch.device("meta"):
        model = GrootModel(cfg)
    assert count_parameters(model) == RELEASED_PARAMETERS
    assert cfg.tokens_per_image == 256 and cfg.backbone.select_layer == 12
    assert len(model.backbone.llm.layers) == 12 and len(model.head.dit.transformer_blocks) == 16


def test_released_config_at_depth_one_runs_on_cpu():
    cfg = GrootConfig.released(text_layers=1, vision_layers=1, dit_layers=2, vl_sa_layers=1)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GrootModel(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    from vlatune.policies.groot.convert import rebuild_buffers

    rebuild_buffers(model)
    model.eval()
    n_img = cfg.tokens_per_image
    ids = torch.full((1, n_img + 4), 5)
    ids[0, 1 : 1 + n_img] = cfg.eagle.image_token_index
    state, _ = P.pad_state(torch.randn(1, 8), cfg.head.max_state_dim)
    images = P.preprocess_images(
        torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8), cfg.image_size
    )
    batch = {
        "eagle_input_ids": ids,
        "eagle_attention_mask": torch.ones_like(ids),
        "eagle_pixel_values": images,
        "state": state,
        "embodiment_id": P.embodiment_ids(1),
    }
    with torch.no_grad():
        x = model.sample_actions(batch, steps=1)
    assert x.shape == (1, 16, 32) and torch.isfinite(x).all()


# -- processor ----------------------------------------------------------------------------------


def test_min_max_round_trip_and_constant_dimensions():
    stats = {"min": [0.0, -1.0, 2.0], "max": [1.0, 1.0, 2.0]}
    x = torch.tensor([[0.5, 0.0, 2.0], [1.0, -1.0, 2.0]])
    y = P.min_max_normalize(x, stats)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]))
    torch.testing.assert_close(P.min_max_unnormalize(y, stats), x)
    with pytest.raises(ValueError, match="has 3 values, the data has 2"):
        P.min_max_normalize(x[:, :2], stats)
    with pytest.raises(KeyError, match="min"):
        P.min_max_normalize(x, {"max": [1, 1, 1]})


def test_padding_and_unpadding():
    state, smask = P.pad_state(torch.arange(8.0).view(1, 8), 64)
    assert state.shape == (1, 1, 64) and smask[0, 0, :8].all() and not smask[0, 0, 8:].any()
    torch.testing.assert_close(state[0, 0, :8], torch.arange(8.0))
    a = torch.randn(2, 3, 7)
    act, amask = P.pad_actions(a, 5, 32)
    assert act.shape == (2, 5, 32) and amask.sum() == 2 * 5 * 7
    torch.testing.assert_close(act[:, 3, :7], a[:, 2])  # the short chunk repeats its last step
    torch.testing.assert_close(P.unpad_actions(act, 7)[:, :3], a)
    with pytest.raises(ValueError, match="max_state_dim = 4"):
        P.pad_state(torch.zeros(1, 8), 4)
    assert P.embodiment_ids(3).tolist() == [31, 31, 31]


def test_image_preprocessing():
    img = torch.zeros(2, 40, 50, 3, dtype=torch.uint8)
    img[1] = 255
    x = P.preprocess_images(img, 28)
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full((3, 28, 28), -1.0))
    torch.testing.assert_close(x[1], torch.full((3, 28, 28), 1.0))
    with pytest.raises(ValueError, match="uint8"):
        P.preprocess_images(img.float(), 28)


# -- benchmark ------------------------------------------------------------------------------------


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    script = REPO / "benchmarks" / "gpu" / "groot.py"
    if not script.is_file():
        pytest.fail(f"{script} is missing")
    out = tmp_path / "groot_tiny.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(out)], check=True, env=env, timeout=600
    )
    res = json.loads(out.read_text())
    for mode in ("full", "lora", "frozen_backbone"):
        assert res[mode]["step_time_s"] > 0 and res[mode]["samples_per_s"] > 0, mode
    assert res["sample"]["latency_ms"] > 0 and res["parameters"] > 0

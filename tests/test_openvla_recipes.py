"""The `openvla` family trained and evaluated through vlatune: recipes, processor, save / load,
resume, the energy model, and one LIBERO episode.

Tiny policies come from the reference fixtures `$VLATUNE_REFERENCE_DIR/openvla{,_oft}` (default
`<repo>/../shared/reference`; tests skip when absent), copied with a tiny word-level tokenizer
(the Llama-2 tokenizer is not available here): OpenVLA's prompt ids are then not Llama's, but
every step after the tokenizer is the released model's.

    $ .venv/bin/python -m pytest tests/test_openvla_recipes.py -q
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from family_fixtures import (
    data_stats,
    one_libero_episode,
    random_observation,
    read_metrics,
    tiny_libero_data,
    tiny_run_config,
    train_config,
)

REPO = Path(__file__).resolve().parents[1]
REF_ROOT = Path(os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference")
RECIPES = REPO / "src" / "vlatune" / "configs" / "openvla"
WORDS = [
    "in",
    ":",
    "what",
    "action",
    "should",
    "the",
    "robot",
    "take",
    "to",
    "?",
    "out",
    "pick",
    "up",
    "alphabet",
    "soup",
    "and",
    "place",
    "it",
    "basket",
    "turn",
    "on",
    "stove",
]


def _fixture(name: str) -> Path:
    folder = REF_ROOT / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"no {name} reference fixture at {folder} (set VLATUNE_REFERENCE_DIR)")
    return folder


def tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer.json (ids < 100) with Llama's <unk> 0 / <s> 1 / </s> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in dict.fromkeys(WORDS):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))


def tiny_folder(name: str, dst: Path) -> Path:
    """The fixture's released files (+ reference_arch.json, its tower sizes) and a tokenizer."""
    src = _fixture(name)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("inputs.safetensors", "expected.safetensors", "keys.txt", "README.md"):
            shutil.copyfile(f, dst / f.name)
    tiny_tokenizer(dst)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openvla")
    return {
        "oft": tiny_folder("openvla_oft", root / "oft"),
        "openvla": tiny_folder("openvla", root / "openvla"),
        "data": tiny_libero_data(root),
    }


def _cfg(recipe: str, folders: dict, out: Path, *extra: str):
    pretrained = folders["openvla" if recipe == "openvla_libero" else "oft"]
    small = ("policy.energy.hidden=16", "policy.diffusion_steps_inference=4")
    return tiny_run_config(
        RECIPES / f"{recipe}.yaml", folders["data"], pretrained, out, *small, *extra
    )


def _train(recipe, folders, out, *extra):
    return train_config(_cfg(recipe, folders, out, *extra))


# -- recipes -----------------------------------------------------------------------------------
RECIPE_FILES = [
    "oft_libero.yaml",
    "oft_libero_diffusion.yaml",
    "oft_energy.yaml",
    "openvla_libero.yaml",
]


def test_every_openvla_recipe_is_trained_here():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(RECIPE_FILES)


@pytest.mark.parametrize("recipe", [f.removesuffix(".yaml") for f in RECIPE_FILES])
def test_recipe_trains_two_steps(recipe, folders, tmp_path):
    from vlatune.config import load_config

    full = load_config(RECIPES / f"{recipe}.yaml")
    assert full.policy.lora.r == 32 and full.policy.lora.dropout == 0.0
    if recipe != "openvla_libero":
        assert (full.optim.lr, full.data.batch_size, full.train.max_steps) == (5e-4, 8, 150000)
        assert full.optim.schedule == "multistep" and full.optim.decay_steps == [100000]
        assert full.policy.num_images == 2 and full.policy.use_proprio
    summary = _train(recipe, folders, tmp_path / "run")
    assert summary["steps"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    files = {p.name for p in (tmp_path / "run" / "checkpoint-2" / "policy").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "dataset_statistics.json",
        "processor.json",
    } <= files
    assert "lora_adapters.safetensors" in files
    if recipe != "openvla_libero":
        assert {"action_head--2_checkpoint.pt", "proprio_projector--2_checkpoint.pt"} <= files
    if recipe == "oft_libero_diffusion":
        assert "noisy_action_projector--2_checkpoint.pt" in files
        assert "diffusion_loss" in rows[0]
    if recipe == "oft_energy":
        assert "energy_model--2_checkpoint.pt" in files
        assert {"E_pos", "E_neg", "energy_loss", "lr_energy"} <= set(rows[0])
        assert rows[0]["energy_loss"] == pytest.approx(np.log(2), abs=0.05)  # 2-way InfoNCE
    if recipe == "openvla_libero":
        assert "token_accuracy" in rows[0]


def test_energy_group_has_its_own_lr_warmup_and_clipping(folders):
    from vlatune.policies import registry

    cfg = _cfg("oft_energy", folders, Path("/unused"), "policy.energy.warmup_steps=7")
    stats = _stats()
    policy = registry.build(cfg, stats)
    groups = policy.param_groups(cfg.optim)
    energy = [g for g in groups if g.get("name") == "energy"]
    assert len(energy) == 1
    e = energy[0]
    assert (e["lr"], e["warmup_steps"], e["max_grad_norm"]) == (5e-4, 7, 1.0)
    assert {id(p) for p in e["params"]} == {id(p) for p in policy.energy.parameters()}
    others = {id(p) for g in groups if g is not e for p in g["params"]}
    assert not others & {id(p) for p in e["params"]}
    # LoRA: the VLA's base weights are frozen, the adapters and heads train
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_A") for n in names)
    assert "vla.projector.fc1.weight" not in names
    assert "action_head.model.fc1.weight" in names and "proprio_projector.fc1.weight" in names


def _stats() -> dict:
    rng = np.random.default_rng(0)
    a, s = rng.normal(0, 0.3, (50, 7)), rng.normal(0, 1, (50, 8))
    a[:, 6] = np.sign(a[:, 6])

    def st(x):
        return {
            "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(),
            "min": x.min(0).tolist(),
            "max": x.max(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist(),
        }

    return {"action": st(a), "state": st(s)}


# -- the processor: training path == evaluation path -----------------------------------------
@pytest.mark.parametrize("recipe", ["oft_libero", "openvla_libero"])
def test_training_and_evaluation_inputs_are_identical(recipe, folders):
    from vlatune.data.training import FrameDataset, collate
    from vlatune.policies import registry

    cfg = _cfg(recipe, folders, Path("/unused"))
    stats = data_stats(folders["data"])
    ds = FrameDataset.from_config(folders["data"], cfg.data, stats, train=False)
    policy = registry.build(cfg, stats)
    ds.use_processor(policy.processor)
    k = 3
    frame = ds.frame(k)
    batch = collate([ds[k]])
    obs = {"images": frame["images"], "state": frame["state"], "instruction": frame["instruction"]}
    evald = policy.observation_batch([obs])
    keys = {"pixel_values", "input_ids", "attention_mask"} | (
        {"proprio"} if recipe == "oft_libero" else set()
    )
    assert keys <= set(evald)
    for key in keys:
        assert torch.equal(batch[key], evald[key]), key
    n_img = 2 if recipe == "oft_libero" else 1
    assert evald["pixel_values"].shape == (1, 6 * n_img, 28, 28)  # the fixture's image_sizes
    ids = evald["input_ids"][0][evald["attention_mask"][0]]
    assert ids[0] == 1 and ids[-1] == 29871  # BOS ... OpenVLA's space token
    if recipe == "openvla_libero":  # training adds the tokenised first action
        tok = batch["action_token_ids"][0]
        assert tok.shape == (7,) and bool(((tok > 31743) & (tok <= 32000)).all())


def test_gripper_and_bounds_steps_follow_oft():
    from vlatune.policies.openvla.processor import BoundsNormalize, Gripper

    g = Gripper(-1)
    s = g({"actions": np.array([[0.1] * 6 + [-1.0], [0.1] * 6 + [1.0]])}, None)
    assert s["actions"][:, -1].tolist() == [1.0, 0.0]  # env -1 open -> model 1 (open)
    # OFT: normalize_gripper_action (2g - 1, sign) then invert_gripper_action (x -1)
    out = g.inverse(np.array([[[0.0] * 6 + [0.9], [0.0] * 6 + [0.2]]]))
    assert out[0, :, -1].tolist() == [-1.0, 1.0]
    n = BoundsNormalize("actions", "actions", [-1.0, 0.0], [1.0, 2.0], [True, False])
    x = n({"actions": np.array([[0.5, 0.7], [3.0, 0.2]])}, None)["actions"]
    assert torch.allclose(x, torch.tensor([[0.5, 0.7], [1.0, 0.2]]))  # clipped, mask kept
    back = n.inverse(np.array([[[0.5, 0.7]]]))
    assert np.allclose(back, [[[0.5, 0.7]]])


def test_gripper_step_numbers_written_out():
    """The step's gripper values through vlatune.conventions (OFT's rule), written out: the
    training side (1 - e) / 2, the evaluation side -sign(2 g - 1) (0 at exactly 0.5)."""
    from vlatune.policies.openvla.processor import Gripper

    g = Gripper(-1)
    env = [-1.0, 1.0, 0.0, -0.5, 0.5, 0.25]
    a = np.zeros((len(env), 7))
    a[:, -1] = env
    a[:, 0] = 0.3
    s = g({"actions": a}, None)["actions"]
    assert s[:, -1].tolist() == [1.0, 0.0, 0.5, 0.75, 0.25, 0.375]
    assert s[:, :6].tolist() == a[:, :6].tolist()  # only the gripper dimension changes
    model = [0.0, 0.2, 0.49, 0.5, 0.51, 0.9, 1.0, 1.3, -0.2]
    chunk = np.zeros((1, len(model), 7))
    chunk[0, :, -1] = model
    out = g.inverse(chunk)[0, :, -1]
    assert out.tolist() == [1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0, 1.0]


def test_unnormalise_counts_out_of_range_queries():
    """OFT's un-normalisation does not clip; a query whose chunk leaves [-1, 1] by more than
    `normalize`'s tolerance on a normalised dimension is counted once, and the policy's
    processor sums it into `fallbacks()`."""
    from vlatune.policies.openvla.processor import BoundsNormalize, build_processor
    from vlatune.policies.processor import Normalize

    tol = Normalize.CLIP_TOLERANCE
    n = BoundsNormalize("actions", "actions", [-1.0, 0.0, 0.0], [1.0, 2.0, 1.0], [1, 1, 0])
    assert n.counters() == {"out_of_range_actions": 0}
    inside = np.zeros((2, 4, 3))
    inside[0, :, 0] = 1.0 + tol / 2  # within the tolerance
    inside[1, :, 2] = 5.0  # the unmasked (gripper) dimension is not normalised: not counted
    n.inverse(inside)
    assert n.counters() == {"out_of_range_actions": 0}
    past = np.zeros((3, 4, 3))
    past[0, 1, 0] = 1.5  # query 0: one value past the range
    past[0, 3, 1] = -2.0  # query 0 again: still one query
    past[2, 0, 1] = -1.0 - 2 * tol  # query 2
    back = n.inverse(past)
    assert n.counters() == {"out_of_range_actions": 2}
    assert back[0, 1, 0] == pytest.approx(1.5)  # not clipped (OFT's _unnormalize_actions)
    assert back[0, 3, 1] == pytest.approx(-1.0)
    n.inverse(past[2])  # one (H, A) chunk is one query
    assert n.counters() == {"out_of_range_actions": 3}
    state = BoundsNormalize("state", "proprio", [0.0], [1.0], [True])
    assert state.counters() == {}

    st = _stats()
    proc = build_processor(
        cameras=["agentview"],
        image_size=28,
        tokenizer=None,
        max_tokens=8,
        action_stats=st["action"],
        proprio_stats=st["state"],
        norm_type="bounds_q99",
        variant="oft",
        horizon=8,
    )
    proc.postprocess(np.zeros((1, 8, 7)))
    assert proc.fallbacks() == {"out_of_range_actions": 0}
    chunk = np.zeros((2, 8, 7))
    chunk[1, 5, 2] = 1.3
    proc.postprocess(chunk)
    assert proc.fallbacks() == {"out_of_range_actions": 1}


# -- save / load / resume ----------------------------------------------------------------------
def _batch(policy, folders, seed=0):
    obs = random_observation(("agentview", "wrist"), seed)
    return obs, policy.observation_batch([obs])


@pytest.mark.parametrize(
    "recipe,merge,film",
    [
        ("oft_energy", False, False),
        ("oft_energy", True, False),
        ("oft_libero_diffusion", False, False),
        ("oft_libero", False, True),
        ("openvla_libero", True, False),
    ],
)
def test_save_load_predicts_the_same(recipe, merge, film, folders, tmp_path):
    from vlatune.policies import load as load_any
    from vlatune.policies import registry

    cfg = _cfg(
        recipe,
        folders,
        tmp_path,
        f"policy.merge_lora_on_save={str(merge).lower()}",
        f"policy.film={str(film).lower()}",
    )
    policy = registry.build(cfg, _stats())
    with torch.no_grad():  # as after training: adapters, FiLM and energy away from their init
        for n, p in policy.named_parameters():
            if "lora_B" in n or "energy" in n or ".scale." in n or ".shift." in n:
                p.add_(0.05 * torch.randn_like(p))
    policy.eval().save(tmp_path / "checkpoint-4" / "policy")
    back = load_any(tmp_path / "checkpoint-4" / "policy")
    assert type(back).__name__ == "OpenVLAPolicy" and back.step == 4
    obs, batch = _batch(policy, folders)
    batch["noise"] = torch.randn(1, 8, 7, generator=torch.Generator().manual_seed(1))
    a, b = policy.predict_chunk(batch), back.eval().predict_chunk(dict(batch))
    if merge:  # base = merged - B A: equal to float rounding
        assert torch.allclose(a, b, atol=1e-5)
    else:
        assert torch.equal(a, b)
        for k, v in policy.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k
    if policy.energy is not None:
        for k, v in policy.energy.state_dict().items():
            assert torch.equal(v, back.energy.state_dict()[k]), k
    if not recipe.endswith("diffusion"):  # the whole eval path: processor, model, inverse
        assert np.allclose(policy.predict(obs), back.predict(obs), atol=1e-4)
    saved = tmp_path / "checkpoint-4" / "policy"
    if film:  # OFT's layout: the FiLM-wrapped towers in their own side file
        side = torch.load(saved / "vision_backbone--4_checkpoint.pt", weights_only=True)
        assert "vision_backbone.featurizer.blocks.0.scale.weight" in side
        assert back.vla.vision_backbone.film
    if recipe != "openvla_libero":  # side files: tensor dicts (weights_only), DDP prefix
        side = torch.load(saved / "action_head--4_checkpoint.pt", weights_only=True)
        assert all(k.startswith("module.") for k in side)
    if merge:  # model.safetensors is the merged VLA
        sd = load_file(str(tmp_path / "checkpoint-4" / "policy" / "model.safetensors"))
        w = policy.vla.language_model.model.layers[0].self_attn.q_proj
        merged = sd["language_model.model.layers.0.self_attn.q_proj.weight"]
        assert torch.allclose(merged, w.weight + w.delta())
        assert not torch.allclose(merged, w.weight)


def test_resume_is_exact_with_the_energy_model(folders, tmp_path):
    extra = ("policy.merge_lora_on_save=false", "train.save_every=1", "train.keep_last=5")
    _train("oft_energy", folders, tmp_path / "straight", *extra, "train.max_steps=3")
    _train("oft_energy", folders, tmp_path / "resumed", *extra, "train.max_steps=2")
    summary = _train("oft_energy", folders, tmp_path / "resumed", *extra, "train.max_steps=3")
    assert summary["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    a = tmp_path / "straight" / "checkpoint-3" / "policy"
    b = tmp_path / "resumed" / "checkpoint-3" / "policy"
    for name in (
        "model.safetensors",
        "lora_adapters.safetensors",
    ):
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    for name in ("energy_model--3_checkpoint.pt", "action_head--3_checkpoint.pt"):
        sa, sb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    la, lb = read_metrics(tmp_path / "straight")[-1], read_metrics(tmp_path / "resumed")[-1]
    assert la["energy_loss"] == lb["energy_loss"] and la["loss"] == lb["loss"]


def test_released_fixture_loads_through_the_registry(folders):
    """A released OFT folder (no processor.json): sizes from reference_arch.json, processor from
    dataset_statistics.json; its actions are the fixture's bounds_q99 un-normalisation."""
    from vlatune.policies import load as load_any

    policy = load_any(folders["oft"])
    assert (
        policy.spec["variant"] == "oft" and policy.spec["unnorm_key"] == "libero_spatial_no_noops"
    )
    assert policy.conventions["cameras"] == ["agentview", "wrist"]
    obs, _ = _batch(policy, folders)
    act = policy.predict(obs)
    assert act.shape == (8, 7) and set(np.unique(act[:, -1])) <= {-1.0, 1.0}
    assert set(policy.fallbacks()) >= {"out_of_range_actions"}  # the un-normalisation's counter
    # without a tokenizer the folder still loads; running the processor says what is missing
    bare = _fixture("openvla_oft")
    policy = load_any(bare)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        policy.predict(obs)


def test_build_without_pretrained_is_refused(folders):
    from vlatune.policies import registry

    cfg = _cfg("oft_libero", folders, Path("/unused"), "policy.pretrained=null")
    with pytest.raises(ValueError, match="policy.pretrained"):
        registry.build(cfg, _stats())


# -- one LIBERO episode ------------------------------------------------------------------------
@pytest.mark.sim
def test_trained_oft_runs_one_libero_episode(folders, tmp_path):
    _train("oft_libero", folders, tmp_path / "run")
    one_libero_episode(tmp_path / "run" / "checkpoint-2", tmp_path / "eval", max_steps=8, replan=8)

"""The pi0 family trained and evaluated through vlatune: recipes, processor, save / load, resume, eval.

Tiny models only: the LeRobot-made fixtures `tests/fixtures/pi0_variants/pi0_b` / `pi05_b` (28 px,
3 layers, random weights) stand in for `lerobot/pi0_base` / `lerobot/pi05_base`, and a word-level
tokenizer built here for PaliGemma's. The data is a small LIBERO HDF5 set the tests write.

    $ .venv/bin/python -m pytest tests/test_pi0_recipes.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import make_libero_hdf5
from tests.family_fixtures import one_libero_episode

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["libero_full.yaml", "libero_lora.yaml", "pi05_libero_full.yaml", "pi05_libero_lora.yaml"]
FIXTURES = REPO / "tests" / "fixtures" / "pi0_variants"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer (pad 0, unk 1) covering the test instructions and pi0.5's prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "Task", "State", "Action", ":", ",", ";"]
    words += [
        "pick",
        "the",
        "alphabet",
        "soup",
        "and",
        "place",
        "it",
        "in",
        "basket",
        "turn",
        "on",
        "stove",
    ]
    words += [str(i) for i in range(256)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tok") / "paligemma_tiny"
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_libero_hdf5(tmp_path_factory.mktemp("pi0data") / "data", demos=2, T=10, res=32)


def _overrides(recipe: str, data: Path, tok: Path, run: Path, *extra: str) -> list[str]:
    fixture = "pi05_b" if recipe.startswith("pi05") else "pi0_b"
    return [
        f"data.path={data}",
        "data.format=auto",
        "data.image_size=28",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.subset=null",
        "data.val_fraction=0",
        f"policy.pretrained={FIXTURES / fixture}",
        f"policy.tokenizer={tok}",
        f"train.output_dir={run}",
        "train.max_steps=2",
        "train.save_every=2",
        "train.log_every=1",
        "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
        *extra,
    ]


def _yaml(recipe: str) -> str:
    return recipe if recipe.endswith(".yaml") else f"{recipe}.yaml"


def _config(recipe: str, data: Path, tok: Path, run: Path, *extra: str):
    from vlatune.config import load_config

    return load_config(
        REPO / "configs" / "pi0" / _yaml(recipe), _overrides(recipe, data, tok, run, *extra)
    )


def _train(recipe, data, tok, run, *extra):
    from vlatune.train.trainer import train

    return train(_config(recipe, data, tok, run, *extra), progress=False)


# ---- recipes -----------------------------------------------------------------------------------
def test_recipes_hold_the_seeds_settings():
    from vlatune.config import load_config

    full = load_config(REPO / "configs/pi0/libero_full.yaml")
    lora = load_config(REPO / "configs/pi0/libero_lora.yaml")
    for cfg in (full, lora):
        assert cfg.data.action_horizon == 10 and cfg.eval.replan == 10
        assert (cfg.eval.trials, cfg.eval.seed, cfg.eval.resolution) == (50, 7, 224)
        assert cfg.optim.weight_decay == 0.0 and cfg.optim.max_grad_norm == 1.0
        assert cfg.optim.schedule == "constant" and cfg.train.mixed_precision == "bf16"
    assert full.optim.lr == 2e-5 and full.train.max_epochs == 24 and full.policy.lora is None
    assert lora.optim.lr == 5e-4 and lora.train.max_epochs == 18
    assert (lora.policy.lora.r, lora.policy.lora.dropout) == (32, 0.0)
    assert "configs/accelerate/fsdp.yaml" in (REPO / "configs/pi0/libero_full.yaml").read_text()
    p05 = load_config(REPO / "configs/pi0/pi05_libero_lora.yaml")
    assert p05.policy.variant == "pi05" and p05.data.normalization == "q99" and p05.policy.lora


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, dataset, tokenizer_dir, tmp_path):
    summary = _train(recipe, dataset, tokenizer_dir, tmp_path / "run")
    assert summary["steps"] == 2
    policy_dir = tmp_path / "run" / "checkpoint-2" / "policy"
    for name in ("config.json", "model.safetensors", "processor.json", "tokenizer"):
        assert (policy_dir / name).exists(), name
    cfg = json.loads((policy_dir / "config.json").read_text())
    assert cfg["output_features"]["action"]["shape"] == [7] and cfg["chunk_size"] == 10
    assert cfg["input_features"]["observation.state"]["shape"] == [8]
    assert (policy_dir / "lora_adapters.safetensors").is_file() == ("lora" in recipe)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_hub_id_is_refused_with_the_download_command(dataset, tokenizer_dir, tmp_path):
    from vlatune.policies.pi0.family import build_policy

    cfg = _config("pi05_libero_full", dataset, tokenizer_dir, tmp_path / "r")
    cfg.policy.pretrained = "lerobot/pi05_base"
    with pytest.raises(FileNotFoundError, match="huggingface-cli download lerobot/pi05_base"):
        build_policy(cfg, {})
    cfg.policy.pretrained = str(FIXTURES / "pi0_b")
    with pytest.raises(ValueError, match="set policy.variant=pi0"):
        build_policy(cfg, _stats(dataset, cfg))


def _stats(data: Path, cfg):
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats

    reader = open_dataset(data)
    try:
        return json.loads(json.dumps(dataset_stats(reader)))
    finally:
        reader.close()


# ---- processor: the training path and the evaluation path agree bit for bit -------------------
@pytest.mark.parametrize("recipe", ["libero_full", "pi05_libero_full"])
def test_training_and_evaluation_inputs_are_identical(recipe, dataset, tokenizer_dir, tmp_path):
    from vlatune.data.training import FrameDataset
    from vlatune.policies.pi0.family import build_policy

    cfg = _config(recipe, dataset, tokenizer_dir, tmp_path / "r")
    stats = _stats(dataset, cfg)
    policy = build_policy(cfg, stats)
    ds = FrameDataset.from_config(dataset, cfg.data, stats, train=False)
    ds.use_processor(policy.processor)
    k = 7
    train_batch = policy.processor.collate([ds[k]])
    frame = ds.frame(k)
    obs = {"images": frame["images"], "state": frame["state"], "instruction": frame["instruction"]}
    eval_batch = policy.observation_batch([obs])
    keys = {"images", "img_masks", "tokens", "token_masks", "state", "actions"}
    if recipe.startswith("pi05"):
        keys -= {"state"}
    assert set(train_batch) == keys and set(eval_batch) == keys - {"actions"}
    for key in keys - {"actions"}:
        a, b = train_batch[key], eval_batch[key]
        if isinstance(a, list):
            assert len(a) == len(b) == 3  # agentview, wrist, the empty slot
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), key
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), key
    assert train_batch["images"][0].shape == (1, 3, 28, 28)
    assert train_batch["images"][0].min() >= -1 and train_batch["images"][2].eq(-1).all()
    assert train_batch["img_masks"][2].tolist() == [False]
    assert train_batch["actions"].shape == (1, 10, policy.cfg.max_action_dim)
    assert train_batch["tokens"].shape == (1, policy.cfg.tokenizer_max_length)
    assert train_batch["token_masks"].sum() > 1  # the instruction's words were tokenised
    # a different observation changes the inputs (the comparison can fail)
    other = dict(obs, instruction=obs["instruction"] + " and the basket")
    assert not torch.equal(policy.observation_batch([other])["tokens"], eval_batch["tokens"])


def test_postprocess_undoes_normalisation_and_padding(dataset, tokenizer_dir, tmp_path):
    from vlatune.policies.pi0.family import build_policy

    cfg = _config("libero_full", dataset, tokenizer_dir, tmp_path / "r")
    stats = _stats(dataset, cfg)
    policy = build_policy(cfg, stats)
    env = np.asarray(stats["action"]["mean"]) + np.asarray(stats["action"]["std"]) * 0.5
    chunk = np.full((1, 10, policy.cfg.action_dim), 0.5)
    out = policy.processor.postprocess(chunk)
    assert out.shape == (1, 10, 7)
    np.testing.assert_allclose(out[0, 0], env, rtol=1e-6, atol=1e-9)  # gripper un-normalised too


# ---- save / load / resume ----------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["libero_full", "libero_lora", "pi05_libero_lora"])
def test_save_load_gives_the_same_chunk_and_resume_continues(
    recipe, dataset, tokenizer_dir, tmp_path
):
    from vlatune.policies import load
    from vlatune.policies.pi0.family import Pi0FamilyPolicy

    run = tmp_path / "run"
    _train(recipe, dataset, tokenizer_dir, run)
    ckpt = run / "checkpoint-2"
    policy = load(ckpt)
    assert isinstance(policy, Pi0FamilyPolicy)
    assert policy.has_lora() == ("lora" in recipe)
    again = load(ckpt / "policy")
    obs = {
        "images": {c: np.full((32, 32, 3), 90, np.uint8) for c in ("agentview", "wrist")},
        "state": np.linspace(-0.5, 0.5, 8),
        "instruction": "pick the alphabet soup and place it in the basket",
    }
    batch = policy.observation_batch([obs])
    batch["noise"] = torch.randn(
        1, 10, policy.cfg.max_action_dim, generator=torch.Generator().manual_seed(0)
    )
    policy.eval(), again.eval()
    a, b = policy.predict_chunk(batch), again.predict_chunk(batch)
    assert a.shape == (1, 10, 7) and torch.equal(a, b)
    # the saved file is the merged model: LeRobot's layout alone gives the same chunk
    from vlatune.policies.pi0.convert import load_released
    from vlatune.policies.pi0.policy import Pi0Policy

    bare = Pi0Policy(load_released(ckpt / "policy")[0]).eval()
    torch.testing.assert_close(bare.predict_chunk(batch), a, atol=1e-5, rtol=1e-5)
    # resume: 2 -> 3 steps from the checkpoint, the adapters / weights continue
    summary = _train(recipe, dataset, tokenizer_dir, run, "train.max_steps=3", "train.save_every=3")
    assert summary["steps"] == 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    resumed = load(run / "checkpoint-3")
    assert not torch.equal(resumed.predict_chunk(batch), a)  # it trained one more step


def test_load_without_processor_names_the_file(tmp_path):
    from vlatune.policies.pi0.family import load_policy

    with pytest.raises(FileNotFoundError, match="processor.json not found"):
        load_policy(FIXTURES / "pi0_b")


# ---- evaluation in the simulator ----------------------------------------------------------------
@pytest.mark.sim
def test_trained_tiny_pi0_runs_one_libero_episode(dataset, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    _train("libero_full", dataset, tokenizer_dir, run)
    one_libero_episode(
        run / "checkpoint-2", tmp_path / "eval", max_steps=12, replan=10, resolution=32
    )

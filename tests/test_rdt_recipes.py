"""The `rdt` family's workflow on tiny random models: recipes train, the processor is one chain
for training and evaluation, save / load / resume, LIBERO's actions round-trip, `vlatune eval`.

Tiny pieces: a 2-block RDT (hidden 32) saved in the released layout, a 1-layer SigLIP (32 px,
16 patches: 2 frames x 3 slots x 16 = 96 image tokens) and a 1-layer T5 (32-d), a LIBERO HDF5
dataset of 32 px frames.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import make_libero_hdf5
from family_fixtures import one_libero_episode
from hf_fixtures import tiny_siglip_vision, tiny_t5_encoder
from vlatune.policies.rdt.configuration import RDTConfig

ROOT = Path(__file__).resolve().parents[1] / "src" / "vlatune" / "configs" / "rdt"
RECIPES = ["libero_full.yaml", "libero_lora.yaml"]
H = 4  # the tiny RDT's pred_horizon = data.action_horizon


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from vlatune.policies.rdt.convert import save_released
    from vlatune.policies.rdt.modeling import RDTRunner

    root = tmp_path_factory.mktemp("rdt_parts")
    cfg = RDTConfig.from_dict(
        {
            "action_dim": 128,
            "pred_horizon": H,
            "lang_token_dim": 32,
            "img_token_dim": 32,
            "state_token_dim": 128,
            "max_lang_cond_len": 16,
            "img_cond_len": 2 * 3 * 16,
            "lang_pos_embed_config": [["lang", -16]],
            "img_pos_embed_config": [["image", [2, 3, -16]]],
            "rdt": {"hidden_size": 32, "depth": 2, "num_heads": 4},
        },
        released=False,
    )
    torch.manual_seed(0)
    runner = RDTRunner(cfg)
    with torch.no_grad():  # upstream zeroes the last linear: make outputs depend on inputs
        for p in runner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {
        "rdt": save_released(runner, root / "rdt"),
        "siglip": tiny_siglip_vision(root / "siglip"),
        "t5": tiny_t5_encoder(root / "t5"),
        "data": make_libero_hdf5(root / "data", demos=2, T=8, res=32),
        "cache": root / "lang",
    }


def overrides(parts, run: Path, *extra: str) -> list[str]:
    return [
        f"data.path={parts['data']}",
        f"data.action_horizon={H}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_fraction=0",
        f"policy.pretrained={parts['rdt']}",
        f"policy.vision_encoder={parts['siglip']}",
        f"policy.text_encoder={parts['t5']}",
        f"policy.language_cache={parts['cache']}",
        "policy.max_text_tokens=16",
        f"train.output_dir={run}",
        "train.max_steps=2",
        "train.save_every=2",
        "train.max_minutes=null",
        "train.val_every=null",
        "train.mixed_precision=no",
        *extra,
    ]


def train_recipe(recipe: str, parts, run: Path, *extra: str) -> dict:
    from vlatune.config import load_config
    from vlatune.train.trainer import train

    cfg = load_config(ROOT / recipe, overrides(parts, run, *extra))
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rdt_run") / "run"
    train_recipe("libero_full.yaml", parts, run)
    return run


def test_recipes_load_with_the_seed_settings():
    from vlatune.config import load_config

    full, lora = (load_config(ROOT / r) for r in RECIPES)
    for c in (full, lora):
        assert c.policy.type == "rdt" and c.data.batch_size == 32 and c.optim.lr == 1e-4
        assert c.train.max_steps == 200_000 and c.train.save_every == 5000
        assert c.train.mixed_precision == "bf16" and c.data.augment.enabled
        assert c.policy.unified["ctrl_freq"] == 20.0 and c.data.action_horizon == 64
    assert full.policy.lora is None and lora.policy.lora.r == 32


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, parts, tmp_path):
    summary = train_recipe(recipe, parts, tmp_path / "run")
    assert summary["steps"] == 2
    pol = tmp_path / "run" / "checkpoint-2" / "policy"
    names = {p.name for p in pol.iterdir()}
    assert {"config.json", "model.safetensors", "processor.json", "rdt_policy.json"} <= names
    assert "language_embeddings.safetensors" in names and "vision_encoder" in names
    assert ("adapter_model.safetensors" in names) == (recipe == "libero_lora.yaml")
    # the released layout stays loadable by the strict released loader (LoRA base unwrapped)
    from vlatune.policies.rdt.convert import load_released

    load_released(pol)
    from vlatune.policies import load

    lora_b = [v for k, v in load(pol).runner.state_dict().items() if "lora_B" in k]
    assert bool(lora_b) == (recipe == "libero_lora.yaml")
    assert all(v.abs().sum() > 0 for v in lora_b)  # trained adapters came back


def test_lora_trains_only_adapters_and_adaptors(parts):
    from vlatune.config import load_config
    from vlatune.policies.rdt.family import build_policy

    cfg = load_config(ROOT / "libero_lora.yaml", overrides(parts, Path("unused")))
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats

    stats = dataset_stats(open_dataset(parts["data"]))
    policy = build_policy(cfg, stats)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(
        "lora_" in n or n.split(".")[1] in ("lang_adaptor", "img_adaptor", "state_adaptor")
        for n in trained
    )
    assert any(".attn.qkv.lora_A" in n for n in trained)
    assert any(".cross_attn.kv.lora_B" in n for n in trained)
    assert any(".ffn.fc2.lora_A" in n for n in trained)
    assert not any(n.startswith("vision.") for n in trained)


def _frame_as_observation(frame: dict) -> dict:
    """What the runner gives the policy: the current images and the earlier ones it rendered."""
    obs = {"images": frame["images"], "state": frame["state"], "instruction": frame["instruction"]}
    if "image_history" in frame:
        obs["image_history"] = frame["image_history"]
    return obs


def test_training_and_evaluation_paths_give_identical_model_inputs(trained):
    from vlatune.data.training import FrameDataset
    from vlatune.policies import load

    policy = load(trained / "checkpoint-2")
    from vlatune.config import load_config

    cfg = load_config(trained / "config.yaml")
    stats = json.loads((trained / "stats.json").read_text())
    ds = FrameDataset.from_config(cfg.data.path, cfg.data, stats, train=False)
    ds.use_processor(policy.processor)
    assert policy.image_history == policy.processor.image_history == 2
    model_keys = {"images", "image_mask", "state", "unified_mask", "ctrl_freq", "instruction"}
    batches = {}
    for k in (5, 0):  # frame 5 (with frame 4 as history), frame 0 (an episode's start)
        batch_train = policy.processor.collate([ds[k]])
        frame = ds.frame(k)
        assert len(frame["image_history"]["agentview"]) == min(k, 1)
        batch_eval = policy.observation_batch([_frame_as_observation(frame)])
        assert model_keys <= set(batch_eval)
        for key in model_keys:
            a, b = batch_train[key], batch_eval[key]
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), (k, key)
            else:
                assert a == b, (k, key)
        batches[k] = batch_eval
    # RDT's grid: 2 frames x 3 slots [t-1: agentview, wrist, left wrist | t: ...]; the left
    # wrist is background, and so is t-1 at an episode's start (RDT's rule), masked
    batch_eval, first = batches[5], batches[0]
    assert batch_eval["images"].shape == (1, 6, 3, 32, 32)
    assert batch_eval["image_mask"].tolist() == [[True, True, False, True, True, False]]
    assert first["image_mask"].tolist() == [[False] * 3 + [True, True, False]]
    background = torch.full((3, 32, 32), 127, dtype=torch.uint8)
    assert torch.equal(first["images"][0, 0], background)
    assert torch.equal(batch_eval["images"][0, 2], background)
    previous = policy.observation_batch([_frame_as_observation(ds.frame(4))])
    assert torch.equal(batch_eval["images"][0, :2], previous["images"][0, 3:5])  # frame 4's
    assert batch_eval["state"].shape == (1, 1, 128) and batch_eval["ctrl_freq"].item() == 20.0
    # the model-level batch is what the RDT runner consumes
    lang, lang_mask, img, *_ = policy._conditions(batch_eval)
    assert img.shape == (1, 96, 32) and lang.shape[-1] == 32 and lang_mask.all()


def test_libero_action_goes_in_and_comes_out_unchanged(trained):
    """Frame actions -> normalise -> 128-d unified -> postprocess -> the same 7-d actions."""
    from vlatune.policies import load

    policy = load(trained / "checkpoint-2")
    proc = policy.processor
    rng = np.random.default_rng(0)
    stats = json.loads((trained / "stats.json").read_text())["action"]
    lo, hi = np.array(stats["q01"]), np.array(stats["q99"])
    actions = lo + (hi - lo) * rng.uniform(0.05, 0.95, size=(H, 7))
    actions[:, 6] = rng.choice([-1.0, 1.0], size=H)
    frame = {
        "images": {c: np.zeros((32, 32, 3), np.uint8) for c in ("agentview", "wrist")},
        "state": rng.normal(size=8),
        "instruction": "x",
        "actions": actions,
        "action_mask": torch.ones(H, dtype=torch.bool),
    }
    sample = proc(frame)
    u = sample["actions"]
    assert u.shape == (H, 128) and u.dtype == torch.float32
    mask = sample["unified_mask"][0]
    assert torch.all(u[:, mask == 0] == 0) and mask[[39, 40, 41, 42, 43, 44, 10]].all()
    back = proc.postprocess(u[None])[0]
    np.testing.assert_allclose(back, actions, rtol=0, atol=1e-6)
    assert np.array_equal(back[:, 6], actions[:, 6])
    assert proc.fallbacks().get("clipped_actions", 0) == 0


def test_save_load_same_chunk_and_resume_continues(parts, trained, tmp_path, caplog):
    from vlatune.policies import load

    a = load(trained / "checkpoint-2").eval()
    a.save(tmp_path / "copy")
    b = load(tmp_path / "copy").eval()
    obs = {
        "images": {c: np.full((32, 32, 3), 90, np.uint8) for c in ("agentview", "wrist")},
        "state": np.linspace(-0.5, 0.5, 8),
        "instruction": a.language.known and sorted(a.language.known)[0],
    }
    batch = a.observation_batch([obs])
    noise = torch.randn(1, H, 128, generator=torch.Generator().manual_seed(0))
    ca, cb = a.predict_chunk(batch, noise=noise), b.predict_chunk(batch, noise=noise)
    assert torch.equal(ca, cb) and ca.abs().sum() > 0
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # the trained instructions need no T5 at evaluation; an unseen one says what is missing
    b.language.encoder_id = None
    assert b.predict(obs).shape == (H, 7)
    with pytest.raises(KeyError, match="policy.text_encoder"):
        b.predict({**obs, "instruction": "an instruction never trained on"})
    # resume: the same run to 3 steps continues from checkpoint-2, exactly as a straight run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with caplog.at_level(logging.INFO, logger="vlatune"):
        resumed = train_recipe("libero_full.yaml", parts, run, "train.max_steps=3")
    assert resumed["steps"] == 3 and "(step 2)" in caplog.text
    straight = train_recipe("libero_full.yaml", parts, tmp_path / "straight", "train.max_steps=3")
    assert resumed["param_checksum_per_process"] == straight["param_checksum_per_process"]


def test_released_folder_without_processor_is_a_clear_error(parts):
    from vlatune.policies.rdt.family import load_policy

    with pytest.raises(FileNotFoundError, match="processor.json"):
        load_policy(parts["rdt"])


def test_build_refuses_a_horizon_other_than_the_models(parts, tmp_path):
    with pytest.raises(Exception, match="pred_horizon"):
        train_recipe("libero_full.yaml", parts, tmp_path / "run", "data.action_horizon=5")


def test_rdt_counts_clipped_actions(trained):
    """The inverse clips q99-normalised predictions to [-1, 1] (`normalize`): counted as the
    fallback `clipped_actions`, once per query, summed in `policy.fallbacks()`."""
    from vlatune.policies import load

    policy = load(trained / "checkpoint-2")
    idx = policy.processor.steps[3].mapping.action_indices
    chunk = torch.zeros(3, H, 128)
    chunk[1, 0, idx[2]] = 3.0  # far outside the training range in query 1
    chunk[2, :, idx[6]] = 5.0  # the gripper is a sign, never counted
    actions = policy.processor.postprocess(chunk)
    assert policy.fallbacks().get("clipped_actions") == 1
    hi = json.loads((trained / "stats.json").read_text())["action"]["q99"][2]
    assert actions[1, 0, 2] == pytest.approx(hi)


class _HistoryRecorder:
    """A policy that reads 2 frames, as RDT does: records the observations the runner gives it."""

    needs_images = True
    image_history = 2

    def __init__(self, conventions: dict):
        self.conventions, self.seen = conventions, []

    def reset(self, ctx) -> None:
        return None

    def predict(self, obs):
        self.seen.append(obs)
        return np.zeros((4, 7))

    def describe(self) -> dict:
        return {"policy": "history recorder"}


@pytest.mark.sim
def test_runner_gives_the_previous_rendered_step_on_libero(tmp_path):
    """One short libero_object episode: each query after the first carries the frame of the env
    step just before it (rendered for the policy), the first none (the episode's start)."""
    from vlatune.conventions import ENV_CONVENTIONS
    from vlatune.eval.runner import EvalSpec, _EnvCache, plan, run_episode

    spec = EvalSpec(
        policy="x", tasks=[0], trials=1, max_steps=6, replan=3, resolution=64, video="none",
        out=tmp_path,
    )  # fmt: skip
    policy = _HistoryRecorder({**ENV_CONVENTIONS, "cameras": ["agentview", "wrist"]})
    envs = _EnvCache(spec, render=True)
    try:
        record = run_episode(spec, policy, envs, plan(spec)[0])
        env = envs.get(spec.suite, 0)
        assert record["exception"] is None and record["steps"] == 6 and record["queries"] == 2
        first, second = policy.seen
        assert first["image_history"] == {"agentview": [], "wrist": []}
        # replay the same episode by hand: the frame of step 2 is the history of the query at 3
        obs = env.reset(plan(spec)[0]["init_index"], render=True)
        assert np.array_equal(obs["images"]["agentview"], first["images"]["agentview"])
        for _ in range(2):
            obs, _, _ = env.step(np.zeros(7), render=True)
        for cam in ("agentview", "wrist"):
            (past,) = second["image_history"][cam]
            assert past.shape == (64, 64, 3) and past.dtype == np.uint8
            assert np.array_equal(past, obs["images"][cam]), cam
    finally:
        envs.close()


@pytest.mark.sim
def test_trained_policy_runs_one_libero_episode(trained, tmp_path):
    e, _ = one_libero_episode(
        trained / "checkpoint-2", tmp_path / "eval", max_steps=4, replan=4, video="all"
    )
    assert e["video"]
    assert (tmp_path / "eval" / "results.csv").read_text().startswith("level,name,instruction")

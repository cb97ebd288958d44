"""GR00T N1.5 recipes: the processor chain, training, save / load / resume and one LIBERO episode.

A tiny GR00T folder is the reference fixture's checkpoint (`../shared/reference/groot_n15`:
config.json, eagle_config.json, model.safetensors) plus a word-level tokenizer built here with
the `tokenizers` library, whose `<IMG_CONTEXT>` has the fixture's image token id 500 (the
fixture's vocabulary is 512). Skipped with one sentence when the fixture is absent.

    $ .venv/bin/python -m pytest tests/test_groot_recipes.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import make_libero_hdf5
from tests.family_fixtures import one_libero_episode

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "src" / "vlatune" / "configs" / "groot"
REFERENCE_DIR = Path(
    os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference"
)
IMAGE_TOKEN_ID = 500
WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    ".",
    "pick",
    "up",
    "the",
    "alphabet",
    "soup",
    "and",
    "place",
    "it",
    "in",
    "basket",
    "cream",
    "cheese",
    "image",
    "img",
    "1",
    "2",
    "[",
    "]",
    "'",
    "<",
    ">",
    "/",
    "put",
    "open",
    "close",
    "bowl",
    "plate",
    "on",
    "top",
    "of",
    "drawer",
]


def _tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>"]
    vocab = {t: i for i, t in enumerate([*specials, *dict.fromkeys(WORDS)])}
    vocab["<IMG_CONTEXT>"] = IMAGE_TOKEN_ID
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[
            "<|im_start|>",
            "<|im_end|>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
        ],
    )
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_groot(tmp_path_factory) -> Path:
    src = REFERENCE_DIR / "groot_n15"
    if not (src / "config.json").is_file():
        pytest.skip(f"no groot_n15 reference fixture at {src} (set VLATUNE_REFERENCE_DIR)")
    folder = tmp_path_factory.mktemp("groot") / "tiny"
    folder.mkdir()
    for name in ("config.json", "eagle_config.json", "model.safetensors"):
        shutil.copy(src / name, folder / name)
    _tokenizer(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_libero_hdf5(tmp_path_factory.mktemp("groot_data") / "data", demos=2, T=12, res=32)


def _overrides(tiny: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        "data.format=auto",
        "data.image_size=32",
        "data.batch_size=2",
        "data.num_workers=0",
        f"policy.pretrained={tiny}",
        "policy.tokenizer=null",
        f"train.output_dir={run}",
        "train.max_steps=2",
        "train.max_epochs=null",
        "train.mixed_precision=no",
        "train.save_every=1",
        "train.keep_last=5",
        "train.val_every=null",
        *extra,
    ]


def _cfg(recipe: str, *overrides: str):
    from vlatune.config import load_config

    return load_config(RECIPES / recipe, list(overrides))


def test_recipes_load_with_the_seed_settings():
    full, lora = _cfg("libero_full.yaml"), _cfg("libero_lora.yaml")
    assert full.policy.type == "groot" and full.policy.embodiment_id == 31
    assert full.optim.lr == 2e-5 and full.optim.schedule == "constant"
    assert full.train.max_epochs == 24 and full.train.mixed_precision == "bf16"
    assert full.data.action_horizon == 10 and full.data.image_size == 224
    assert full.policy.num_inference_steps == 4 and full.data.cameras == ["agentview", "wrist"]
    assert (full.eval.replan, full.eval.trials, full.eval.resolution) == (10, 50, 224)
    assert lora.policy.lora is not None and not lora.policy.tune_llm
    assert not lora.policy.tune_visual and not lora.policy.tune_diffusion_model


@pytest.mark.parametrize("recipe", ["libero_full.yaml", "libero_lora.yaml"])
def test_recipe_trains_two_steps_and_resumes(recipe, tiny_groot, dataset, tmp_path):
    from vlatune.policies import load
    from vlatune.train.trainer import train

    run = tmp_path / "run"
    summary = train(_cfg(recipe, *_overrides(tiny_groot, dataset, run)), progress=False)
    assert summary["steps"] == 2
    policy_dir = run / "checkpoint-2" / "policy"
    for name in ("config.json", "eagle_config.json", "model.safetensors", "processor.json"):
        assert (policy_dir / name).is_file(), name
    from safetensors import safe_open

    with safe_open(str(policy_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("backbone.", "action_head.")) for k in keys)
    assert json.loads((policy_dir / "config.json").read_text())["action_horizon"] == 10
    policy = load(run / "checkpoint-2")
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    if recipe == "libero_lora.yaml":
        assert (policy_dir / "lora.safetensors").is_file()
        assert any(n.startswith("lora.") for n in trainable)
        assert not any(n.startswith(("model.backbone.", "model.head.dit.")) for n in trainable)
        # the adapters moved in two steps (B starts at zero)
        assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if n.endswith(".B"))
    else:
        assert any(n.startswith("model.backbone.llm.") for n in trainable)  # tune_llm true
    # resume: 2 -> 3 steps from checkpoint-2
    ovr = _overrides(tiny_groot, dataset, run, "train.max_steps=3")
    summary = train(_cfg(recipe, *ovr), progress=False)
    assert (
        summary["steps"] == 3 and (run / "checkpoint-3" / "policy" / "model.safetensors").is_file()
    )


def test_training_and_evaluation_paths_give_identical_inputs(tiny_groot, dataset, tmp_path):
    from vlatune.data.training import FrameDataset
    from vlatune.policies.groot.family import build_policy

    cfg = _cfg("libero_full.yaml", *_overrides(tiny_groot, dataset, tmp_path / "r"))
    ds = FrameDataset.from_config(dataset, cfg.data, _stats(dataset), train=False)
    policy = build_policy(cfg, _stats(dataset))
    ds.use_processor(policy.processor)
    k = 5
    frame = ds.frame(k)
    train_batch = policy.processor.collate([ds[k]])
    obs = {"images": frame["images"], "state": frame["state"], "instruction": frame["instruction"]}
    eval_batch = policy.observation_batch([obs])
    keys = {"eagle_input_ids", "eagle_attention_mask", "eagle_pixel_values", "state", "state_mask"}
    assert keys | {"embodiment_id"} <= set(eval_batch)
    for key in eval_batch:
        assert torch.equal(train_batch[key], eval_batch[key]), key
    assert set(train_batch) - set(eval_batch) == {"action", "action_mask"}
    ids = eval_batch["eagle_input_ids"][0]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 2  # one token per 28 px image, two cameras
    assert eval_batch["eagle_pixel_values"].shape == (1, 2, 3, 28, 28)
    assert eval_batch["state"].shape == (1, 1, 64) and eval_batch["state_mask"][0, 0, :8].all()
    assert train_batch["action"].shape == (1, 10, 32)
    assert (
        train_batch["action_mask"][0, :, :7].all()
        and not train_batch["action_mask"][0, :, 7:].any()
    )
    assert eval_batch["embodiment_id"].tolist() == [31]
    # min-max: the normalised state of the frame, and the inverse recovers env actions
    st = _stats(dataset)["state"]
    lo, hi = np.array(st["min"]), np.array(st["max"])
    want = np.where(hi > lo, 2 * (frame["state"] - lo) / np.where(hi > lo, hi - lo, 1) - 1, 0)
    np.testing.assert_allclose(eval_batch["state"][0, 0, :8].numpy(), want, atol=1e-6)
    back = policy.processor.postprocess(train_batch["action"])
    np.testing.assert_allclose(back[0, :, :6], frame["actions"][:, :6], atol=1e-5)
    assert set(np.unique(back[0, :, 6])) <= {-1.0, 1.0}
    # two prompts of different lengths: left-padded as GR00T pads a batch (both end at the
    # last column), the model batch cut to the longest
    two = policy.observation_batch([obs, dict(obs, instruction="open")])
    from vlatune.policies.groot.processor import model_batch

    m = model_batch(two)
    assert m["eagle_pixel_values"].shape == (4, 3, 28, 28)
    lengths = two["eagle_attention_mask"].sum(1)
    assert m["eagle_input_ids"].shape[1] == int(lengths.max()) and lengths[0] != lengths[1]
    mask = m["eagle_attention_mask"]
    assert mask[:, -1].all()
    short = int(lengths.argmin())
    pad = mask.shape[1] - int(lengths[short])
    assert not mask[short, :pad].any() and mask[short, pad:].all()
    alone = policy.observation_batch([two_obs := dict(obs, instruction="open")])
    n = int(alone["eagle_attention_mask"].sum())
    assert torch.equal(m["eagle_input_ids"][short, pad:], alone["eagle_input_ids"][0, -n:])
    assert two_obs["instruction"] == "open"


_STATS: dict = {}


def _stats(data: Path) -> dict:
    if data not in _STATS:
        from vlatune.data import open_dataset
        from vlatune.data.stats import dataset_stats

        _STATS[data] = dataset_stats(open_dataset(data))
    return _STATS[data]


def test_save_load_gives_the_same_chunk(tiny_groot, dataset, tmp_path):
    from vlatune.policies import load
    from vlatune.policies.groot.family import build_policy

    cfg = _cfg("libero_lora.yaml", *_overrides(tiny_groot, dataset, tmp_path / "r"))
    policy = build_policy(cfg, _stats(dataset)).eval()
    with torch.no_grad():  # non-zero adapters so the LoRA path matters
        for name, p in policy.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    policy.save(tmp_path / "saved")
    again = load(tmp_path / "saved").eval()
    rng = np.random.default_rng(0)
    obs = {
        "images": {
            c: rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for c in ("agentview", "wrist")
        },
        "state": rng.normal(size=8),
        "instruction": "pick up the bowl",
    }
    outs = []
    for p in (policy, again):
        noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
        p.model.draw = lambda kind, shape, device, dtype, n=noise: n.clone()
        outs.append(p.predict(obs))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert outs[0].shape == (10, 7)
    # the merged weights carry the adapters: without them the chunk differs
    plain = load(tmp_path / "saved").eval()
    plain.lora.clear()
    for h in plain._hooks:
        h.remove()
    plain.model.draw = policy.model.draw
    assert not np.array_equal(plain.predict(obs), outs[0])


def test_released_folder_without_statistics_is_refused(tiny_groot):
    from vlatune.policies.groot.family import load_policy

    with pytest.raises(FileNotFoundError, match="processor.json"):
        load_policy(tiny_groot)


def test_tokenizer_mismatch_is_named(tiny_groot, dataset, tmp_path):
    from vlatune.policies.groot.family import build_policy

    tok = tmp_path / "tok"
    shutil.copytree(tiny_groot / "tokenizer", tok)
    data = json.loads((tok / "tokenizer.json").read_text())
    data["model"]["vocab"]["<IMG_CONTEXT>"] = 499
    for t in data.get("added_tokens", []):
        if t["content"] == "<IMG_CONTEXT>":
            t["id"] = 499
    (tok / "tokenizer.json").write_text(json.dumps(data))
    cfg = _cfg("libero_full.yaml", *_overrides(tiny_groot, dataset, tmp_path / "r"))
    cfg.policy.tokenizer = str(tok)
    with pytest.raises(ValueError, match="image_token_index is 500"):
        build_policy(cfg, _stats(dataset))


@pytest.mark.sim
def test_trained_tiny_groot_runs_one_libero_episode(tiny_groot, dataset, tmp_path):
    from vlatune.train.trainer import train

    run = tmp_path / "run"
    train(_cfg("libero_full.yaml", *_overrides(tiny_groot, dataset, run)), progress=False)
    one_libero_episode(run / "checkpoint-2", tmp_path / "eval", max_steps=12, replan=10)


def _obs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {
            c: rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for c in ("agentview", "wrist")
        },
        "state": rng.normal(size=8),
        "instruction": "pick up the bowl",
    }


def test_lora_save_is_nvidia_layout_with_merged_weights_and_resumes_exactly(
    tiny_groot, dataset, tmp_path
):
    """model.safetensors of a LoRA policy is the released layout with the adapters merged (read
    by the reference's strict loader: same chunk as the LoRA policy); vlatune's load gives the
    same adapters and the same unmerged base weights, bit for bit."""
    from safetensors import safe_open

    from vlatune.policies import load
    from vlatune.policies.groot.convert import load_released, read_released
    from vlatune.policies.groot.family import LORA_FILE, build_policy
    from vlatune.policies.groot.processor import model_batch

    cfg = _cfg("libero_lora.yaml", *_overrides(tiny_groot, dataset, tmp_path / "r"))
    policy = build_policy(cfg, _stats(dataset)).eval()
    with torch.no_grad():  # "trained" adapters: both factors moved
        for name, p in policy.named_parameters():
            if name.startswith("lora."):
                p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "saved"
    policy.save(out)
    # (a) the folder as NVIDIA's: the keys of the released file exactly, strict load
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == set(read_released(tiny_groot))
    (out / "processor.json").unlink()  # NVIDIA's loader knows nothing of vlatune's files
    released, report = load_released(out)  # raises on any missing / unexpected key
    assert report.tensors == len(saved_keys)
    released.eval()
    batch = policy.observation_batch([_obs()])
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
    draw = lambda kind, shape, device, dtype: noise.clone()  # noqa: E731
    policy.model.draw = released.draw = draw
    with torch.no_grad():
        want = policy.predict_chunk(batch)
        got = released.sample_actions(
            model_batch(batch), steps=policy.settings["num_inference_steps"]
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = build_policy(cfg, _stats(dataset)).eval()  # the base without adapters differs
    plain.model.draw = draw
    assert not torch.allclose(plain.predict_chunk(batch), want, atol=1e-3)
    # (b) vlatune's load: the adapters and the unmerged base weights, bit for bit
    policy.processor.save(out)  # put processor.json back
    again = load(out)
    lora = again.lora_state_dict()
    assert set(lora) == set(policy.lora_state_dict()) and any(k.endswith(".base") for k in lora)
    with safe_open(str(out / LORA_FILE), "pt") as f:
        assert set(f.keys()) == set(lora)
    for key, value in policy.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    mine = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert {n for n, p in again.named_parameters() if p.requires_grad} == mine
    again.eval().model.draw = draw
    assert torch.equal(again.predict_chunk(batch), want)


def test_out_of_range_predictions_are_counted(tiny_groot, dataset):
    from vlatune.policies.groot.family import build_policy

    cfg = _cfg("libero_full.yaml", *_overrides(tiny_groot, dataset, "unused"))
    policy = build_policy(cfg, _stats(dataset))
    chunk = np.zeros((2, 10, 32), dtype=np.float32)
    chunk[:, :, 6] = 3.0  # the gripper dimension: its sign, never counted
    policy.processor.postprocess(chunk)
    assert policy.fallbacks() == {"out_of_range_actions": 0}
    chunk[1, 4, 2] = 1.2  # one query of two leaves the training range
    chunk[1, 5, 30] = 9.0  # a padded column: cut before un-normalising
    out = policy.processor.postprocess(chunk)
    assert policy.fallbacks() == {"out_of_range_actions": 1}
    lo, hi = (np.array(_stats(dataset)["action"][k]) for k in ("min", "max"))
    assert out[1, 4, 2] > hi[2]  # counted, not clipped (as NVIDIA's and LeRobot's inverse)
    policy.processor.postprocess(np.full((10, 32), -1.5, dtype=np.float32))
    assert policy.fallbacks() == {"out_of_range_actions": 2}


def test_prompt_is_the_eagle_processor_template(tiny_groot, dataset):
    """The text of one LIBERO frame, written out from NVIDIA's template: Isaac-GR00T N1.5
    `gr00t/model/backbone/eagle2_hg_model/chat_template.json` (system line added before a first
    user turn, one `<image-k>` per image, then the text) as lerobot 0.5.1's
    `GrootEagleEncodeStep` calls it (text `str([task])`, add_generation_prompt=True), with
    `processing_eagle2_5_vl.py` `replace_media_placeholder` expanding `<image-k>`."""
    from vlatune.policies.groot.family import build_policy
    from vlatune.policies.groot.processor import Eagle

    cfg = _cfg("libero_full.yaml", *_overrides(tiny_groot, dataset, "unused"))
    eagle = next(
        s for s in build_policy(cfg, _stats(dataset)).processor.steps if isinstance(s, Eagle)
    )
    assert eagle.tokens_per_image == 1  # the fixture: one 28 px image -> 1 token
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<image 1><img><IMG_CONTEXT></img><image 2><img><IMG_CONTEXT></img>"
        "['Pick up the alphabet soup and place it in the basket']<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert eagle.prompt("Pick up the alphabet soup and place it in the basket") == want
    # the tokenizer's own chat template (Qwen3's in the real folder) is not GR00T's: ignored
    eagle.tokenizer.chat_template = "{{ 'not the eagle template' }}"
    assert eagle.prompt("Pick up the alphabet soup and place it in the basket") == want

"""The hf-vlm backbone's preprocessing as a processor step (`composed.vlm_inputs`): the prompt
ids and vision tensors are made per sample where the processor runs (DataLoader workers,
`predict`), the same bit for bit on both paths; the forward pass calls neither the tokenizer
nor the image processor; the step saves, loads and pickles (forkserver workers) as it is."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hf_fixtures import tiny_paligemma, tiny_qwen2_5_vl, tiny_smolvlm
from test_hf_vlm import make
from test_policies import CAMS, fixed_batch, observation
from vlatune.policies import VLAPolicy
from vlatune.policies.composed.processor import VLMInputs, load_processor, vlm_step


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen"))


def frame(i: int) -> dict:
    o = observation(i)
    rng = np.random.default_rng(10 + i)
    actions = rng.uniform(-0.5, 0.5, (4, 7))
    actions[:, -1] = np.sign(rng.normal(size=4))
    return {
        **o,
        "instruction": ["put the bowl on the plate", "open the drawer"][i % 2],
        "actions": actions,
        "action_mask": torch.ones(4, dtype=torch.bool),
    }


def assert_same(a, b, where="vlm"):
    assert set(a) == set(b), where
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{where}.{k}"
        else:
            assert a[k] == b[k], f"{where}.{k}"


def test_training_and_evaluation_inputs_are_bit_identical(qwen, tmp_path):
    """A recorded LIBERO frame through the training loader's chain (validation view) and, as
    the env hands it over, through a saved-and-reloaded hf-vlm policy's `predict`
    preprocessing: the same token ids, pixel patches, grids and FiLM ids, bit for bit."""
    import h5py

    from data_fixtures import make_libero_hdf5
    from vlatune.config import Config
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats
    from vlatune.data.training import FrameDataset

    root = make_libero_hdf5(tmp_path / "d", demos=2, T=6, res=40)
    cfg = Config.model_validate(
        {
            "data": {
                "path": str(root),
                "image_size": 56,
                "cameras": CAMS,
                "action_horizon": 4,
                "augment": {"crop_area": 0.9},
            },
            "policy": {"backbone": "hf-vlm", "model_id": str(qwen), "head": "l1", "film": True},
        }
    )
    reader = open_dataset(root)
    stats = dataset_stats(reader)
    from vlatune.policies import build_policy

    build_policy(cfg, stats).save(tmp_path / "p")
    policy = VLAPolicy.from_pretrained(tmp_path / "p")
    ds = FrameDataset.from_config(
        root,
        cfg.data,
        stats,
        train=False,
        action_norm=policy.action_norm,
        state_norm=policy.state_norm,
    )
    ds.use_processor(policy.processor)
    k = 3
    sample = ds[k]
    ep, t = int(sample["episode"]), int(sample["frame"])
    with h5py.File(sorted(root.glob("*.hdf5"))[0]) as f:  # LIBERO renders upside down
        demo = f[f"data/demo_{ep}/obs"]
        frames = {
            "agentview": demo["agentview_rgb"][t][::-1, ::-1],
            "wrist": demo["eye_in_hand_rgb"][t][::-1, ::-1],
        }
    state = np.asarray(reader.load_episode(ep, cameras=[]).states[t], np.float64)
    obs = {"images": frames, "state": state, "instruction": sample["instruction"]}
    train_batch = ds.processor.collate([ds[k]])
    eval_batch = policy._prepare([obs])
    assert {"input_ids", "pixel_values", "image_grid_thw", "film_ids"} <= set(eval_batch["vlm"])
    assert_same(train_batch["vlm"], eval_batch["vlm"])
    for cam in CAMS:
        assert torch.equal(train_batch["images"][cam], eval_batch["images"][cam])
    # the processor saved in the folder (loaded on its own) gives the same sample
    alone = load_processor(tmp_path / "p")
    assert_same(alone.collate([alone(ds.frame(k))])["vlm"], eval_batch["vlm"])


@pytest.mark.parametrize("family", ["qwen", "paligemma", "smolvlm"])
def test_collate_equals_the_image_processors_own_batching(qwen, family, tmp_path):
    """Samples made one by one and joined == the image processor and prompt run on the whole
    batch (what the backbone ran per step before): pixel tensors in the same order (SmolVLM:
    padded to the most images of a sample), ids left-padded; a dropped camera leaves both."""
    folder = {
        "qwen": lambda: qwen,
        "paligemma": lambda: tiny_paligemma(tmp_path / "pg"),
        "smolvlm": lambda: tiny_smolvlm(tmp_path / "smol"),
    }[family]()
    policy = make(folder, "tokens", action_tokenizer="bins")
    step = vlm_step(policy.processor)
    batch = fixed_batch(3)
    batch["image_mask"] = torch.tensor([[True, True], [True, False], [False, True]])
    joined = policy.with_vlm(batch)["vlm"]
    per_sample = [
        [
            batch["images"][c][b].permute(1, 2, 0).numpy()
            for i, c in enumerate(CAMS)
            if batch["image_mask"][b, i]
        ]
        for b in range(3)
    ]
    vision, counts = step.prompt.vision(per_sample)
    for key, value in vision.items():
        assert value.dtype == joined[key].dtype and torch.equal(value, joined[key]), key
    assert joined["image_count"].tolist() == [2, 1, 1]
    assert (joined["labels"] != -100).sum(1).tolist() == [4 * 7 + 1] * 3  # bins + end token
    if family == "paligemma":  # the prefix-LM mask: 1 exactly on the targets
        assert torch.equal(joined["token_type_ids"].bool(), joined["labels"] != -100)
    pad = joined["attention_mask"] == 0
    assert torch.all(joined["input_ids"][pad] == policy.backbone.pad_id)
    lengths = joined["attention_mask"].sum(1)
    assert lengths[0] > lengths[1] and bool((~pad[:, -1]).all())  # left padding


class Refuse:
    """Stands in for the tokenizer / image processor: any use is a test failure."""

    def __init__(self, what):
        self.what = what

    def __getattr__(self, name):
        raise AssertionError(f"the forward pass used the {self.what} ({name})")

    def __call__(self, *a, **k):
        raise AssertionError(f"the forward pass called the {self.what}")


@pytest.mark.parametrize("head", ["l1-film", "flow", "tokens"])
def test_forward_never_calls_the_tokenizer_or_image_processor(qwen, head):
    kw = {"film": True} if head == "l1-film" else {}
    if head == "tokens":
        kw = {"action_tokenizer": "bins"}
    policy = make(qwen, head.split("-")[0], **kw)
    proc = policy.processor.training(True)
    batch = proc.collate([proc(frame(i), np.random.default_rng(i)) for i in range(2)])
    for obj in (policy.backbone, policy.backbone.prompt, *proc.steps, vlm_step(policy.processor)):
        for attr, what in (
            ("tokenizer", "tokenizer"),
            ("image_processor", "image processor"),
            ("ip", "image processor"),
        ):
            if hasattr(obj, attr):
                setattr(obj, attr, Refuse(what))
    torch.manual_seed(0)
    out = policy(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    if head != "tokens":  # (a tokens head decodes its generated text with the tokenizer)
        policy.eval()
        with torch.no_grad():
            assert policy.predict_chunk(batch).shape == (2, 4, 7)


def test_step_pickles_and_augmentation_reaches_the_model(qwen):
    """DataLoader workers start by forkserver: the chain is pickled. Training-mode crops and
    colour jitter change the vision tensors; evaluation mode is deterministic."""
    policy = make(qwen, "tokens", action_tokenizer="bins")
    images = policy.processor.steps[0]
    images.crop_area, images.jitter = 0.8, (0.3, 0.3, 0.3)
    images._transform.crop_area = 0.8
    copy = pickle.loads(pickle.dumps(policy.processor))
    f = frame(0)
    assert_same(copy(dict(f))["vlm"], policy.processor(dict(f))["vlm"])
    train = policy.processor.training(True)
    a = train(dict(f), np.random.default_rng(0))["vlm"]
    b = train(dict(f), np.random.default_rng(1))["vlm"]
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    assert_same(a, train(dict(f), np.random.default_rng(0))["vlm"])
    assert torch.equal(a["labels"], b["labels"]) and bool((a["labels"] != -100).any())
    assert isinstance(vlm_step(train), VLMInputs)
    assert "composed.vlm_inputs" in " ".join(s.name for s in train.steps)

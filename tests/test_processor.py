"""The processor chain (vlatune.policies.processor): one object for training and evaluation,
saved with the policy; and the trainer pieces that came with it (epochs, per-group clipping).

Each family's own "training path == evaluation path, bit for bit" test lives with its recipes
(tests/test_<family>_recipes.py; the composed family's in tests/test_families.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlatune.data.transforms import Normalizer
from vlatune.policies.processor import (
    PROCESSOR_FILE,
    Images,
    Normalize,
    PadVector,
    Processor,
    Select,
    composed_processor,
    frame_from_observation,
)

CAMS = ["agentview", "wrist"]


def frame(seed: int = 0, H: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for c in CAMS},
        "state": rng.normal(size=8),
        "instruction": "pick up the bowl",
        "actions": np.concatenate([rng.uniform(-0.4, 0.4, (H, 6)), np.ones((H, 1))], axis=1),
        "action_mask": torch.ones(H, dtype=torch.bool),
    }


def norms():
    a = Normalizer.from_stats({"q01": [-0.5] * 6 + [-1], "q99": [0.5] * 6 + [1]}, "q99", [6])
    s = Normalizer.from_stats({"mean": [0.0] * 8, "std": [2.0] * 8}, "mean_std")
    return a, s


def test_composed_chain_saves_loads_and_gives_the_same_samples(tmp_path):
    a, s = norms()
    proc = composed_processor(CAMS, 32, a, s, crop_area=0.9, jitter=(0.2, 0.2, 0.2), gripper_dim=6)
    proc.save(tmp_path)
    doc = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    assert [st["step"] for st in doc["steps"]] == ["images", "normalize", "normalize", "select"]
    again = Processor.load(tmp_path)
    f = frame()
    x, y = proc(f), again(f)
    assert (
        set(x)
        == set(y)
        == {"images", "image_mask", "state", "actions", "action_mask", "instruction"}
    )
    for cam in CAMS:
        assert x["images"][cam].dtype == torch.uint8 and x["images"][cam].shape == (3, 32, 32)
        assert torch.equal(x["images"][cam], y["images"][cam])
    assert torch.equal(x["state"], y["state"]) and torch.equal(x["actions"], y["actions"])
    assert torch.allclose(x["state"], torch.from_numpy(f["state"] / 2).float())
    assert "images" in f and f["images"]["wrist"].shape == (40, 48, 3)  # the frame is untouched


def test_training_mode_augments_from_the_given_rng_and_evaluation_does_not():
    a, s = norms()
    proc = composed_processor(
        CAMS, 32, a, s, crop_area=0.8, jitter=(0.3, 0.3, 0.3), camera_dropout=0.5
    )
    train = proc.training(True)
    assert not proc.is_training and train.is_training  # a copy: the original stays in eval mode
    f = frame()
    one = train(f, np.random.default_rng(5))
    two = train(f, np.random.default_rng(5))
    other = train(f, np.random.default_rng(6))
    for cam in CAMS:
        assert torch.equal(one["images"][cam], two["images"][cam])
    assert torch.equal(one["image_mask"], two["image_mask"])
    differs = any(
        not torch.equal(one["images"][c], other["images"][c]) for c in CAMS
    ) or not torch.equal(one["image_mask"], other["image_mask"])
    assert differs
    ev1, ev2 = proc(f), proc(f, np.random.default_rng(1))
    assert all(torch.equal(ev1["images"][c], ev2["images"][c]) for c in CAMS)
    assert ev1["image_mask"].all()


def test_postprocess_inverts_normalisation_pads_and_counts_clipping():
    a, _ = norms()
    proc = Processor(
        [Normalize("actions", a, gripper_dim=6), PadVector("actions", 32, 7, mask=True)], {}
    )
    f = frame()
    sample = proc(f)
    assert sample["actions"].shape == (4, 32) and sample["actions_pad_mask"].sum() == 7
    back = proc.postprocess(sample["actions"][None].clone())
    np.testing.assert_allclose(back[0], f["actions"], atol=1e-6)
    assert proc.fallbacks() == {"clipped_actions": 0}
    wild = sample["actions"][None].clone()
    wild[0, 0, 0] = 3.0  # beyond the training range: clipped, counted once for the query
    out = proc.postprocess(wild)
    assert out[0, 0, 0] == pytest.approx(0.5)
    assert proc.fallbacks() == {"clipped_actions": 1}


def test_loading_refuses_unknown_steps_and_formats(tmp_path):
    (tmp_path / PROCESSOR_FILE).write_text(
        json.dumps({"format": "vlatune-processor/1", "steps": [{"step": "no_such_step"}]})
    )
    with pytest.raises(ValueError, match=r"steps\[0\]\.step.*no_such_step"):
        Processor.load(tmp_path)
    (tmp_path / PROCESSOR_FILE).write_text(json.dumps({"format": "other/9", "steps": []}))
    with pytest.raises(ValueError, match="format"):
        Processor.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="processor.json"):
        Processor.load(tmp_path / "absent")


def test_observation_missing_a_camera_or_with_a_wrong_state_is_named():
    a, s = norms()
    proc = composed_processor(CAMS, 32, a, s)
    obs = {"images": {"agentview": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(8)}
    with pytest.raises(KeyError, match="wrist"):
        frame_from_observation(obs, CAMS)
    obs["images"]["wrist"] = np.zeros((8, 8, 3), np.uint8)
    obs["state"] = np.zeros(5)
    with pytest.raises(ValueError, match="state has 5 dims, the policy expects 8"):
        proc(frame_from_observation(obs, CAMS))


def test_select_and_images_describe_themselves():
    proc = Processor([Images(CAMS, 16), Select(["images"])], {})
    assert proc.describe()[0].startswith("1. images ['agentview', 'wrist']")
    out = proc(frame())
    assert set(out) == {"images"}


# ---------------------------------------------------------------- trainer pieces
def test_max_epochs_sets_the_steps_and_a_smaller_max_steps_wins(tmp_path):
    from vlatune.config import load_config
    from vlatune.train.trainer import Trainer

    cfg = load_config(
        None, [f"train.output_dir={tmp_path}", "train.max_epochs=2", "data.batch_size=4"]
    )
    Trainer(cfg, progress=False)._steps_from_epochs(10)
    assert cfg.train.max_steps == 5  # ceil(2 x 10 / 4)
    cfg = load_config(
        None,
        [
            f"train.output_dir={tmp_path}",
            "train.max_epochs=2",
            "data.batch_size=4",
            "train.max_steps=3",
        ],
    )
    Trainer(cfg, progress=False)._steps_from_epochs(10)
    assert cfg.train.max_steps == 3


def test_a_group_with_its_own_max_grad_norm_is_clipped_on_its_own(tmp_path):
    from accelerate import Accelerator

    from vlatune.config import load_config
    from vlatune.train.trainer import Trainer

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "optim.max_grad_norm=1.0"])
    trainer = Trainer(cfg, progress=False)
    main, energy = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"main": main, "energy": energy})
    opt = torch.optim.AdamW(
        [
            {"params": list(main.parameters())},
            {"params": list(energy.parameters()), "max_grad_norm": 0.5, "name": "energy"},
        ]
    )
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    norm = trainer._clip_gradients(Accelerator(cpu=True), model, opt)

    def total(ps):
        return torch.sqrt(sum((p.grad**2).sum() for p in ps)).item()

    assert total(energy.parameters()) == pytest.approx(0.5, rel=1e-4)
    assert total(main.parameters()) == pytest.approx(1.0, rel=1e-4)
    assert float(norm) == pytest.approx(10.0 * np.sqrt(20), rel=1e-4)  # main's norm only


def test_composed_policy_chain_carries_the_recipes_augmentation(tmp_path):
    """The trainer swaps the dataset's default chain for the policy's: for the composed family
    they must be the same chain (augmentation included), or training would silently change."""
    from tests.data_fixtures import make_libero_hdf5
    from vlatune.config import load_config
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats
    from vlatune.data.training import FrameDataset
    from vlatune.policies import build_policy

    root = make_libero_hdf5(tmp_path / "d", demos=2, T=6, res=40)
    cfg = load_config(
        "demo/tiny", [f"data.path={root}", "data.image_size=64", "data.camera_dropout=0.3"]
    )
    stats = dataset_stats(open_dataset(root))
    ds = FrameDataset.from_config(root, cfg.data, stats, train=True)
    policy = build_policy(cfg, stats)

    def chain(proc):
        return [{"step": s.name, **s.to_json(tmp_path)} for s in proc.steps]

    assert chain(policy.processor) == chain(ds.processor)
    images = policy.processor.steps[0]
    assert images.jitter == (0.1, 0.1, 0.1) and images.dropout == 0.3
    policy.save(tmp_path / "p")
    again = type(policy).from_pretrained(tmp_path / "p")
    assert chain(again.processor) == chain(ds.processor)  # resume keeps the augmentation


def test_demo_margin_reads_losses_at_a_checkpoint_and_the_demo_takes_a_recording_seed(tmp_path):
    import importlib.util
    from pathlib import Path

    from click.testing import CliRunner

    from vlatune.cli import cli

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_margin.py"
    spec = importlib.util.spec_from_file_location("demo_margin", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"step": s, "loss": 1.0 / s} for s in (100, 200, 300, 400)]
    rows.append({"step": 400, "val_loss": 0.25, "val_batches": 3})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = bench.losses_at(metrics, 400, window=200)
    assert train == pytest.approx((1 / 300 + 1 / 400) / 2) and val == 0.25
    assert bench.losses_at(metrics, 300, window=100) == (pytest.approx(1 / 300), None)
    good = [{"seed": 0, "rate": 1.0}, {"seed": 0, "rate": 0.85}]
    assert not bench.meets_bar(good)  # one recording is not the bar
    assert bench.meets_bar([*good, {"seed": 1, "rate": 0.8}])
    assert not bench.meets_bar([*good, {"seed": 1, "rate": 0.75}])
    out = CliRunner().invoke(cli, ["demo", "--help"]).output
    assert "--seed" in out and "Recording seed" in out

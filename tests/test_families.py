"""Policy families: the registry, `policy.type` in the config, `vlatune.policies.load` and
`vlatune policy inspect`.

Released-layout detection runs on the reference fixtures (`VLATUNE_REFERENCE_DIR`, default
`../shared/reference`; skipped where a folder is absent) and on folders written here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vlatune.cli import cli
from vlatune.config import Config, ConfigError, list_recipes, load_config
from vlatune.config.loader import validate_config
from vlatune.config.schema import Pi0FamilyConfig, PolicyConfig, RDTFamilyConfig
from vlatune.policies import build_policy, detect, load, registry
from vlatune.policies.base import LossModule, missing_members
from vlatune.policies.io import UnknownLayoutError, inspect

REFERENCE = Path(
    os.environ.get(
        "VLATUNE_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared/reference"
    )
)
CAMS = ["agentview", "wrist"]
STATS = {
    "action": {"q01": [-0.5] * 6 + [-1], "q99": [0.5] * 6 + [1]},
    "state": {"q01": [-1.0] * 8, "q99": [1.0] * 8},
}


def fixture(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference fixture {path} is absent (see ../shared/reference/README.md)")
    return path


def tiny_policy():
    cfg = Config.model_validate(
        {
            "data": {"image_size": 32, "cameras": CAMS, "action_horizon": 4},
            "policy": {
                "tiny": {"dim": 16, "layers": 1, "heads": 2, "tokens_per_side": 2},
                "heads": {"mlp_dim": 16},
            },
        }
    )
    torch.manual_seed(0)
    return build_policy(cfg, STATS)


def observation() -> dict:
    rng = np.random.default_rng(0)
    return {
        "images": {c: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for c in CAMS},
        "state": rng.uniform(-1, 1, 8),
        "instruction": "put the bowl on the plate",
    }


# ---------------------------------------------------------------- registry
def test_registry_names_families_and_resolves_them_lazily():
    assert {"composed", "pi0", "rdt", "openvla", "groot"} <= set(registry.names())
    assert registry.resolve(registry.get("composed").config) is PolicyConfig
    assert registry.resolve(registry.get("pi0").config) is Pi0FamilyConfig
    assert registry.resolve(registry.get("rdt").config) is RDTFamilyConfig
    for name in ("composed", "pi0", "rdt"):
        family = registry.get(name)
        assert callable(registry.piece(family, "load")) and callable(
            registry.piece(family, "detect")
        )
    with pytest.raises(KeyError, match="Did you mean 'pi0'"):
        registry.get("pio")
    with pytest.raises(KeyError, match="Known: composed, pi0, rdt"):
        registry.get("zzzzzz")


def test_build_of_a_family_without_builder_says_so(monkeypatch):
    import dataclasses

    family = dataclasses.replace(registry.FAMILIES["pi0"], build=None)
    monkeypatch.setitem(registry.FAMILIES, "pi0", family)
    cfg = Config.model_validate({"policy": {"type": "pi0"}})
    with pytest.raises(NotImplementedError, match="policy.type 'pi0'.*cannot build"):
        registry.build(cfg, STATS)


def test_every_family_has_config_build_load_and_detect():
    for family in registry.FAMILIES.values():
        for piece in ("config", "build", "load", "detect"):
            assert callable(registry.resolve(getattr(family, piece))), (family.name, piece)


# ---------------------------------------------------------------- policy.type in the config
def test_policy_type_is_a_discriminated_union():
    assert Config().policy.type == "composed"
    old = Config.model_validate({"policy": {"backbone": "tiny", "head": "flow"}})
    assert isinstance(old.policy, PolicyConfig) and old.policy.type == "composed"
    pi = Config.model_validate({"policy": {"type": "pi0", "variant": "pi05", "pretrained": "x"}})
    assert isinstance(pi.policy, Pi0FamilyConfig) and pi.policy.variant == "pi05"
    rdt = Config.model_validate({"policy": {"type": "rdt", "dtype": "bfloat16"}})
    assert isinstance(rdt.policy, RDTFamilyConfig)
    # a saved config (type written out) validates back to the same section
    assert Config.model_validate(pi.model_dump(mode="json")).policy == pi.policy


def test_policy_type_errors_name_the_key_and_the_closest_family():
    with pytest.raises(ConfigError, match="unknown policy family 'pio'. Did you mean 'pi0'"):
        validate_config({"policy": {"type": "pio"}}, "r.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'policy.bogus'.*Valid keys here: dtype"):
        validate_config({"policy": {"type": "rdt", "bogus": 1}}, "r.yaml")
    with pytest.raises(ConfigError, match="key 'policy.variant'"):
        validate_config({"policy": {"type": "pi0", "variant": "pi1"}}, "r.yaml")
    with pytest.raises(ConfigError, match="Did you mean 'policy.head'"):
        validate_config({"policy": {"hed": "l1"}}, "r.yaml")


def test_every_recipe_loads_as_the_family_it_names():
    import yaml

    from vlatune.config.loader import resolve_config_path

    recipes = list_recipes()
    assert recipes
    for name in recipes:
        raw = yaml.safe_load(resolve_config_path(name).read_text())
        named = (raw.get("policy") or {}).get("type")
        cfg = load_config(name)
        assert cfg.policy.type == (named or cfg.policy.type), name
        if named is None and "base" not in raw:
            assert cfg.policy.type == "composed", name


# ---------------------------------------------------------------- the interface
def test_composed_policy_implements_the_interface():
    policy = tiny_policy()
    assert missing_members(policy) == []
    obs = observation()
    chunk = policy.predict_chunk(policy._prepare([obs]))
    assert chunk.shape == (1, 4, 7)
    assert torch.equal(chunk, policy.predict_normalized([obs]))
    with pytest.raises(TypeError, match="missing compute_loss, predict_chunk"):
        LossModule(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- load() by layout
def test_load_detects_a_vlatune_policy_and_a_training_checkpoint(tmp_path):
    policy = tiny_policy()
    policy.save(tmp_path / "checkpoint-5" / "policy")
    for path in (tmp_path / "checkpoint-5", tmp_path / "checkpoint-5" / "policy"):
        assert detect(path) == "composed"
        loaded = load(path)
        assert type(loaded).__name__ == "VLAPolicy"
        np.testing.assert_array_equal(loaded.predict(observation()), policy.predict(observation()))


def test_load_detects_lerobot_pi0_folders():
    for name, variant in (("pi0", "pi0"), ("pi05", "pi05")):
        path = fixture(name)
        assert detect(path) == "pi0"
        policy = load(path)  # strict: LeRobot's keys all mapped
        assert type(policy).__name__ == "Pi0Policy" and policy.cfg.variant == variant
        assert missing_members(policy) == []


def test_detect_reads_openvla_and_groot_folders_from_their_files(tmp_path):
    for name, family in (
        ("openvla", "openvla"),
        ("openvla_oft", "openvla"),
        ("groot_n15", "groot"),
    ):
        assert detect(fixture(name)) == family
    fake = tmp_path / "not_openvla"  # the model type decides, not the file names
    fake.mkdir()
    (fake / "config.json").write_text('{"model_type": "llama"}')
    (fake / "dataset_statistics.json").write_text("{}")
    with pytest.raises(UnknownLayoutError):
        detect(fake)


def test_load_detects_rdt_folders_bin_and_safetensors(tmp_path):
    from vlatune.policies.rdt.convert import save_released

    path = fixture("rdt")
    assert (path / "pytorch_model.bin").is_file() and detect(path) == "rdt"
    model = load(path)
    assert type(model).__name__ == "RDTRunner"
    save_released(model, tmp_path / "rdt", weights="safetensors")
    assert detect(tmp_path / "rdt") == "rdt"
    again = load(tmp_path / "rdt")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_unknown_layout_lists_the_files_and_what_each_family_expects(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"x")
    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    (tmp_path / "sub").mkdir()
    with pytest.raises(UnknownLayoutError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "Files found: config.json, sub/, weights.pt" in msg
    for name in ("composed", "pi0", "rdt", "openvla", "groot"):
        assert f"  {name}: " in msg
    assert "type 'pi0' or 'pi05'" in msg and "pytorch_model.bin" in msg
    with pytest.raises(FileNotFoundError, match="no such policy folder"):
        load(tmp_path / "absent")


# ---------------------------------------------------------------- policy inspect
def test_policy_inspect_on_a_vlatune_policy(tmp_path):
    policy = tiny_policy()
    policy.save(tmp_path / "p")
    info = inspect(tmp_path / "p")
    total = sum(p.numel() for p in policy.parameters())
    assert info["family"] == "composed" and info["parameters"] == total
    assert info["trainable"] == total and info["dtype"] == "float32"
    assert info["conventions"]["gripper"] == "-1_open"
    result = CliRunner().invoke(cli, ["policy", "inspect", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "family:        composed" in out and f"{total:,} total" in out
    assert "image_orientation=upright" in out and "normalization.json" in out
    assert "normalise actions (q99" in out and "resize to 32x32" in out
    result = CliRunner().invoke(cli, ["policy", "inspect", str(tmp_path / "p"), "--json"])
    assert json.loads(result.output)["parameters"] == total


def test_evaluating_a_released_folder_says_to_fine_tune_it_first():
    from vlatune.eval.policies import load_policy

    for name in ("pi0", "rdt"):
        path = fixture(name)
        with pytest.raises(ValueError, match=f"released {name} folder without vlatune's processor"):
            load_policy(str(path))


def test_policy_inspect_on_released_folders_and_unknown_ones(tmp_path):
    path = fixture("pi0")
    result = CliRunner().invoke(cli, ["policy", "inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "family:        pi0" in result.output and "resize with padding" in result.output
    (tmp_path / "notes.txt").write_text("hi")
    result = CliRunner().invoke(cli, ["policy", "inspect", str(tmp_path)])
    assert result.exit_code == 1 and "no policy family recognises" in result.output
    assert "notes.txt" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- training path == evaluation path
def test_composed_training_and_evaluation_inputs_are_bit_identical(tmp_path):
    """One recorded frame through the training view (validation split: no augmentation) and,
    as the LIBERO env would hand it over (upright uint8 frames, float64 8-d state), through a
    saved-and-reloaded policy's `predict` preprocessing: the same model inputs, bit for bit."""
    import h5py

    from tests.data_fixtures import make_libero_hdf5
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats
    from vlatune.data.training import FrameDataset

    root = make_libero_hdf5(tmp_path / "d", demos=2, T=6, res=40)
    cfg = load_config(
        None,
        [
            "data.cameras=[agentview, wrist]",
            "data.image_size=32",
            "data.action_horizon=4",
            "data.augment.crop_area=0.9",  # a centre crop at evaluation, both ways
            "policy.tiny.dim=16",
            "policy.tiny.layers=1",
            "policy.tiny.heads=2",
            "policy.tiny.tokens_per_side=2",
        ],
    )
    reader = open_dataset(root)
    stats = dataset_stats(reader)
    torch.manual_seed(0)
    build_policy(cfg, stats).save(tmp_path / "p")
    policy = load(tmp_path / "p")  # normalisers through normalization.json, as eval sees them
    ds = FrameDataset.from_config(
        root,
        cfg.data,
        stats,
        train=False,
        action_norm=policy.action_norm,
        state_norm=policy.state_norm,
    )
    k = 3
    sample = ds[k]
    ep, t = int(sample["episode"]), int(sample["frame"])
    hdf5 = sorted(root.glob("*.hdf5"))[0]
    with h5py.File(hdf5) as f:  # the raw LIBERO file: renders upside down, env flips them
        demo = f[f"data/demo_{ep}/obs"]
        frames = {
            "agentview": demo["agentview_rgb"][t][::-1, ::-1],
            "wrist": demo["eye_in_hand_rgb"][t][::-1, ::-1],
        }
    state = np.asarray(reader.load_episode(ep, cameras=[]).states[t], np.float64)  # env: float64
    obs = {"images": frames, "state": state, "instruction": sample["instruction"]}
    batch = policy._prepare([obs])
    for cam in ("agentview", "wrist"):
        a, b = sample["images"][cam], batch["images"][cam][0]
        assert a.dtype == b.dtype and torch.equal(a, b), cam
    assert sample["state"].dtype == batch["state"].dtype
    assert torch.equal(sample["state"], batch["state"][0])
    assert batch["instruction"] == [sample["instruction"]]

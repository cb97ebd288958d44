"""Typed configs: YAML loading, dotted overrides, and the error messages people will read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlatune.config import Config, ConfigError, dump_config, load_config


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.eval.suite == "libero_object"
    assert cfg.data.gripper == "auto" and cfg.data.gripper_dim == -1


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.001\ndata:\n  batch_size: 4\n")
    cfg = load_config(
        p,
        [
            "optim.lr=1e-4",
            "data.batch_size=8",
            "data.cameras=[agentview]",
            "train.mixed_precision=bf16",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.batch_size == 8
    assert cfg.data.cameras == ["agentview"]
    assert cfg.train.mixed_precision == "bf16"


def test_override_creates_optional_section():
    cfg = load_config(None, ["policy.lora.r=32"])
    assert cfg.policy.lora is not None and cfg.policy.lora.r == 32 and cfg.policy.lora.alpha == 32


def test_suite_alias_resolved():
    assert load_config(None, ["eval.suite=long"]).eval.suite == "libero_10"


def test_unknown_nested_key_suggests_closest(tmp_path):
    p = write(tmp_path, "data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'data.batch_sise'" in msg
    assert "Did you mean 'data.batch_size'?" in msg
    assert str(p) in msg


def test_unknown_top_level_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimm'.*Did you mean 'optim'\?"):
        load_config(write(tmp_path, "optimm:\n  lr: 1\n"))


def test_unknown_key_from_override():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rat'"):
        load_config(None, ["optim.learning_rat=3"])


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "optim:\n  lr: fast\n"))
    msg = str(e.value)
    assert "key 'optim.lr'" in msg and "'fast'" in msg and "expected float" in msg


def test_wrong_literal_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.gripper=open"])
    assert "data.gripper" in str(e.value) and "'-1_open'" in str(e.value)


def test_list_item_error_names_index():
    with pytest.raises(ConfigError, match=r"key 'eval.tasks\[1\]'"):
        load_config(None, ["eval.tasks=[0, x]"])


def test_bad_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid YAML \(line 3"):
        load_config(write(tmp_path, "data:\n  batch_size: 4\n   bad: [\n"))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="'optim.lr' is a value, not a section"):
        load_config(write(tmp_path, "optim:\n  lr: 0.1\n"), ["optim.lr.x=1"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="needs policy.action_tokenizer"):
        load_config(None, ["policy.head=tokens"])


def test_base_inheritance(tmp_path):
    write(tmp_path, "optim:\n  lr: 0.5\n  weight_decay: 0.1\ndata:\n  batch_size: 3\n", "base.yaml")
    p = write(tmp_path, "base: base.yaml\noptim:\n  lr: 0.25\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 0.25 and cfg.optim.weight_decay == 0.1 and cfg.data.batch_size == 3


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=2e-4", "policy.lora.r=8"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_every_recipe_in_configs_loads(repo):
    # configs/accelerate/ holds accelerate's own launcher files, not vlatune recipes
    files = sorted(f for f in (repo / "configs").rglob("*.yaml") if f.parent.name != "accelerate")
    assert files, "configs/ has no recipes"
    for f in files:
        cfg = load_config(f)
        assert yaml.safe_load(dump_config(cfg))["name"] == cfg.name

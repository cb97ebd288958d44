"""Typed configs: schema (`Config` and its sections) and the YAML loader with dotted overrides."""

from vlatune.config.loader import (
    ConfigError,
    apply_overrides,
    dump_config,
    list_recipes,
    load_config,
    resolve_config_path,
    validate_config,
)
from vlatune.config.schema import (
    AugmentConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoraConfig,
    OptimConfig,
    PolicyConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "OptimConfig",
    "PolicyConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "list_recipes",
    "load_config",
    "resolve_config_path",
    "validate_config",
]

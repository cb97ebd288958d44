"""Load a run config from YAML, apply dotted command-line overrides, validate.

Errors name the file and the key: an unknown key suggests the closest valid one, a wrong type
names the key, the value and the expected type, bad YAML names the line.

    >>> from vlatune.config import load_config
    >>> cfg = load_config("configs/demo/tiny.yaml", ["optim.lr=1e-4", "data.batch_size=8"])

A YAML file may start from another one with `base: other.yaml` (a path relative to the file);
its keys are merged over the base's, mapping by mapping.

A config is a path, or the name of a recipe shipped with the package (`src/vlatune/configs/`,
also reachable as `configs/` at the repository root): `demo/tiny`, `nora/baseline.yaml` and
`configs/demo/tiny.yaml` all work from any folder. A file that exists at the path given wins.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlatune.config.schema import Config, config_warnings

log = logging.getLogger("vlatune")


class ConfigError(ValueError):
    """A config that cannot be used; the message says which file, which key and what to do."""


RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"


def list_recipes() -> list[str]:
    """Names of the shipped recipes (`demo/tiny`, `nora/baseline`, ...), accelerate files aside."""
    return sorted(
        p.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        for p in RECIPES_DIR.rglob("*.yaml")
        if p.parent.name != "accelerate"
    )


def resolve_config_path(name: str | Path) -> Path:
    """A path that exists, else the shipped recipe called `name`; a clear error otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    text = path.as_posix()
    for prefix in ("./", "configs/"):
        text = text.removeprefix(prefix)
    candidates = [text] if text.endswith((".yaml", ".yml")) else [f"{text}.yaml", f"{text}.yml"]
    for cand in candidates:
        if (RECIPES_DIR / cand).is_file():
            return RECIPES_DIR / cand
    recipes = list_recipes()
    close = difflib.get_close_matches(text.removesuffix(".yaml"), recipes, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config file not found: {name} (neither a file nor a shipped recipe).{hint} "
        f"Recipes: {', '.join(recipes)} (or give the path to your own YAML file)."
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a path to another YAML file, got {base!r}")
        data = _deep_merge(_read_yaml(path.parent / base, (*seen, path)), data)
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`1e-4`, `true`, `[0, 3]`)."""
    data = _deep_merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' must look like key.path=value (e.g. optim.lr=1e-4)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads "1e-4" as a string; numbers are what people mean
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value) if any(c in value for c in ".eE") else int(value)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return data


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes inside an annotation such as `LoraConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _submodels(a)]
    return []


def _walk(
    loc: tuple[Any, ...], unknown_last: bool
) -> tuple[list[str], type[BaseModel] | None, Any]:
    """Follow an error location through the schema: (dotted key parts, parent model, field).

    Strings in `loc` that are not field names are union-branch tags (such as "list[str]") and
    are not part of the key, except the last one of an unknown-key error.
    """
    model: type[BaseModel] | None = Config
    parent: type[BaseModel] | None = Config
    parts: list[str] = []
    field = None
    branches: dict[str, type[BaseModel]] = {}  # a discriminated union's tag -> its model
    for i, item in enumerate(loc):
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            continue
        if item in branches:  # `policy.type` selected this branch of the union
            model = parent = branches[item]
            branches = {}
            continue
        branches = {}
        if model is not None and item in model.model_fields:
            parts.append(item)
            parent, field = model, model.model_fields[item]
            subs = _submodels(field.annotation)
            model = subs[0] if subs else None
            if field.discriminator and len(subs) > 1:
                branches = {_tag(m, field.discriminator): m for m in subs}
        elif unknown_last and i == len(loc) - 1:
            parts.append(item)
            parent, field = model, None
    return parts, parent, field


def _tag(model: type[BaseModel], discriminator: str) -> str:
    """The Literal value of a union branch's discriminator field (`policy.type`)."""
    args = typing.get_args(model.model_fields[discriminator].annotation)
    return str(args[0]) if args else model.__name__


def _type_name(annotation: Any) -> str:
    if len(_submodels(annotation)) > 1:  # a discriminated union: the branch's message says it
        return " | ".join(m.__name__ for m in _submodels(annotation))
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _describe(err: dict[str, Any], source: str) -> str:
    parts, parent, field = _walk(tuple(err["loc"]), err["type"] == "extra_forbidden")
    key = ".".join(parts) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.5) if parts else []
        prefix = ".".join(parts[:-1])
        hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
        return f"{source}: unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}."
    value = err.get("input")
    expected = f" (expected {_type_name(field.annotation)})" if field is not None else ""
    if err["type"] == "missing":
        return f"{source}: key '{key}' is required{expected}."
    return f"{source}: key '{key}': value {value!r} is not valid{expected}: {err['msg']}."


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, source) for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load `path` (or the defaults when None), apply `overrides`, validate."""
    data = _read_yaml(resolve_config_path(path)) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "config"
    cfg = validate_config(data, source)
    for warning in config_warnings(cfg):
        log.warning("warning: %s", warning)
    return cfg


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (every key, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

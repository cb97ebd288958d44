"""Load any policy folder by its files: `load(path)`, `detect(path)` and `inspect(path)`.

The layout decides the family (`vlatune.policies.registry`), checked in this order: a vlatune
policy folder or training checkpoint (`composed`), LeRobot's pi0 / pi0.5 folder, the released
RDT layout, then every other family whose package exposes `convert.is_released_folder`. A folder
no family recognises is an error listing the files found and what each family expects.

    >>> from vlatune.policies import load, inspect
    >>> policy = load("runs/demo/checkpoint-2000")          # -> VLAPolicy
    >>> inspect("shared/reference/pi0")["family"]
    'pi0'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlatune.policies import registry

VLATUNE_FORMAT = "vlatune-policy/1"  # composed.policy.FORMAT, without importing torch here
RDT_KEYS = ("action_dim", "pred_horizon", "rdt", "noise_scheduler", "img_adaptor")


class UnknownLayoutError(ValueError):
    pass


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- detectors
def is_vlatune_folder(path: str | Path) -> bool:
    """A `Policy.save` folder (config.json with format vlatune-policy/1) or a training
    checkpoint holding one under policy/."""
    path = Path(path)
    if (path / "policy" / "config.json").is_file():
        path = path / "policy"
    cfg = _json(path / "config.json")
    return cfg is not None and cfg.get("format") == VLATUNE_FORMAT


def is_rdt_folder(path: str | Path) -> bool:
    """The released RDT layout: config.json with RDTRunner's init arguments, and its weights."""
    path = Path(path)
    weights = (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()
    cfg = _json(path / "config.json")
    return weights and cfg is not None and all(k in cfg for k in RDT_KEYS)


# ---------------------------------------------------------------- loaders
def load_pi0(path: str | Path):
    """A LeRobot pi0 / pi0.5 folder behind the policy interface (`Pi0Policy`), strictly."""
    from vlatune.policies.pi0.convert import load_released
    from vlatune.policies.pi0.policy import Pi0Policy

    model, _report = load_released(path)
    return Pi0Policy(model)


def load_rdt(path: str | Path):
    """The released RDT layout as an `RDTRunner` (float32), strictly."""
    from vlatune.policies.rdt.convert import load_released

    return load_released(path)


def policy_folder(path: str | Path) -> Path:
    """A training checkpoint (`checkpoint-<step>/`: trainer_state.json + policy/) -> its
    policy/ folder; any other folder as it is."""
    path = Path(path)
    if (path / "trainer_state.json").is_file() and (path / "policy").is_dir():
        return path / "policy"
    return path


def detect(path: str | Path) -> str:
    """The family whose layout `path` is; UnknownLayoutError (files found, what each expects).
    A training checkpoint is the family of its policy/ folder."""
    path = policy_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such policy folder")
    if not path.is_dir():
        raise UnknownLayoutError(f"{path}: a policy is a folder, this is a file")
    unavailable: dict[str, str] = {}
    for family in registry.FAMILIES.values():
        if family.detect is None:
            unavailable[family.name] = "no detector"
            continue
        try:
            detector = registry.resolve(family.detect)
        except (ImportError, AttributeError) as e:
            unavailable[family.name] = f"no detector yet ({type(e).__name__})"
            continue
        if detector(path):
            return family.name
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    expects = "\n".join(
        f"  {f.name}: {f.expects}"
        + (f" [not detected: {unavailable[f.name]}]" if f.name in unavailable else "")
        for f in registry.FAMILIES.values()
    )
    raise UnknownLayoutError(
        f"{path}: no policy family recognises this folder. Files found: "
        f"{', '.join(found) or 'none'}. What each family expects:\n{expects}"
    )


def load(path: str | Path):
    """The policy in `path`, its family detected from the files (see the module docstring).
    Released families load strictly (missing == unexpected == [] or an error naming keys).
    Returns the family's policy (what `vlatune eval` runs, with its processor); for a released
    folder vlatune did not save (no processor.json), the family's bare model (`Pi0Policy`,
    `RDTRunner`, `GrootModel`): inspectable and a starting point for `vlatune train`, not
    evaluable. Where a loader returns (model, extras), the model."""
    family = registry.get(detect(path))
    folder = policy_folder(path)
    from vlatune.policies.processor import PROCESSOR_FILE

    if family.released is not None and not (folder / PROCESSOR_FILE).is_file():
        obj = registry.resolve(family.released)(folder)  # a released folder: the bare model
    else:
        obj = registry.piece(family, "load")(folder)
    return obj[0] if isinstance(obj, tuple) else obj


def not_evaluable_reason(path: str | Path) -> str:
    """Why the policy in `path` cannot act in an env: a released folder vlatune did not save."""
    name = detect(path)
    return (
        f"{path}: a released {name} folder without vlatune's processor.json: the model loads, "
        "but it carries no statistics of your data to prepare observations and undo the action "
        f"normalisation; fine-tune it first (`vlatune train RECIPE policy.type={name} "
        f"policy.pretrained={path}`) and evaluate the checkpoint"
    )


# ---------------------------------------------------------------- inspect
def _parameters(module) -> tuple[int, int, list[str]]:
    total = trainable = 0
    dtypes: dict[str, int] = {}
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        name = str(p.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + p.numel()
    return total, trainable, sorted(dtypes, key=lambda d: -dtypes[d])


def _composed_details(policy, path: Path) -> dict[str, Any]:
    cfg = policy.cfg
    folder = Path(policy.source) if policy.source else path
    return {
        "architecture": f"backbone {cfg.backbone}, head {cfg.head}"
        + (", LoRA" if cfg.lora else ""),
        "conventions": policy.conventions,
        "normalization": f"{folder / 'normalization.json'}: fitted on the training episodes of "
        "the run (its stats.json)",
    }


def _pi0_details(policy, path: Path) -> dict[str, Any]:
    c = policy.cfg
    stats = sorted(p.name for p in path.glob("*normalizer*"))
    return {
        "architecture": f"{c.variant}: vlm {c.paligemma_variant}, expert "
        f"{c.action_expert_variant}, {c.num_cameras} camera(s) at {c.image_size} px, chunk "
        f"{c.chunk_size}",
        "conventions": "none declared (LeRobot's folder does not say image orientation or "
        "gripper sign); check them against your data",
        "processor": [
            f"images: resize with padding to {c.image_size} px, scaled to [-1, 1] (pi0.processor)",
            f"state / actions: zero-padded to {c.max_state_dim} / {c.max_action_dim}; "
            f"predictions cut back to {c.action_dim}",
            f"prompt: PaliGemma tokens, at most {c.tokenizer_max_length}"
            + (" (pi0.5: task + 256-bin state)" if c.variant == "pi05" else " (pi0: task)"),
        ],
        "normalization": ", ".join(stats)
        if stats
        else "none in this folder (LeRobot keeps them in the policy_preprocessor files)",
    }


def _rdt_details(model, path: Path) -> dict[str, Any]:
    c = model.cfg
    return {
        "architecture": f"hidden {c.hidden_size}, depth {c.rdt.depth}, {c.rdt.num_heads} heads, "
        f"action_dim {c.action_dim}, horizon {c.pred_horizon}",
        "conventions": "the 128-d unified state / action space (vlatune.policies.rdt.unified)",
        "normalization": "none in the released layout",
    }


DETAILS = {"composed": _composed_details, "pi0": _pi0_details, "rdt": _rdt_details}


def inspect(path: str | Path) -> dict[str, Any]:
    """What `vlatune policy inspect` prints: family, parameters (total / trainable), dtype,
    conventions, the processor chain and where the normalisation statistics came from."""
    path = Path(path)
    name = detect(path)
    obj = load(path)
    total, trainable, dtypes = _parameters(obj)
    out: dict[str, Any] = {
        "path": str(path),
        "family": name,
        "summary": registry.get(name).summary,
        "parameters": total,
        "trainable": trainable,
        "dtype": ", ".join(dtypes) or "none",
    }
    details = DETAILS.get(name)
    if details is not None:
        out.update(details(obj, path))
    proc = getattr(obj, "processor", None)
    if proc is not None:  # the chain the policy runs (vlatune.policies.processor)
        from vlatune.policies.processor import PROCESSOR_FILE

        out["processor"] = proc.describe()
        out["conventions"] = proc.conventions
        saved = policy_folder(path) / PROCESSOR_FILE
        if name != "composed":
            out["normalization"] = (
                f"{saved}: the statistics the policy was fine-tuned with (the run's stats.json)"
                if saved.is_file()
                else "the released folder's own statistics files (no processor.json: not "
                "fine-tuned by vlatune)"
            )
    elif "processor" not in out:
        out["processor"] = ["none: this object has no processor (model-level batches only)"]
    return out


def format_inspect(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']}",
        f"  family:        {info['family']} ({info['summary']})",
    ]
    if "architecture" in info:
        lines.append(f"  architecture:  {info['architecture']}")
    lines += [
        f"  parameters:    {info['parameters']:,} total, {info['trainable']:,} trainable",
        f"  dtype:         {info['dtype']}",
    ]
    conv = info.get("conventions")
    if isinstance(conv, dict):
        lines.append("  conventions:   " + ", ".join(f"{k}={v}" for k, v in conv.items()))
    elif conv:
        lines.append(f"  conventions:   {conv}")
    lines.append("  processor:")
    lines += [f"    - {step}" for step in info.get("processor", [])]
    if "normalization" in info:
        lines.append(f"  normalisation: {info['normalization']}")
    return "\n".join(lines)

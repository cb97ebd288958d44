"""Policy families by name: config class, builder, loader and released-layout detector, imported lazily.

LeRobot's `policies/factory.py` pattern: the table holds "module:attribute" strings, so naming
a family imports nothing and a family's heavy dependencies (transformers, peft) load only when
that family is used. `policy.type` in a config names a family (`vlatune.config.schema`);
`vlatune.policies.load(path)` asks each family's detector whether a folder is its layout.

    >>> from vlatune.policies import registry
    >>> registry.get("pi0").expects
    "LeRobot's layout: config.json with type 'pi0' or 'pi05', and model.safetensors"
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One family. `config`, `build`, `load`, `detect` are "module:attr" (attr may be dotted);
    None where the family has no such piece yet (said, never faked)."""

    name: str
    summary: str
    package: str
    expects: str  # the files its folder layout holds, for the unknown-layout error
    config: str | None = None  # the typed `policy` section (vlatune.config.schema)
    build: str | None = None  # (cfg, stats, chunks) -> policy, for `vlatune train`
    load: str | None = None  # (path) -> the family's object
    detect: str | None = None  # (path) -> bool: is this folder the family's layout?
    # (path) -> the bare model of a released folder vlatune did not save (no processor.json:
    # no dataset statistics, so it can be inspected and fine-tuned, not evaluated)
    released: str | None = None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "composed",
            "vlatune's backbone x head composition (tiny / hf-vlm / rdt-style x l1 / diffusion / "
            "flow / tokens)",
            "vlatune.policies.composed",
            "a vlatune policy folder (config.json with format 'vlatune-policy/1', "
            "model.safetensors, normalization.json), or a training checkpoint-<step>/ holding "
            "policy/",
            config="vlatune.config.schema:PolicyConfig",
            build="vlatune.policies.composed.policy:build_policy",
            load="vlatune.policies.composed.policy:VLAPolicy.from_pretrained",
            detect="vlatune.policies.io:is_vlatune_folder",
        ),
        Family(
            "pi0",
            "pi0 / pi0.5 (PaliGemma + Gemma action expert, flow matching), LeRobot's port",
            "vlatune.policies.pi0",
            "LeRobot's layout: config.json with type 'pi0' or 'pi05', and model.safetensors",
            config="vlatune.config.schema:Pi0FamilyConfig",
            build="vlatune.policies.pi0.family:build_policy",
            load="vlatune.policies.pi0.family:load_policy",
            released="vlatune.policies.io:load_pi0",
            detect="vlatune.policies.pi0.convert:is_released_folder",
        ),
        Family(
            "rdt",
            "the released RDT-1B (Robotics Diffusion Transformer)",
            "vlatune.policies.rdt",
            "config.json with RDTRunner's init arguments (action_dim, pred_horizon, rdt, "
            "noise_scheduler, ...) and model.safetensors or pytorch_model.bin",
            config="vlatune.config.schema:RDTFamilyConfig",
            build="vlatune.policies.rdt.family:build_policy",
            load="vlatune.policies.rdt.family:load_policy",
            released="vlatune.policies.io:load_rdt",
            detect="vlatune.policies.io:is_rdt_folder",
        ),
        Family(
            "openvla",
            "OpenVLA and OpenVLA-OFT (Prismatic: DINOv2 + SigLIP, Llama 2; OFT heads)",
            "vlatune.policies.openvla",
            "the HF remote-code folder: config.json (auto_map), model.safetensors, "
            "dataset_statistics.json (+ OFT's action_head--*_checkpoint.pt and "
            "proprio_projector--*_checkpoint.pt)",
            config="vlatune.config.schema:OpenVLAFamilyConfig",
            build="vlatune.policies.openvla.family:build_policy",
            load="vlatune.policies.openvla.family:load_policy",
            detect="vlatune.policies.openvla.convert:is_released_folder",
        ),
        Family(
            "groot",
            "GR00T N1.5 (Eagle 2.5 VL backbone + DiT flow-matching action head)",
            "vlatune.policies.groot",
            "NVIDIA's layout: config.json, model.safetensors (backbone.* / action_head.* keys) "
            "and eagle_config.json",
            config="vlatune.config.schema:GrootFamilyConfig",
            build="vlatune.policies.groot.family:build_policy",
            load="vlatune.policies.groot.family:load_policy",
            released="vlatune.policies.groot.convert:load_released",
            detect="vlatune.policies.groot.convert:is_released_folder",
        ),
        Family(
            "nora",
            "NORA / NORA-Long (Qwen2.5-VL-3B + FAST+ action tokens at 151665 + k)",
            "vlatune.policies.nora",
            "a Hugging Face Qwen2.5-VL folder (config.json with model_type 'qwen2_5_vl', weights, "
            "a tokenizer with <robot_action_k> at consecutive ids) and norm_stats.json "
            "(+ fast_tokenizer/ once saved by vlatune)",
            config="vlatune.config.schema:NoraFamilyConfig",
            build="vlatune.policies.nora.family:build_policy",
            load="vlatune.policies.nora.family:load_policy",
            detect="vlatune.policies.nora.convert:is_released_folder",
        ),
    )
}


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    """The family called `name`; an unknown name is refused with the closest known one."""
    if name in FAMILIES:
        return FAMILIES[name]
    close = difflib.get_close_matches(name, FAMILIES, n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise KeyError(f"unknown policy family '{name}'.{hint} Known: {', '.join(FAMILIES)}")


def resolve(ref: str) -> Any:
    """Import "module:attr.sub" and return the attribute (ImportError / AttributeError name it)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def piece(family: Family, what: str) -> Callable[..., Any]:
    """`family.<what>` imported; a missing piece is an error saying so."""
    ref = getattr(family, what)
    if ref is None:
        raise NotImplementedError(f"policy family '{family.name}' has no {what} yet")
    return resolve(ref)


def build(cfg, stats: dict[str, Any], chunks=None):
    """A fresh policy for a run config (`vlatune.config.Config`) and its training statistics."""
    family = get(cfg.policy.type)
    if family.build is None:
        raise NotImplementedError(
            f"policy.type '{family.name}': `vlatune train` cannot build this family from a "
            "dataset yet (its processor from the training data to model inputs is issue 20 "
            f"item 3); load a released folder with vlatune.policies.load, or use {family.package} "
            "directly"
        )
    return resolve(family.build)(cfg, stats, chunks=chunks)

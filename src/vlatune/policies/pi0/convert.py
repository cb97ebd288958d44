"""Checkpoint conversion for the pi0 family: LeRobot's released layout <-> our module names.

LeRobot saves a pi0 / pi0.5 policy as `config.json` + `model.safetensors` (`PI0Policy.save_pretrained`,
the layout of `lerobot/pi0_base`, `lerobot/pi05_base`), keys under `model.` (see
`../shared/reference/pi0/keys.txt`). The key map is explicit: one prefix table (torchtune's
`_FROM_HF` pattern), applied both ways, so a file loads with missing == unexpected == [] or fails
naming the keys. The renames LeRobot's `_fix_pytorch_state_dict_keys` applies to openpi-converted
files are applied too and counted in the report: a missing `model.` prefix, pi0's `time_mlp_*` ->
`action_time_mlp_*` (pi0.5 the other way), and the VLM `embed_tokens` taken from `lm_head` when
the file has only the latter (openpi ties them).

    >>> model, report = load_released("pi0_folder")            # strict; report.renamed lists renames
    >>> save_released(model, "out_folder")                      # LeRobot's from_pretrained reads it
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlatune import fsutil
from vlatune.policies.pi0.configuration import Pi0Config, read_arch
from vlatune.policies.pi0.modeling import Pi0Model

_P = "model.paligemma_with_expert."
# (ours, LeRobot's) key prefixes; the first match wins, so longer / more specific come first.
KEY_PREFIXES: list[tuple[str, str]] = [
    ("vision.", _P + "paligemma.model.vision_tower.vision_model."),
    ("projector.", _P + "paligemma.model.multi_modal_projector.linear."),
    ("embed_tokens.", _P + "paligemma.model.language_model.embed_tokens."),
    ("vlm_layers.", _P + "paligemma.model.language_model.layers."),
    ("vlm_norm.", _P + "paligemma.model.language_model.norm."),
    ("vlm_lm_head.", _P + "paligemma.lm_head."),
    ("expert_layers.", _P + "gemma_expert.model.layers."),
    ("expert_norm.", _P + "gemma_expert.model.norm."),
    ("expert_lm_head.", _P + "gemma_expert.lm_head."),
    ("", "model."),  # action_in_proj, action_out_proj, state_proj, (action_)time_mlp_*
]
# Layouts other transformers versions give the vision tower (SiglipVisionModel without `vision_model`).
LOAD_ALIASES = {
    _P + "paligemma.model.vision_tower.": _P + "paligemma.model.vision_tower.vision_model."
}
_EMBED = _P + "paligemma.model.language_model.embed_tokens.weight"
_LM_HEAD = _P + "paligemma.lm_head.weight"


def to_released_key(key: str) -> str:
    for ours, theirs in KEY_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(key)  # unreachable: "" matches


def from_released_key(key: str) -> str | None:
    """Our name for a LeRobot key, or None when no prefix matches."""
    for ours, theirs in KEY_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


@dataclass
class LoadReport:
    """What loading did besides the plain prefix map (each rename / fallback counted)."""

    renamed: list[tuple[str, str]] = field(default_factory=list)
    tied_from_lm_head: bool = False
    tensors: int = 0

    def lines(self) -> list[str]:
        out = [f"loaded {self.tensors} tensors strictly (missing = unexpected = [])"]
        if self.renamed:
            out.append(
                f"{len(self.renamed)} key(s) renamed as LeRobot does: "
                + ", ".join(f"{a} -> {b}" for a, b in self.renamed[:5])
            )
        if self.tied_from_lm_head:
            out.append(
                "embed_tokens taken from lm_head (the file has only lm_head; openpi ties them)"
            )
        return out


def fix_released_keys(
    sd: dict[str, Tensor], cfg: Pi0Config, report: LoadReport
) -> dict[str, Tensor]:
    """LeRobot's key fixes for openpi-converted files (each one recorded in `report`)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = key
        for old_prefix, prefix in LOAD_ALIASES.items():
            if new.startswith(old_prefix) and not new.startswith(prefix):
                new = prefix + new[len(old_prefix) :]
        if not new.startswith("model."):
            new = "model." + new
        if cfg.variant == "pi0" and new.startswith("model.time_mlp_"):
            new = new.replace("model.time_mlp_", "model.action_time_mlp_", 1)
        if cfg.variant == "pi05" and new.startswith("model.action_time_mlp_"):
            new = new.replace("model.action_time_mlp_", "model.time_mlp_", 1)
        if new != key:
            report.renamed.append((key, new))
        if new in out:
            raise ValueError(f"two keys of the file map to {new} (one is {key})")
        out[new] = value
    if _EMBED not in out and _LM_HEAD in out:
        out[_EMBED] = out[_LM_HEAD].clone()
        report.tied_from_lm_head = True
    return out


def from_released_state_dict(
    sd: dict[str, Tensor], cfg: Pi0Config, source: str = "model.safetensors"
):
    """LeRobot's state dict -> ours (strict: every key must map); returns (state dict, report)."""
    report = LoadReport()
    fixed = fix_released_keys(sd, cfg, report)
    ours: dict[str, Tensor] = {}
    unknown = []
    for key, value in fixed.items():
        name = from_released_key(key)
        if name is None:
            unknown.append(key)
        else:
            ours[name] = value
    if unknown:
        raise ValueError(
            f"{source}: keys outside LeRobot's pi0 layout: {', '.join(sorted(unknown)[:10])}"
        )
    return ours, report


def to_released_state_dict(model: Pi0Model) -> dict[str, Tensor]:
    """Our model's tensors under LeRobot's keys (contiguous, unshared: ready for safetensors)."""
    return {
        to_released_key(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()
    }


def load_strict(model: Pi0Model, sd: dict[str, Tensor], source: str) -> None:
    """`load_state_dict` that fails naming the missing / unexpected keys (in LeRobot's names) and bad shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)}: " + ", ".join(to_released_key(k) for k in missing[:8])
            )
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)}: "
                + ", ".join(to_released_key(k) for k in unexpected[:8])
            )
        raise ValueError(
            f"{source} does not match the {model.cfg.variant} architecture: " + "; ".join(parts)
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{source}: {to_released_key(k)} has shape {tuple(v.shape)}, the config expects "
                f"{tuple(own[k].shape)} (wrong sizes: check config.json / pi0_arch.json)"
            )
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def build_model(cfg: Pi0Config, device: str | torch.device = "cpu") -> Pi0Model:
    """A model with random (transformers / torch default) initialisation."""
    with torch.device(device):
        return Pi0Model(cfg)


def _materialize_buffers(model: Pi0Model, device: torch.device) -> None:
    emb = model.vision.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))


def is_released_folder(folder: str | Path) -> bool:
    """True for a LeRobot pi0 / pi0.5 folder: config.json with `type` pi0 / pi05 and model.safetensors."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return json.loads((folder / "config.json").read_text()).get("type") in ("pi0", "pi05")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_released(
    folder: str | Path, arch: dict | None = None, device: str | torch.device = "cpu"
) -> tuple[Pi0Model, LoadReport]:
    """Load a LeRobot pi0 / pi0.5 folder strictly; sizes from `arch`, the folder's arch file, or config.json."""
    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            found = sorted(x.name for x in folder.iterdir()) if folder.is_dir() else []
            raise FileNotFoundError(
                f"{p} not found: a LeRobot pi0 / pi0.5 folder holds config.json and model.safetensors "
                f"(found: {', '.join(found) or 'nothing'})"
            )
    try:
        cfg_json = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = Pi0Config.from_lerobot(
        cfg_json, arch if arch is not None else read_arch(folder), source=str(cfg_path)
    )
    sd, report = from_released_state_dict(load_file(str(weights)), cfg, source=str(weights))
    with torch.device("meta"):
        model = Pi0Model(cfg)
    device = torch.device(device)
    load_strict(model, {k: v.to(device) for k, v in sd.items()}, str(weights))
    _materialize_buffers(model, device)
    if cfg.dtype == "bfloat16":
        model.set_precision("bfloat16")
    report.tensors = len(sd)
    return model, report


def save_released(model: Pi0Model, folder: str | Path) -> None:
    """Write `config.json` + `model.safetensors` as LeRobot does, plus `pi0_arch.json` (our sizes).

    Written to a temporary folder and renamed, so `folder` is complete or absent.
    """
    folder = Path(folder)
    tensors = to_released_state_dict(model)
    with fsutil.atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_lerobot(), indent=4) + "\n")
        (tmp / "pi0_arch.json").write_text(json.dumps(model.cfg.arch_dict(), indent=2) + "\n")

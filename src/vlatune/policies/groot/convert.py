"""Checkpoint conversion for GR00T N1.5: NVIDIA's released layout <-> our module names.

NVIDIA's folder (`nvidia/GR00T-N1.5-3B`, written by `GR00TN15.save_pretrained`) is `config.json`
(model type `gr00t_n1_5`) + `model.safetensors` or shards with `model.safetensors.index.json`,
keys under `backbone.eagle_model.*` and `action_head.*` (see
`../shared/reference/groot_n15/keys.txt`); the Qwen3 layers past `select_layer` are not in it.
vlatune also needs the Eagle backbone config next to it as `eagle_config.json` (configuration.py).
The key map is one explicit prefix table applied both ways (torchtune's `_FROM_HF` pattern), so a
file loads with missing == unexpected == [] or fails naming the keys. The one tolerated
difference is counted in the report: a file without `lm_head.weight` when the Eagle config ties
it to the embeddings.

    >>> model, report = load_released("GR00T-N1.5-3B")        # strict
    >>> save_released(model, "out")                            # the same layout, safetensors + JSON
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlatune import fsutil
from vlatune.policies.groot.configuration import MODEL_TYPE, GrootConfig
from vlatune.policies.groot.modeling import GrootModel

_E = "backbone.eagle_model."
# (ours, NVIDIA's) key prefixes; the first match wins, so the more specific come first.
KEY_PREFIXES: list[tuple[str, str]] = [
    ("backbone.vision.", _E + "vision_model.vision_model."),
    ("backbone.connector.", _E + "mlp1."),
    ("backbone.llm.", _E + "language_model.model."),
    ("backbone.lm_head.", _E + "language_model.lm_head."),
    ("backbone.project.", "backbone.eagle_linear."),
    ("head.dit.", "action_head.model."),
    ("head.", "action_head."),
]
_VISION = _E + "vision_model.vision_model."  # NVIDIA's release (transformers 4.x, 5.3)
_VISION_FLAT = _E + "vision_model."  # the same tensors saved by transformers >= 5.2x
_LM_HEAD = _E + "language_model.lm_head.weight"
_EMBED = _E + "language_model.model.embed_tokens.weight"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def to_released_key(key: str) -> str:
    for ours, theirs in KEY_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"no released name for our key {key!r}")


def from_released_key(key: str) -> str | None:
    """Our name for an NVIDIA key, or None when no prefix matches."""
    for ours, theirs in KEY_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def normalize_released_key(key: str) -> tuple[str, bool]:
    """NVIDIA's nested SigLIP names for a file saved with transformers' flat SiglipVisionModel
    (`...vision_model.embeddings.*` -> `...vision_model.vision_model.embeddings.*`); returns
    (key, whether it was renamed)."""
    if key.startswith(_VISION_FLAT) and not key.startswith(_VISION):
        return _VISION + key[len(_VISION_FLAT) :], True
    return key, False


@dataclass
class LoadReport:
    tensors: int = 0
    lm_head_tied_from_embeddings: bool = False
    flat_vision_keys: int = 0

    def lines(self) -> list[str]:
        out = [f"loaded {self.tensors} tensors strictly (missing = unexpected = [])"]
        if self.flat_vision_keys:
            out.append(
                f"{self.flat_vision_keys} SigLIP keys in transformers' flat layout renamed to "
                "NVIDIA's `vision_model.vision_model.*`"
            )
        if self.lm_head_tied_from_embeddings:
            out.append("lm_head.weight absent from the file: tied to embed_tokens (Eagle config)")
        return out


def is_released_folder(path: str | Path) -> bool:
    """Whether `path` is NVIDIA's GR00T N1.5 layout (config.json of model type `gr00t_n1_5`);
    loading then also needs the weights and eagle_config.json, and names what is missing."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE


def weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise ValueError(f"{folder / INDEX}: empty `weight_map`")
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{folder}: no {WEIGHTS} or {INDEX} (NVIDIA's GR00T N1.5 layout); files found: {found}"
    )


def read_released(folder: Path) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if k in sd:
                    raise ValueError(f"{path}: key {k} appears in two weight files")
                sd[k] = f.get_tensor(k)
    return sd


def from_released_state_dict(
    sd: dict[str, Tensor], model: GrootModel, source: str
) -> tuple[dict[str, Tensor], LoadReport]:
    report = LoadReport()
    renamed: dict[str, Tensor] = {}
    for key, value in sd.items():
        new, changed = normalize_released_key(key)
        if new in renamed:
            raise ValueError(f"{source}: {key} and another key both give {new}")
        report.flat_vision_keys += changed
        renamed[new] = value
    sd = renamed
    if _LM_HEAD not in sd and _EMBED in sd and model.backbone.text_config.tie_word_embeddings:
        sd[_LM_HEAD] = sd[_EMBED]
        report.lm_head_tied_from_embeddings = True
    ours, unknown = {}, []
    for key, value in sd.items():
        name = from_released_key(key)
        if name is None:
            unknown.append(key)
        else:
            ours[name] = value
    if unknown:
        raise ValueError(
            f"{source}: keys outside NVIDIA's GR00T N1.5 layout: {', '.join(sorted(unknown)[:10])}"
        )
    return ours, report


def load_strict(model: GrootModel, sd: dict[str, Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with shape and key errors that name the released keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)}: {', '.join(to_released_key(k) for k in missing[:8])}"
            )
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)}: "
                f"{', '.join(to_released_key(k) for k in unexpected[:8])}"
            )
        raise ValueError(
            f"{source}: the checkpoint does not match config.json / eagle_config.json "
            f"({'; '.join(parts)})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{source}: {to_released_key(k)} has shape {tuple(sd[k].shape)}, the config gives "
            f"{tuple(own[k].shape)} ({len(bad)} tensor(s) differ)"
        )
    result = model.load_state_dict(sd, strict=True, assign=False)
    assert not result.missing_keys and not result.unexpected_keys


def load_released(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[GrootModel, LoadReport]:
    """NVIDIA's folder -> (GrootModel, report); strict. The weights keep the file's dtype unless
    `dtype` is given (the rotary frequencies stay float32, as transformers keeps them)."""
    folder = Path(folder)
    cfg = GrootConfig.from_folder(folder)
    with torch.device("meta"):
        model = GrootModel(cfg, attn_implementation)
    raw = read_released(folder)
    sd, report = from_released_state_dict(raw, model, str(folder))
    if dtype is None:
        kinds = {v.dtype for v in sd.values() if v.is_floating_point()}
        dtype = kinds.pop() if len(kinds) == 1 else torch.float32
    model = model.to_empty(device=device).to(dtype)
    model.backbone.tie_weights()
    sd = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in sd.items()
    }
    load_strict(model, sd, str(folder))
    rebuild_buffers(model)
    report.tensors = len(raw)
    return model, report


# Non-persistent buffers (not in any checkpoint), recomputed after building on the meta device.
_BUFFERS = {"backbone.llm.rotary_emb.inv_freq", "backbone.llm.rotary_emb.original_inv_freq"}


def rebuild_buffers(model: GrootModel) -> None:
    """Recompute the buffers a checkpoint does not hold (rotary frequencies with transformers'
    own code, SigLIP position ids); fails naming any other such buffer."""
    persistent = set(model.state_dict())
    others = {n for n, _ in model.named_buffers() if n not in persistent and n not in _BUFFERS} - {
        n for n, _ in model.named_buffers() if n.endswith("embeddings.position_ids")
    }
    if others:
        raise RuntimeError(
            f"buffers without a rebuild rule (transformers changed?): {sorted(others)}"
        )
    model.backbone.tie_weights()
    device = next(model.parameters()).device
    llm = model.backbone.llm
    rotary = getattr(llm, "rotary_emb", None)
    if rotary is not None:
        llm.rotary_emb = type(rotary)(rotary.config).to(device)
    emb = getattr(model.backbone.vision, "embeddings", None)
    if emb is not None and hasattr(emb, "position_ids"):
        n = emb.position_ids.shape[-1]
        emb.position_ids = torch.arange(n, device=device).expand((1, -1))


def build_model(
    cfg: GrootConfig, device: str | torch.device = "cpu", attn_implementation: str = "sdpa"
) -> GrootModel:
    """Random-weight model (reference initialisation) on `device`."""
    with torch.device(device):
        return GrootModel(cfg, attn_implementation)


def to_released_state_dict(model: GrootModel) -> dict[str, Tensor]:
    """Our tensors under NVIDIA's keys (contiguous copies: ready for safetensors)."""
    sd = {
        to_released_key(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()
    }
    return sd


def save_released(model: GrootModel, folder: str | Path) -> None:
    """Write NVIDIA's layout (config.json, eagle_config.json, model.safetensors) atomically."""
    with fsutil.atomic_dir(folder) as tmp:
        model.cfg.save(tmp)
        save_file(to_released_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})

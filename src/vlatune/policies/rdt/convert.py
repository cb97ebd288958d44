"""Load and save the released RDT layout: `config.json` (init arguments) + weights.

The layout is what upstream `RDTRunner.save_pretrained` writes and
`robotics-diffusion-transformer/rdt-1b` ships: `config.json` (huggingface_hub's
`PyTorchModelHubMixin`: sorted keys, the `config` dict merged into the top level) and
`pytorch_model.bin` (`torch.save(state_dict)`, read here with `torch.load(weights_only=True)`
only), or `model.safetensors` (preferred when present, as upstream's loader does).

Keys: our module names are the released ones, so the key map is the identity; it is still an
explicit table of rules (torchtune's `_FROM_HF` pattern, one rule per module kind, both
directions), and every key must match exactly one rule: a released key no rule knows is
reported as unexpected, one the model has that the file lacks as missing, and loading fails
naming them (`missing == unexpected == []` or an error).

Saving writes the same layout, **safetensors by default** (`model.safetensors`; upstream's
`from_pretrained` reads it first), `pytorch_model.bin` with `weights="bin"`; the folder is
written under a temporary name and renamed (`vlatune.fsutil.atomic_dir`).

    >>> model = load_released("rdt-1b", dtype=torch.bfloat16)
    >>> save_released(model, "runs/x/rdt-released")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

from vlatune.fsutil import atomic_dir
from vlatune.policies.rdt.configuration import CONFIG_NAME, RDTConfig
from vlatune.policies.rdt.modeling import RDTRunner

SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"

_N = r"(\d+)"
_LIN = r"(weight|bias)"
# (released key pattern, our key template). Identity today; one line per module kind.
_RULES: list[tuple[str, str]] = [
    (r"model\.(x_pos_embed|lang_cond_pos_embed|img_cond_pos_embed)", r"model.\1"),
    (rf"model\.(t_embedder|freq_embedder)\.mlp\.(0|2)\.{_LIN}", r"model.\1.mlp.\2.\3"),
    (rf"model\.blocks\.{_N}\.(norm1|norm2|norm3)\.weight", r"model.blocks.\1.\2.weight"),
    (rf"model\.blocks\.{_N}\.attn\.(qkv|proj)\.{_LIN}", r"model.blocks.\1.attn.\2.\3"),
    (
        rf"model\.blocks\.{_N}\.(attn|cross_attn)\.(q_norm|k_norm)\.weight",
        r"model.blocks.\1.\2.\3.weight",
    ),
    (rf"model\.blocks\.{_N}\.cross_attn\.(q|kv|proj)\.{_LIN}", r"model.blocks.\1.cross_attn.\2.\3"),
    (rf"model\.blocks\.{_N}\.ffn\.(fc1|fc2)\.{_LIN}", r"model.blocks.\1.ffn.\2.\3"),
    (r"model\.final_layer\.norm_final\.weight", r"model.final_layer.norm_final.weight"),
    (rf"model\.final_layer\.ffn_final\.(fc1|fc2)\.{_LIN}", r"model.final_layer.ffn_final.\1.\2"),
    (rf"(lang_adaptor|img_adaptor|state_adaptor)\.{_N}\.{_LIN}", r"\1.\2.\3"),
    (rf"(lang_adaptor|img_adaptor|state_adaptor)\.{_LIN}", r"\1.\2"),  # `linear` adaptors
]
_FROM_RELEASED = [(re.compile(p), t) for p, t in _RULES]
# The reverse rules: our templates as patterns, the released patterns as templates. Both
# sides use the same names, so reversing is the same table read the other way.
_TO_RELEASED = [(re.compile(p), t) for p, t in _RULES]


def released_to_ours(key: str) -> str | None:
    """Our name for a released key, None when no rule knows it (reported as unexpected)."""
    for pat, tmpl in _FROM_RELEASED:
        if pat.fullmatch(key):
            return pat.sub(tmpl, key)
    return None


def ours_to_released(key: str) -> str | None:
    for pat, tmpl in _TO_RELEASED:
        if pat.fullmatch(key):
            return pat.sub(tmpl, key)
    return None


class CheckpointKeyError(ValueError):
    """A checkpoint whose keys do not match the model; names the keys."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], shapes: list[str]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        if shapes:
            parts.append(f"wrong shape for {len(shapes)} key(s): {_few(shapes)}")
        super().__init__(
            f"{source}: does not match the RDT built from its config.json: " + "; ".join(parts)
        )


def _few(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def weights_file(folder: str | Path) -> Path:
    folder = Path(folder)
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (folder / name).is_file():
            return folder / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected an RDT checkpoint folder)")
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "none"
    raise FileNotFoundError(
        f"{folder}: no RDT weights ({SAFETENSORS_NAME} or {PICKLE_NAME}); files found: {found}"
    )


def read_released_state_dict(folder: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The released tensors by released key, and the file they came from."""
    path = weights_file(folder)
    if path.name == SAFETENSORS_NAME:
        from safetensors.torch import load_file

        return load_file(str(path)), path
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal becomes one sentence
        raise ValueError(
            f"{path}: cannot be read as a plain tensor dict with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); vlatune never "
            f"unpickles arbitrary objects: convert it to {SAFETENSORS_NAME} where it was made"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ValueError(f"{path}: expected a dict of name -> tensor (RDT's state_dict)")
    return sd, path


def convert_released(
    released: dict[str, torch.Tensor], model: RDTRunner, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename released keys to ours and check them against `model`: every key accounted for."""
    ours: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in released.items():
        name = released_to_ours(k)
        if name is None:
            unexpected.append(k)
        else:
            ours[name] = v
    expected = model.state_dict()
    unexpected += [k for k in ours if k not in expected and k not in unexpected]
    missing = [k for k in expected if k not in ours]
    shapes = [
        f"{k} {tuple(ours[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in ours and tuple(ours[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointKeyError(source, missing, sorted(set(unexpected)), shapes)
    return {k: v for k, v in ours.items() if k in expected}


def load_released(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: RDTConfig | None = None,
) -> RDTRunner:
    """An `RDTRunner` from a released folder, strictly: fails naming any missing, unexpected or
    mis-shaped key. `dtype` is the model's (the released config does not say; upstream's
    default is bfloat16). `config` overrides the folder's config.json."""
    folder = Path(folder)
    cfg = config or RDTConfig.from_json(folder / CONFIG_NAME)
    released, path = read_released_state_dict(folder)
    with torch.device("meta"):
        model = RDTRunner(cfg, init_weights=False)
    sd = convert_released(released, model, source=str(path))
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys  # checked above
    return model.to(device=device, dtype=dtype)


def released_state_dict(model: RDTRunner) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        name = ours_to_released(k)
        if name is None:
            raise KeyError(f"no released name for parameter {k!r} (convert.py's _RULES)")
        out[name] = v.detach().contiguous().cpu()
    return out


def save_released(
    model: RDTRunner,
    folder: str | Path,
    weights: Literal["safetensors", "bin"] = "safetensors",
) -> Path:
    """Write `folder` in the released layout: config.json + model.safetensors (default) or
    pytorch_model.bin. Tensors keep the model's dtype. Returns the folder."""
    folder = Path(folder)
    sd = released_state_dict(model)
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(model.cfg.to_json_string())
        if weights == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        elif weights == "bin":
            torch.save(sd, tmp / PICKLE_NAME)
        else:
            raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    return folder

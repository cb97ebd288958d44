"""NORA's released folders: detect and load them as a `NoraPolicy`, vocabulary untouched.

A NORA folder (`declare-lab/nora`, `declare-lab/nora-long`, their fine-tunes, or
`NoraPolicy.save`) is a Hugging Face Qwen2.5-VL folder: `config.json` with model_type
`qwen2_5_vl`, the weights, the tokenizer (whose `<robot_action_k>` tokens follow the base
vocabulary: `<robot_action_0>` at 151665 on Qwen2.5, at a tiny model's own base vocabulary size
in tests) and `norm_stats.json`. The FAST+ tokenizer is not in NORA's folder (NORA downloads
`physical-intelligence/fast`): pass its folder, or keep it as `fast_tokenizer/` next to the
weights (`NoraPolicy.save` does).

The time horizon, in order: the `horizon` argument, the folder's `nora_config.json`, then the
checkpoint name (`nora-long` -> 5, else 1; configuration.horizon_for). A wrong horizon is not
silent: FAST then cannot decode H x 7 values and every query counts as undecodable.

    >>> policy = load_released("ckpt/nora-long", fast_tokenizer="ckpt/fast")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlatune.policies.nora.configuration import (
    CONFIG_FILE,
    FAST_FOLDER,
    NORM_STATS,
    NoraConfig,
    horizon_for,
)

log = logging.getLogger(__name__)
ACTION_PREFIX = "<robot_action_"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def action_tokens(folder: str | Path) -> dict[int, int] | None:
    """{k: id of `<robot_action_k>`} from the folder's tokenizer files (tokenizer.json's
    added_tokens, or added_tokens.json), None when neither is readable."""
    folder = Path(folder)
    found: dict[str, int] | None = None
    spec = _read_json(folder / "tokenizer.json")
    if isinstance(spec, dict) and isinstance(spec.get("added_tokens"), list):
        found = {t["content"]: int(t["id"]) for t in spec["added_tokens"] if "content" in t}
    else:
        added = _read_json(folder / "added_tokens.json")
        if isinstance(added, dict):
            found = {k: int(v) for k, v in added.items()}
    if found is None:
        return None
    out = {}
    for content, i in found.items():
        if content.startswith(ACTION_PREFIX) and content.endswith(">"):
            k = content[len(ACTION_PREFIX) : -1]
            if k.isdigit():
                out[int(k)] = i
    return out


def action_layout(folder: str | Path) -> tuple[int, int] | None:
    """(id of `<robot_action_0>`, V) when the folder's tokenizer holds `<robot_action_k>`,
    k = 0..V-1, at consecutive ids base + k; else None."""
    tokens = action_tokens(folder)
    if not tokens or 0 not in tokens:
        return None
    base, V = tokens[0], len(tokens)
    if sorted(tokens) != list(range(V)) or any(tokens[k] != base + k for k in range(V)):
        return None
    return base, V


def _why_not(path: Path) -> str | None:
    """Why `path` is not a NORA folder (None: it is one)."""
    if not path.is_dir():
        return f"{path} is not a folder"
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or config.get("model_type") != "qwen2_5_vl":
        return "config.json with model_type 'qwen2_5_vl' is missing"
    if not (path / NORM_STATS).is_file():
        return f"{NORM_STATS} is missing"
    layout = action_layout(path)
    if layout is None:
        return "the tokenizer lacks <robot_action_0..V-1> at consecutive ids"
    base, _ = layout
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size", config.get("vocab_size"))
    if isinstance(vocab, int) and base >= vocab:
        return f"<robot_action_0> is id {base}, beyond the model's {vocab} embedding rows"
    return None


def is_released_folder(path: str | Path) -> bool:
    """A NORA folder: Qwen2.5-VL config.json, norm_stats.json, and a tokenizer whose
    `<robot_action_k>` sit at consecutive ids from `<robot_action_0>` (151665 on NORA)."""
    return _why_not(Path(path)) is None


def load_released(
    path: str | Path,
    fast_tokenizer: Any = None,
    *,
    horizon: int | None = None,
    checkpoint: str | None = None,
    unnorm_key: str | None = None,
    dtype: str = "float32",
    max_new_tokens: int | None = None,
):
    """A `NoraPolicy` from a NORA folder. `fast_tokenizer`: a `FastTokenizer` or the folder of
    FAST+ (`physical-intelligence/fast`); default `<path>/fast_tokenizer`. `checkpoint`: the
    hub id the folder holds (for the horizon; default the folder's name). The embedding matrix
    is never resized: a tokenizer longer than the embedding rows is an error."""
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    from vlatune.policies.nora.modeling import NoraPolicy
    from vlatune.policies.nora.processor import load_norm_stats
    from vlatune.policies.tokenizers.fast import FastTokenizer

    path = Path(path)
    why = _why_not(path)
    if why is not None:
        raise ValueError(
            f"{path}: not a NORA folder ({why}); expected config.json (model_type "
            f"qwen2_5_vl), the weights, the tokenizer with <robot_action_k> and {NORM_STATS}"
        )
    base, V = action_layout(path)
    if (path / CONFIG_FILE).is_file():
        cfg = NoraConfig.from_file(path / CONFIG_FILE)
        if (cfg.action_base, cfg.action_vocab) != (base, V):
            raise ValueError(
                f"{path / CONFIG_FILE}: action_base / action_vocab {cfg.action_base} / "
                f"{cfg.action_vocab} disagree with the tokenizer's {base} / {V}"
            )
        if horizon is not None:
            cfg = NoraConfig(**{**cfg.to_json(), "horizon": int(horizon)})
    else:
        name = checkpoint or path.name
        h = int(horizon) if horizon is not None else horizon_for(name)
        if horizon is None:
            log.info("NORA %s: FAST time horizon %d from the checkpoint name %r", path, h, name)
        cfg = NoraConfig(action_base=base, action_vocab=V, horizon=h, checkpoint=str(name))
    if max_new_tokens is not None:
        cfg = NoraConfig(**{**cfg.to_json(), "max_new_tokens": int(max_new_tokens)})

    if fast_tokenizer is None:
        fast_tokenizer = path / FAST_FOLDER
        if not fast_tokenizer.is_dir():
            raise FileNotFoundError(
                f"{path}: no FAST tokenizer ({FAST_FOLDER}/ is missing); NORA's folder does not "
                "hold it: pass fast_tokenizer= the folder of physical-intelligence/fast (FAST+)"
            )
    fast = (
        fast_tokenizer
        if isinstance(fast_tokenizer, FastTokenizer)
        else FastTokenizer.from_pretrained(fast_tokenizer)
    )
    if fast.bpe.get_vocab_size() > V:
        raise ValueError(
            f"the FAST tokenizer has {fast.bpe.get_vocab_size()} ids but {path}'s tokenizer only "
            f"{V} <robot_action_k> tokens"
        )

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype {dtype!r}: use 'float32' or 'bfloat16'")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model {rows} embedding "
            "rows; NORA's folder must not need resizing"
        )
    if tokenizer.convert_tokens_to_ids(f"{ACTION_PREFIX}0>") != base:
        raise ValueError(f"{path}: the loaded tokenizer does not put <robot_action_0> at {base}")
    model.eval()
    stats = load_norm_stats(path)
    return NoraPolicy(model, tokenizer, image_processor, fast, cfg, stats, unnorm_key)

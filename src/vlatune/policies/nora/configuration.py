"""NORA's constants (`declare-lab/nora`, `declare-lab/nora-long`), as one small typed config.

NORA is a Qwen2.5-VL-3B whose action tokens `<robot_action_k>`, k = 0..2047, sit right after
Qwen2.5's base vocabulary: id 151665 + k (`inference/nora.py`: `_ACTION_TOKEN_MIN` 151665,
`_ACTION_TOKEN_MAX` 153712). Actions are FAST+ ids (`physical-intelligence/fast`, action dim 7)
of the q01/q99-normalised chunk; the time horizon is 1 for `declare-lab/nora` and 5 for
`declare-lab/nora-long` (and its LIBERO fine-tunes, `run_libero_eval_nora.py` sets
`fast_tokenizer.time_horizon = 5`). The prompt is Qwen2.5-VL's chat template with one user turn:
the image, resized to 224 x 224, then the instruction.

    >>> NoraConfig.for_checkpoint("declare-lab/nora-long").horizon
    5
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

BASE_VOCAB = 151665  # Qwen2.5's tokenizer: id of <robot_action_0> in NORA
ACTION_VOCAB = 2048  # FAST+ vocabulary
ACTION_TOKEN = "<robot_action_{}>"
IMAGE_SIZE = 224  # NORA resizes every image to 224 x 224 (resized_height / resized_width)
ACTION_DIM = 7  # 3 delta pos + 3 delta rot + gripper
HORIZONS = {"declare-lab/nora": 1, "declare-lab/nora-long": 5}
FAST_PLUS = "physical-intelligence/fast"
NORM_STATS = "norm_stats.json"
FAST_FOLDER = "fast_tokenizer"  # where a saved NoraPolicy keeps its FAST tokenizer
CONFIG_FILE = "nora_config.json"  # vlatune's record of the constants below, next to config.json

# Qwen2.5-VL's chat template, the pieces NORA's prompt uses (the template adds the default
# system turn when the first message is not a system message, and a newline after <|im_end|>)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
PAD_TOKEN = "<|endoftext|>"


def horizon_for(checkpoint: str) -> int:
    """FAST+ time horizon of a NORA checkpoint id or folder name: 5 for `nora-long` (and its
    fine-tunes, `nora-long-finetuned-*`), 1 for `nora` (and its fine-tunes)."""
    name = str(checkpoint).rstrip("/")
    if name in HORIZONS:
        return HORIZONS[name]
    return 5 if "nora-long" in Path(name).name.lower() or "nora-long" in name.lower() else 1


@dataclass(frozen=True)
class NoraConfig:
    """`action_base`: id of `<robot_action_0>` (151665 on NORA; a tiny test model's own base
    vocabulary); `action_vocab`: number of action tokens (2048 = FAST+); `horizon`: FAST time
    horizon (1 NORA, 5 NORA-Long); `action_dim` 7; `image_size` 224; `max_new_tokens`: greedy
    decoding budget (NORA uses the checkpoint's generation config; a FAST+ chunk of 5 x 7 takes
    about 15-30 tokens); `system`: the system turn the template adds."""

    action_base: int = BASE_VOCAB
    action_vocab: int = ACTION_VOCAB
    horizon: int = 1
    action_dim: int = ACTION_DIM
    image_size: int = IMAGE_SIZE
    max_new_tokens: int = 128
    system: str = DEFAULT_SYSTEM
    checkpoint: str = "declare-lab/nora"

    def __post_init__(self):
        for name in ("action_base", "action_vocab", "horizon", "action_dim", "image_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"NoraConfig.{name} must be a positive integer; got {v!r}")

    @classmethod
    def for_checkpoint(cls, checkpoint: str, **overrides) -> NoraConfig:
        """NORA's constants for `declare-lab/nora` or `declare-lab/nora-long` (horizon 1 / 5)."""
        overrides.setdefault("horizon", horizon_for(checkpoint))
        return cls(checkpoint=str(checkpoint), **overrides)

    @property
    def action_token_max(self) -> int:
        return self.action_base + self.action_vocab - 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict, source: str = "nora_config.json") -> NoraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**obj)

    @classmethod
    def from_file(cls, path: str | Path) -> NoraConfig:
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_json(obj, str(path))

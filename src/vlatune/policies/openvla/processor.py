"""Processor steps of the `openvla` family: a vlatune frame -> OpenVLA / OFT inputs, and back.

What OpenVLA's `PrismaticProcessor` + the LIBERO eval utilities of `openvla/openvla` and
`moojink/openvla-oft` do between an observation and the model (`vlatune.policies.processor`):

- `openvla.pixels`: each camera's uint8 (3, S, S) image (the generic `images` step: centre crop
  of `crop_area` at evaluation, random in training, resize to the config's `image_sizes`) ->
  float [0, 1] -> DINOv2's ImageNet normalisation stacked on SigLIP's (0.5 / 0.5): 6 channels per
  image, `num_images` images -> `pixel_values` (6 * num_images, S, S).
- `openvla.prompt`: `In: What action should the robot take to {instruction.lower()}?\\nOut:`
  through the Llama tokenizer (BOS first), OpenVLA's space token 29871 appended, right-padded
  with the pad id to `max_tokens` -> `input_ids`, `attention_mask`.
- `openvla.gripper`: LIBERO's env gripper (-1 open, +1 close) <-> the model's [0, 1] (1 open),
  the inverse of OFT's `normalize_gripper_action(binarize=True)` + `invert_gripper_action`
  (the rule lives in `vlatune.conventions`: `model_gripper_from_env` / `model_gripper_to_env`).
- `openvla.normalize`: BOUNDS_Q99 (or BOUNDS) of `dataset_statistics.json`:
  2 (x - q01) / (q99 - q01 + 1e-8) - 1 clipped to [-1, 1] where the statistics' `mask` is True
  (the gripper is masked); `state` becomes `proprio`. Inverse on actions: OFT's
  `_unnormalize_actions`, which does not clip: a query whose prediction leaves [-1, 1] by more
  than `Normalize.CLIP_TOLERANCE` on a normalised dimension is un-normalised as it is and
  counted as the fallback counter `out_of_range_actions` (`policy.fallbacks()`).
- `openvla.action_tokens` (variant openvla, training): the first normalised action -> 256
  uniform bins on [-1, 1], token = vocab end - np.digitize(a, bins) -> `action_token_ids`.

    >>> proc = build_processor(spec, tokenizer, stats)   # family.py
    >>> sample = proc(frame)
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlatune.conventions import model_gripper_from_env, model_gripper_to_env
from vlatune.policies.processor import (
    Images,
    Normalize,
    Processor,
    Select,
    Step,
    declared_conventions,
    register,
)

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
SPACE_TOKEN = 29871
BOS_ID, EOS_ID, PAD_ID = 1, 2, 32000
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"


def fused_pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, S, S) -> float32 (6, S, S): DINOv2 channels 0-2, SigLIP channels 3-5."""
    x = image.float() / 255.0
    dino = (x - torch.tensor(DINO_MEAN)[:, None, None]) / torch.tensor(DINO_STD)[:, None, None]
    sig = (x - torch.tensor(SIGLIP_MEAN)[:, None, None]) / torch.tensor(SIGLIP_STD)[:, None, None]
    return torch.cat([dino, sig], dim=0)


def prompt_text(instruction: str) -> str:
    return PROMPT.format(instruction=instruction.lower().strip())


def load_tokenizer(folder: str | Path):
    """The Llama tokenizer of an OpenVLA folder (`tokenizer.json`, HF tokenizers' format)."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no {TOKENIZER_FILE}; OpenVLA's processor needs the Llama-2 tokenizer "
            "(the released folders have it; set policy.tokenizer to a folder holding one)"
        )
    return Tokenizer.from_file(str(path))


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """BOS + the prompt's ids + the space token 29871 (as OpenVLA's `predict_action` adds)."""
    ids = list(tokenizer.encode(prompt_text(instruction), add_special_tokens=True).ids)
    if not ids or ids[0] != BOS_ID:
        ids = [BOS_ID] + ids
    if ids[-1] != SPACE_TOKEN:
        ids.append(SPACE_TOKEN)
    return ids


def bounds(stats: dict[str, Any], norm_type: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = ("q01", "q99") if norm_type == "bounds_q99" else ("min", "max")
    for k in (lo, hi):
        if k not in stats:
            raise ValueError(f"{where}: key {k!r} missing (needed for {norm_type} normalisation)")
    return np.asarray(stats[lo], np.float64), np.asarray(stats[hi], np.float64)


@register
class Pixels(Step):
    """`images` {camera: uint8 (3, S, S)} -> `pixel_values` float32 (6 * n, S, S)."""

    name = "openvla.pixels"

    def __init__(self, cameras: Sequence[str]):
        self.cameras = list(cameras)

    def __call__(self, sample, rng):
        images = sample.pop("images")
        sample["pixel_values"] = torch.cat([fused_pixels(images[c]) for c in self.cameras], 0)
        return sample

    def describe(self) -> str:
        return (
            f"pixel_values: {self.cameras} each as DINOv2 (ImageNet mean / std) + SigLIP "
            "(0.5 / 0.5) channels, 6 per image"
        )

    def to_json(self, folder):
        return {"cameras": self.cameras}


@register
class Prompt(Step):
    """`instruction` -> OpenVLA's prompt ids (right-padded) and attention mask."""

    name = "openvla.prompt"

    def __init__(self, tokenizer, max_tokens: int, source: str | None = None):
        self.tokenizer, self.max_tokens, self.source = tokenizer, int(max_tokens), source

    def __call__(self, sample, rng):
        if self.tokenizer is None:
            raise FileNotFoundError(
                f"{self.source}: no {TOKENIZER_FILE}; OpenVLA's processor needs the Llama-2 "
                "tokenizer to turn the instruction into ids (set policy.tokenizer)"
            )
        ids = prompt_ids(self.tokenizer, str(sample.get("instruction", "")))
        if len(ids) > self.max_tokens:
            raise ValueError(
                f"the prompt of {sample.get('instruction')!r} has {len(ids)} tokens, more than "
                f"policy.max_prompt_tokens = {self.max_tokens}"
            )
        pad = self.max_tokens - len(ids)
        sample["input_ids"] = torch.tensor(ids + [PAD_ID] * pad, dtype=torch.long)
        sample["attention_mask"] = torch.tensor([True] * len(ids) + [False] * pad)
        return sample

    def describe(self) -> str:
        return f"prompt {PROMPT!r} (lower-cased instruction), Llama ids + 29871, pad to {self.max_tokens}"

    def to_json(self, folder):
        if self.tokenizer is None:
            return {"max_tokens": self.max_tokens, "tokenizer": None}
        (Path(folder) / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(Path(folder) / TOKENIZER_DIR / TOKENIZER_FILE))
        return {"max_tokens": self.max_tokens, "tokenizer": TOKENIZER_DIR}

    @classmethod
    def from_json(cls, d, folder):
        sub = d.get("tokenizer")
        tok = load_tokenizer(Path(folder) / sub) if sub else None
        return cls(tok, d["max_tokens"], source=str(folder))


@register
class Gripper(Step):
    """Env gripper (-1 open, +1 close) -> the model's [0, 1] (1 open) on `actions[..., dim]`;
    inverse: OFT's normalize_gripper_action(binarize) then invert_gripper_action. Both rules are
    `vlatune.conventions`' for the family "openvla" (MODEL_GRIPPER)."""

    name = "openvla.gripper"
    FAMILY = "openvla"

    def __init__(self, dim: int = -1):
        self.dim = int(dim)

    def __call__(self, sample, rng):
        a = sample.get("actions")
        if a is None:
            return sample
        a = np.array(a, dtype=np.float64)
        a[..., self.dim] = model_gripper_from_env(a[..., self.dim], self.FAMILY)
        sample["actions"] = a
        return sample

    def inverse(self, chunk):
        out = np.array(chunk, dtype=np.float64)
        out[..., self.dim] = model_gripper_to_env(out[..., self.dim], self.FAMILY)
        return out

    def describe(self) -> str:
        return "gripper: env -1 open / +1 close <-> model [0, 1] (1 open), binarised on output"

    def to_json(self, folder):
        return {"dim": self.dim}


@register
class BoundsNormalize(Step):
    """OpenVLA's BOUNDS_Q99 / BOUNDS normalisation of `key` where `mask` is True, into `out`."""

    name = "openvla.normalize"
    EPS = 1e-8
    TOLERANCE = Normalize.CLIP_TOLERANCE  # the same "beyond the training range" as `normalize`
    COUNTER = "out_of_range_actions"

    def __init__(self, key: str, out: str, low, high, mask, norm_type: str = "bounds_q99"):
        if key not in ("state", "actions"):
            raise ValueError(f"openvla.normalize: key must be 'state' or 'actions', got {key!r}")
        self.key, self.out, self.norm_type = key, out, norm_type
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.mask = np.asarray(mask, dtype=bool)
        self.out_of_range = 0

    def __call__(self, sample, rng):
        x = sample.pop(self.key, None)
        if x is None:
            return sample
        x = np.asarray(x, np.float64)
        if x.shape[-1] != len(self.low):
            raise ValueError(
                f"{self.key} has {x.shape[-1]} dims; the statistics have {len(self.low)}"
            )
        n = 2 * (x - self.low) / (self.high - self.low + self.EPS) - 1
        n = np.where(self.mask, np.clip(n, -1.0, 1.0), x)
        sample[self.out] = torch.from_numpy(n.astype(np.float32))
        return sample

    def inverse(self, chunk):
        """OFT's `_unnormalize_actions` on (B, H, A) (or one (H, A)) normalised chunks: not
        clipped, as OFT; each query with a normalised (`mask`ed) value beyond [-1, 1] by more
        than TOLERANCE is counted once (`counters()`)."""
        if self.key != "actions":
            return chunk
        c = np.asarray(chunk, np.float64)
        outside = self.mask & (np.abs(c) > 1.0 + self.TOLERANCE)
        per_query = outside.reshape(len(c), -1) if c.ndim >= 3 else outside.reshape(1, -1)
        self.out_of_range += int(per_query.any(axis=1).sum())
        return np.where(self.mask, 0.5 * (c + 1) * (self.high - self.low + self.EPS) + self.low, c)

    def counters(self):
        return {self.COUNTER: self.out_of_range} if self.key == "actions" else {}

    def describe(self) -> str:
        return f"{self.key} -> {self.out}: {self.norm_type} where mask {self.mask.tolist()}" + (
            "; inverse unclipped (OFT), out-of-range queries counted" * (self.key == "actions")
        )

    def to_json(self, folder):
        return {
            "key": self.key,
            "out": self.out,
            "low": self.low.tolist(),
            "high": self.high.tolist(),
            "mask": self.mask.tolist(),
            "norm_type": self.norm_type,
        }


@register
class ActionTokens(Step):
    """OpenVLA's ActionTokenizer on the first normalised action: token = vocab - digitize."""

    name = "openvla.action_tokens"

    def __init__(self, vocab_size: int = 32000, n_bins: int = 256):
        self.vocab_size, self.n_bins = int(vocab_size), int(n_bins)
        self.bins = np.linspace(-1.0, 1.0, self.n_bins)

    def __call__(self, sample, rng):
        a = sample.get("actions")
        if a is None:
            return sample
        first = np.clip(np.asarray(a, np.float64)[0], -1.0, 1.0)
        ids = self.vocab_size - np.digitize(first, self.bins)
        sample["action_token_ids"] = torch.from_numpy(ids.astype(np.int64))
        return sample

    def describe(self) -> str:
        return f"action tokens: {self.n_bins} bins on [-1, 1], id = {self.vocab_size} - bin"

    def to_json(self, folder):
        return {"vocab_size": self.vocab_size, "n_bins": self.n_bins}


def build_processor(
    *,
    cameras: Sequence[str],
    image_size: int,
    tokenizer,
    max_tokens: int,
    action_stats: dict[str, Any],
    proprio_stats: dict[str, Any] | None,
    norm_type: str,
    variant: str,
    horizon: int,
    crop_area: float = 1.0,
    jitter: Sequence[float] = (0.0, 0.0, 0.0),
    vocab_size: int = 32000,
    gripper_dim: int | None = -1,
    source: str | None = None,
) -> Processor:
    """The family's chain from the statistics of one `dataset_statistics.json` entry."""
    lo, hi = bounds(action_stats, norm_type, "action statistics")
    amask = action_stats.get("mask", [True] * len(lo))
    steps: list[Step] = [
        Images(cameras, image_size, crop_area, jitter),
        Pixels(cameras),
        Prompt(tokenizer, max_tokens, source),
    ]
    if gripper_dim is not None:
        steps.append(Gripper(gripper_dim))
    keys = ["pixel_values", "input_ids", "attention_mask", "actions", "action_mask"]
    if proprio_stats is not None:
        plo, phi = bounds(proprio_stats, norm_type, "proprio statistics")
        pmask = proprio_stats.get("mask", [True] * len(plo))
        steps.append(BoundsNormalize("state", "proprio", plo, phi, pmask, norm_type))
        keys.append("proprio")
    steps.append(BoundsNormalize("actions", "actions", lo, hi, amask, norm_type))
    if variant == "openvla":
        steps.append(ActionTokens(vocab_size))
        keys.append("action_token_ids")
    steps.append(Select(keys))
    # without proprio the model reads no state; the env's 8-d LIBERO state is what it is given
    state_dim = len(plo) if proprio_stats is not None else 8
    return Processor(steps, declared_conventions(cameras, state_dim, len(lo), horizon))


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)

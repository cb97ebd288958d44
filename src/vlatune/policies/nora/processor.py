"""NORA's data rules as pure functions: prompt, labels, action ids, gripper and statistics.

Read from `declare-lab/nora` (`inference/nora.py`, `training/train.py`,
`lerobot_training/lerobot_training.py`, `experiments/libero/run_libero_eval_nora.py`):

- Prompt: Qwen2.5-VL's chat template (the processor's `apply_chat_template`) over one user turn
  `[{"type": "image", resized 224 x 224}, {"type": "text", instruction}]`; at inference with
  `add_generation_prompt=True` (ends in `<|im_start|>assistant\\n`); in training followed by the
  assistant turn whose text is the FAST ids written as `<robot_action_k>` tokens
  (`add_generation_prompt=False`, so the turn ends in `<|im_end|>\\n`). The template adds the
  default system turn ("You are a helpful assistant."). The image is resized with PIL's default
  filter (bicubic for RGB) as `qwen_vl_utils.fetch_image` does for `resized_height/width`; the
  image processor then sees a 224 x 224 image (on NORA's processor: a 16 x 16 patch grid, 64
  image tokens after the 2 x 2 merge). Each `<|image_pad|>` is expanded to that many tokens,
  as Qwen2.5-VL's processor does.
- Labels (`collate_fn`): a copy of the input ids; everything before the first action token
  (id in [base, base + V - 1]) is -100 (a sequence with no action token is all -100); then
  every pad id is -100. So the loss covers the action tokens, `<|im_end|>` and the template's
  trailing newline. Batches are left-padded (`padding_side = 'left'`).
- Decoding (`Nora.inference`): every generated id in the action range, in order, minus the
  base, is one FAST id; FAST decodes them to the normalised (H, 7) chunk.
- Unnormalisation: `0.5 * (a + 1) * (q99 - q01) + q01` on **every** dimension from
  `norm_stats.json[unnorm_key]["action"]`. NORA reads the stats' `mask` and does not use it, so
  the gripper dimension is unnormalised too (with OpenVLA's statistics its q01 / q99 are 0 / 1,
  which maps FAST's gripper value y to (y + 1) / 2). `normalize` (training with NORA's
  statistics) is OpenVLA's RLDS rule, which does honour the mask (the gripper, [0, 1], passes
  through) and clips to [-1, 1].
- Gripper: NORA's pretraining data hold the gripper in [0, 1] with 0 = close, 1 = open; the
  LIBERO env takes -1 = open, +1 = close. NORA's LIBERO evaluation: `2 g - 1`, sign, flip,
  then 0 -> +1; i.e. +1 (close) when g <= 0.5, else -1 (open). `nora_gripper_to_env` is that
  rule; `env_gripper_to_nora` is the inverse NORA's LeRobot training applies (+1 -> 0, -1 -> 1).

    >>> sample = encode_sample(processor, frame, "put the bowl on the plate", fast_ids=[3, 17])
    >>> sample["labels"]   # -100 ... then base+3, base+17, <|im_end|>, "\\n"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlatune.policies.nora.configuration import (
    ACTION_TOKEN,
    IM_END,
    IM_START,
    IMAGE_PAD,
    NORM_STATS,
    VISION_END,
    VISION_START,
    NoraConfig,
)

GRIPPER_OPEN_ENV, GRIPPER_CLOSE_ENV = -1.0, 1.0  # vlatune.conventions (robosuite)
GRIPPER_OPEN_NORA, GRIPPER_CLOSE_NORA = 1.0, 0.0


# ---------------------------------------------------------------------- prompt
def action_text(fast_ids: Sequence[int]) -> str:
    """NORA's `map_fast_token_to_vlm_action`: FAST id k -> the text `<robot_action_k>`."""
    return "".join(ACTION_TOKEN.format(int(k)) for k in fast_ids)


def resize_image(image: Any, size: int = 224):
    """A uint8 (H, W, 3) array or PIL image -> RGB PIL image of size x size (PIL's default
    filter, as qwen_vl_utils' `fetch_image` with resized_height / resized_width)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"NORA expects a uint8 (H, W, 3) image; got dtype {arr.dtype}, shape {arr.shape}"
            )
        image = Image.fromarray(arr)
    return image.convert("RGB").resize((size, size))


def build_messages(
    image: Any, instruction: str, fast_ids: Sequence[int] | None = None, image_size: int = 224
) -> list[dict]:
    """NORA's chat messages: the user turn (image at image_size^2, instruction) and, with
    fast_ids, the assistant turn holding the action tokens."""
    messages = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "image": image,
                    "resized_height": image_size,
                    "resized_width": image_size,
                },
                {"type": "text", "text": instruction},
            ],
        }
    ]
    if fast_ids is not None:
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": action_text(fast_ids)}]}
        )
    return messages


def qwen_template(
    instruction: str, fast_ids: Sequence[int] | None, system: str = "You are a helpful assistant."
) -> str:
    """Qwen2.5-VL's chat template written out for NORA's messages (one image placeholder)."""
    text = (
        f"{IM_START}system\n{system}{IM_END}\n"
        f"{IM_START}user\n{VISION_START}{IMAGE_PAD}{VISION_END}{instruction}{IM_END}\n"
    )
    if fast_ids is None:
        return text + f"{IM_START}assistant\n"
    return text + f"{IM_START}assistant\n{action_text(fast_ids)}{IM_END}\n"


def build_prompt(
    tokenizer,
    instruction: str,
    fast_ids: Sequence[int] | None = None,
    image_tokens: int = 1,
    cfg: NoraConfig | None = None,
) -> str:
    """The text NORA tokenizes: the tokenizer's own chat template when it has one (what NORA's
    `processor.apply_chat_template` uses), else Qwen2.5-VL's written out; the one
    `<|image_pad|>` expanded to `image_tokens` copies (the processor's expansion)."""
    cfg = cfg or NoraConfig()
    if getattr(tokenizer, "chat_template", None):
        msgs = build_messages(None, instruction, fast_ids, cfg.image_size)
        msgs[0]["content"][0] = {"type": "image"}
        text = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=fast_ids is None
        )
    else:
        text = qwen_template(instruction, fast_ids, cfg.system)
    if text.count(IMAGE_PAD) != 1:
        raise ValueError(
            f"NORA's prompt must hold one {IMAGE_PAD}; the chat template produced "
            f"{text.count(IMAGE_PAD)}"
        )
    return text.replace(IMAGE_PAD, IMAGE_PAD * int(image_tokens))


# ---------------------------------------------------------------------- ids and labels
def action_ids_to_token_ids(fast_ids: Sequence[int], cfg: NoraConfig | None = None) -> list[int]:
    """FAST id k -> vocabulary id base + k (151665 + k on NORA); ids outside [0, V) refused."""
    cfg = cfg or NoraConfig()
    out = []
    for k in fast_ids:
        k = int(k)
        if not 0 <= k < cfg.action_vocab:
            raise ValueError(
                f"FAST id {k} is outside NORA's action vocabulary 0..{cfg.action_vocab - 1}"
            )
        out.append(cfg.action_base + k)
    return out


def token_ids_to_action_ids(token_ids: Sequence[int], cfg: NoraConfig | None = None) -> list[int]:
    """NORA's decoding: every id in [base, base + V - 1], in order, minus base (other ids,
    `<|im_end|>` included, are skipped)."""
    cfg = cfg or NoraConfig()
    ids = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
    return [t - cfg.action_base for t in ids if cfg.action_base <= t <= cfg.action_token_max]


def nora_labels(input_ids: torch.Tensor, pad_id: int | None, cfg: NoraConfig | None = None):
    """NORA's `collate_fn` label rule on (B, T) or (T,) ids."""
    cfg = cfg or NoraConfig()
    labels = input_ids.clone()
    rows = labels.view(-1, labels.shape[-1])
    for seq in rows:
        is_action = (seq >= cfg.action_base) & (seq <= cfg.action_token_max)
        hits = torch.nonzero(is_action, as_tuple=False)
        if hits.numel() > 0:
            seq[: int(hits[0])] = -100
        else:
            seq[:] = -100
    if pad_id is not None:
        labels[labels == pad_id] = -100
    return labels


def _parts(tok_or_proc, image_processor=None):
    tokenizer = getattr(tok_or_proc, "tokenizer", tok_or_proc)
    ip = image_processor or getattr(tok_or_proc, "image_processor", None)
    if ip is None:
        raise ValueError(
            "encode_sample needs the Qwen2.5-VL image processor: pass a processor (with "
            ".tokenizer and .image_processor) or image_processor="
        )
    return tokenizer, ip


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    return int(pid if pid is not None else tokenizer.eos_token_id)


def encode_sample(
    tokenizer_or_processor,
    image: Any,
    instruction: str,
    fast_ids: Sequence[int] | None = None,
    cfg: NoraConfig | None = None,
    image_processor=None,
) -> dict[str, torch.Tensor]:
    """One NORA sample: input_ids (T,), attention_mask (T,), pixel_values (patches, dim),
    image_grid_thw (1, 3) and, with fast_ids (training), labels (T,) by NORA's rule. Without
    fast_ids: the inference prompt (ending in the assistant header), no labels."""
    cfg = cfg or NoraConfig()
    tokenizer, ip = _parts(tokenizer_or_processor, image_processor)
    pil = resize_image(image, cfg.image_size)
    vision = ip(images=[pil], return_tensors="pt")
    grid = vision["image_grid_thw"]
    merge = int(getattr(ip, "merge_size", 2))
    n_tokens = int(grid.prod(-1).sum()) // merge**2
    text = build_prompt(tokenizer, instruction, fast_ids, n_tokens, cfg)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": grid,
    }
    if fast_ids is not None:
        expect = action_ids_to_token_ids(fast_ids, cfg)
        got = [int(t) for t in ids if cfg.action_base <= int(t) <= cfg.action_token_max]
        if got != expect:
            raise ValueError(
                f"the tokenizer does not map <robot_action_k> to {cfg.action_base} + k "
                f"(expected {expect[:4]}..., got {got[:4]}...): not a NORA tokenizer for this "
                "config's action_base"
            )
        out["labels"] = nora_labels(ids, pad_id_of(tokenizer), cfg)
    return out


def collate(samples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad samples (NORA's padding side): pad ids, attention 0, labels -100; vision
    inputs concatenated in sample order."""
    T = max(int(s["input_ids"].shape[0]) for s in samples)
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    with_labels = all("labels" in s for s in samples)
    if with_labels:
        out["labels"] = []
    for s in samples:
        n = T - int(s["input_ids"].shape[0])
        out["input_ids"].append(torch.cat([s["input_ids"].new_full((n,), pad_id), s["input_ids"]]))
        out["attention_mask"].append(
            torch.cat([s["attention_mask"].new_zeros(n), s["attention_mask"]])
        )
        if with_labels:
            out["labels"].append(torch.cat([s["labels"].new_full((n,), -100), s["labels"]]))
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return batch


# ---------------------------------------------------------------------- gripper
def nora_gripper_to_env(values: Any) -> np.ndarray:
    """NORA's gripper ([0, 1], 0 = close, 1 = open; after unnormalisation) -> LIBERO env
    (-1 = open, +1 = close), NORA's LIBERO rule: `sign(2 g - 1)`, flipped, 0 -> +1; i.e.
    -1 (open) when g > 0.5, else +1 (close)."""
    g = np.asarray(values, dtype=np.float64)
    return np.where(g > 0.5, GRIPPER_OPEN_ENV, GRIPPER_CLOSE_ENV)


def env_gripper_to_nora(values: Any) -> np.ndarray:
    """LIBERO env gripper (-1 = open, +1 = close) -> NORA's [0, 1] (0 = close, 1 = open), the
    inverse NORA's LeRobot training applies (`inverse_transform_gripper_action`: +1 -> 0,
    -1 -> 1). NORA maps every value but exactly +1 to 1; here every value > 0 is close: the
    same on LIBERO's actions, which are exactly -1 / +1."""
    e = np.asarray(values, dtype=np.float64)
    return np.where(e > 0, GRIPPER_CLOSE_NORA, GRIPPER_OPEN_NORA)


def chunk_to_env(chunk: Any) -> np.ndarray:
    """An unnormalised NORA chunk (..., 7) -> env units: the last dimension through
    `nora_gripper_to_env`, the others unchanged."""
    out = np.array(chunk, dtype=np.float64, copy=True)
    out[..., -1] = nora_gripper_to_env(out[..., -1])
    return out


# ---------------------------------------------------------------------- statistics
def load_norm_stats(path: str | Path) -> dict[str, Any]:
    """NORA's `norm_stats.json` (a file, or a folder holding it): {dataset key: {"action":
    {"q01": [...], "q99": [...], "mask"?: [...], ...}, ...}}; each key's action stats are checked."""
    path = Path(path)
    if path.is_dir():
        path = path / NORM_STATS
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: NORA's norm_stats.json is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{path}: expected a JSON object {{dataset key: {{'action': ...}}}}")
    for key, entry in stats.items():
        action = entry.get("action") if isinstance(entry, dict) else None
        if not isinstance(action, dict) or "q01" not in action or "q99" not in action:
            raise ValueError(f"{path}: key {key!r} lacks action.q01 / action.q99")
        if len(action["q01"]) != len(action["q99"]):
            raise ValueError(f"{path}: key {key!r}: q01 and q99 differ in length")
    return stats


def action_stats(norm_stats: dict[str, Any], unnorm_key: str | None = None) -> dict[str, Any]:
    """NORA's `get_action_stats`: with one dataset key, unnorm_key may be None."""
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(
                f"norm_stats.json holds {len(norm_stats)} datasets: pass unnorm_key, one of "
                f"{sorted(norm_stats)}"
            )
        unnorm_key = next(iter(norm_stats))
    if unnorm_key not in norm_stats:
        raise KeyError(f"unnorm_key {unnorm_key!r} is not in norm_stats.json: {sorted(norm_stats)}")
    return norm_stats[unnorm_key]["action"]


def unnormalize(actions: Any, stats: dict[str, Any]) -> np.ndarray:
    """NORA's unnormalisation: 0.5 (a + 1) (q99 - q01) + q01 on every dimension (the stats'
    `mask` is ignored, as NORA ignores it)."""
    a = np.asarray(actions, dtype=np.float64)
    high, low = np.asarray(stats["q99"], np.float64), np.asarray(stats["q01"], np.float64)
    if a.shape[-1] != low.shape[0]:
        raise ValueError(f"actions have {a.shape[-1]} dims, norm stats {low.shape[0]}")
    return 0.5 * (a + 1) * (high - low) + low


def normalize(actions: Any, stats: dict[str, Any]) -> np.ndarray:
    """OpenVLA's RLDS q99 normalisation NORA trained on: clip(2 (x - q01) / (q99 - q01 + 1e-8)
    - 1, -1, 1) where `mask` is true (default: everywhere), unchanged elsewhere; dimensions
    whose min == max (when given) become 0."""
    x = np.asarray(actions, dtype=np.float64)
    high, low = np.asarray(stats["q99"], np.float64), np.asarray(stats["q01"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    y = np.where(mask, np.clip(2 * (x - low) / (high - low + 1e-8) - 1, -1, 1), x)
    if "min" in stats and "max" in stats:
        y = np.where(np.asarray(stats["min"]) == np.asarray(stats["max"]), 0.0, y)
    return y


# ====================================================================== processor steps
# The chain `vlatune train` / `vlatune eval` run on every frame (vlatune.policies.processor):
#   nora.gripper   env gripper (-1 open / +1 close) -> NORA's [0, 1] (1 = open); inverse back
#   nora.normalize OpenVLA's q01 / q99 rule (gripper passes through); inverse NORA's unnorm.
#   nora.encode    the 224 x 224 image and the chat-template prompt (ids left-padded to a fixed
#                  length, so vlatune's default collate stacks samples) and, in training, the
#                  FAST+ ids of the normalised chunk as `<robot_action_k>` + `<|im_end|>\n`
#                  (`target_ids`, right-padded). The model joins prompt and target per sample
#                  and re-pads to the batch's longest, which is NORA's left-padded batch.
#   select         the model's keys.
# Training and evaluation run the same prompt through the same code, so the two paths give
# identical `input_ids` / `pixel_values` (tests/test_nora_recipes.py).
from vlatune.policies.processor import (  # noqa: E402
    Processor,
    Select,
    Step,
    declared_conventions,
    register,
)

SAMPLE_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "target_ids",
    "target_mask",
)
FOLDER_TOKENIZER = "."  # the HF tokenizer + image processor sit at the policy folder's root


def _dim(gripper_dim: int | None, n: int) -> int | None:
    if gripper_dim is None:
        return None
    g = int(gripper_dim)
    return g + n if g < 0 else g


@register
class GripperStep(Step):
    """The env's gripper (-1 open / +1 close) -> NORA's [0, 1] with 1 = open, 0 = close
    (`vlatune.conventions.gripper_from_env` with MODEL_GRIPPER["nora"], NORA's LeRobot training
    rule); `inverse`: `gripper_to_env`, -1 (open) where g > 0.5, else +1 (close): NORA's LIBERO
    evaluation rule (`nora_gripper_to_env`)."""

    name = "nora.gripper"

    def __init__(self, gripper_dim: int = -1):
        self.gripper_dim = int(gripper_dim)

    def __call__(self, sample, rng):
        from vlatune.conventions import MODEL_GRIPPER, gripper_from_env

        a = sample.get("actions")
        if a is None:
            return sample
        a = np.array(a, dtype=np.float64, copy=True)
        a[..., self.gripper_dim] = gripper_from_env(a[..., self.gripper_dim], MODEL_GRIPPER["nora"])
        sample["actions"] = a
        return sample

    def inverse(self, chunk):
        from vlatune.conventions import MODEL_GRIPPER, gripper_to_env

        out = np.array(chunk, dtype=np.float64, copy=True)
        out[..., self.gripper_dim] = gripper_to_env(
            out[..., self.gripper_dim], MODEL_GRIPPER["nora"]
        )
        return out

    def describe(self) -> str:
        return (
            f"gripper (dim {self.gripper_dim}): env -1 open / +1 close -> NORA's 1 open / 0 close; "
            "inverse: open where g > 0.5, else close"
        )

    def to_json(self, folder):
        return {"gripper_dim": self.gripper_dim}


@register
class NormalizeStep(Step):
    """`actions` through NORA's training normalisation (`normalize`: OpenVLA's q01 / q99 rule,
    clipped to [-1, 1], the `mask`ed-out gripper passed through); `inverse`: NORA's
    `unnormalize` on every dimension (no clipping, the mask ignored, as NORA). `stats`: the
    action entry of NORA's `norm_stats.json` (`source` says whether it is NORA's or the
    dataset's)."""

    name = "nora.normalize"

    def __init__(self, stats: dict[str, Any], source: str = "dataset"):
        for k in ("q01", "q99"):
            if k not in stats:
                raise ValueError(f"nora.normalize: the action statistics lack '{k}'")
        self.stats = {k: list(v) for k, v in stats.items()}
        self.source = str(source)

    def __call__(self, sample, rng):
        a = sample.get("actions")
        if a is None:
            return sample
        a = np.asarray(a, dtype=np.float64)
        if a.shape[-1] != len(self.stats["q01"]):
            raise ValueError(
                f"actions have {a.shape[-1]} dims, the policy's statistics {len(self.stats['q01'])}"
            )
        sample["actions"] = normalize(a, self.stats)
        return sample

    def inverse(self, chunk):
        return unnormalize(chunk, self.stats)

    def describe(self) -> str:
        return (
            f"normalise actions with the {self.source}'s q01 / q99 (NORA's rule, gripper passed "
            "through); inverse: 0.5 (a + 1)(q99 - q01) + q01 on every dimension"
        )

    def to_json(self, folder):
        return {"stats": self.stats, "source": self.source}


def _json_safe(cfg: NoraConfig) -> dict[str, Any]:
    return cfg.to_json()


@register
class EncodeStep(Step):
    """NORA's model inputs: the camera's image resized to 224 x 224 through Qwen2.5-VL's image
    processor (`pixel_values` (patches, dim), `image_grid_thw` (1, 3)); the chat-template prompt
    ending in the assistant header, left-padded to `max_prompt_tokens` (`input_ids`,
    `attention_mask`); with `actions` (training): the FAST ids of the normalised chunk as
    `<robot_action_k>` (base + k) then `<|im_end|>` and the newline (`target_ids`, right-padded
    to `max_new_tokens`, `target_mask`). Side files: the HF tokenizer + image processor at the
    folder's root (NORA's layout) and the FAST tokenizer in `fast_tokenizer/`."""

    name = "nora.encode"

    def __init__(
        self,
        tokenizer,
        image_processor,
        fast,
        cfg: NoraConfig,
        camera: str,
        max_prompt_tokens: int = 256,
    ):
        self.tokenizer, self.image_processor, self.fast = tokenizer, image_processor, fast
        self.cfg, self.camera = cfg, str(camera)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.pad_id = pad_id_of(tokenizer)
        self._n_tokens: int | None = None

    def _vision(self, image):
        pil = resize_image(image, self.cfg.image_size)
        vision = self.image_processor(images=[pil], return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = int(getattr(self.image_processor, "merge_size", 2))
        return vision["pixel_values"], grid, int(grid.prod(-1).sum()) // merge**2

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def target_ids(
        self, fast_ids: Sequence[int], n_image_tokens: int, instruction: str
    ) -> list[int]:
        """The assistant turn's ids: NORA's full conversation minus its prompt."""
        prompt = build_prompt(self.tokenizer, instruction, None, n_image_tokens, self.cfg)
        full = build_prompt(self.tokenizer, instruction, fast_ids, n_image_tokens, self.cfg)
        if not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template does not extend the generation prompt with the "
                "assistant turn; NORA's prompt / target split needs it to"
            )
        ids = self._ids(full[len(prompt) :])
        expect = action_ids_to_token_ids(fast_ids, self.cfg)
        got = [t for t in ids if self.cfg.action_base <= t <= self.cfg.action_token_max]
        if got != expect:
            raise ValueError(
                f"the tokenizer does not map <robot_action_k> to {self.cfg.action_base} + k "
                f"(expected {expect[:4]}..., got {got[:4]}...)"
            )
        return ids

    def __call__(self, sample, rng):
        images = sample["images"]
        if self.camera not in images:
            raise KeyError(f"frame lacks camera '{self.camera}' (has {sorted(images)})")
        pixel_values, grid, n = self._vision(images[self.camera])
        instruction = str(sample.get("instruction", ""))
        text = build_prompt(self.tokenizer, instruction, None, n, self.cfg)
        ids = self._ids(text)
        L = self.max_prompt_tokens
        if len(ids) > L:
            raise ValueError(
                f"NORA's prompt has {len(ids)} tokens, more than policy.max_prompt_tokens {L} "
                f"(instruction {instruction[:60]!r}); raise policy.max_prompt_tokens"
            )
        pad = L - len(ids)
        sample["input_ids"] = torch.tensor([self.pad_id] * pad + ids, dtype=torch.long)
        sample["attention_mask"] = torch.tensor([0] * pad + [1] * len(ids), dtype=torch.long)
        sample["pixel_values"] = pixel_values
        sample["image_grid_thw"] = grid
        if sample.get("actions") is not None:
            chunk = np.asarray(sample["actions"], dtype=np.float64)
            if chunk.shape != (self.cfg.horizon, self.cfg.action_dim):
                raise ValueError(
                    f"NORA encodes (horizon {self.cfg.horizon}, {self.cfg.action_dim}) chunks; "
                    f"got {chunk.shape} (data.action_horizon must equal the policy's horizon)"
                )
            target = self.target_ids(self.fast.encode(chunk), n, instruction)
            M = self.cfg.max_new_tokens
            if len(target) > M:
                raise ValueError(
                    f"a chunk's FAST ids + <|im_end|> take {len(target)} tokens, more than "
                    f"policy.max_new_tokens {M}; raise policy.max_new_tokens"
                )
            sample["target_ids"] = torch.tensor(
                target + [self.pad_id] * (M - len(target)), dtype=torch.long
            )
            sample["target_mask"] = torch.tensor(
                [1] * len(target) + [0] * (M - len(target)), dtype=torch.long
            )
        return sample

    def describe(self) -> str:
        return (
            f"NORA: camera {self.camera!r} resized to {self.cfg.image_size}x{self.cfg.image_size}, "
            f"Qwen2.5-VL chat-template prompt (left-padded to {self.max_prompt_tokens}); "
            f"training: FAST ids of the {self.cfg.horizon} x {self.cfg.action_dim} chunk as "
            f"<robot_action_k> = {self.cfg.action_base} + k, then <|im_end|>\\n"
        )

    def to_json(self, folder):
        from vlatune.policies.nora.configuration import FAST_FOLDER

        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        self.fast.save(folder / FAST_FOLDER)
        return {
            "tokenizer": FOLDER_TOKENIZER,
            "fast_tokenizer": FAST_FOLDER,
            "config": _json_safe(self.cfg),
            "camera": self.camera,
            "max_prompt_tokens": self.max_prompt_tokens,
        }

    @classmethod
    def from_json(cls, d, folder):
        from transformers import AutoImageProcessor, AutoTokenizer

        from vlatune.policies.tokenizers.fast import FastTokenizer

        folder = Path(folder)
        tok_dir = folder / d.get("tokenizer", FOLDER_TOKENIZER)
        fast_dir = folder / d["fast_tokenizer"]
        for path, what in ((tok_dir / "tokenizer_config.json", "HF tokenizer"), (fast_dir, "FAST")):
            if not path.exists():
                raise FileNotFoundError(f"{folder}: nora.encode needs the {what} at {path}")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        tokenizer.padding_side = "left"
        image_processor = AutoImageProcessor.from_pretrained(tok_dir, backend="pil")
        cfg = NoraConfig.from_json(d["config"], f"{folder}/processor.json")
        return cls(
            tokenizer,
            image_processor,
            FastTokenizer.from_pretrained(fast_dir),
            cfg,
            d["camera"],
            d.get("max_prompt_tokens", 256),
        )


def stats_entry(stats: dict[str, Any], gripper_dim: int | None) -> dict[str, Any]:
    """vlatune's dataset statistics (env units) -> NORA's action entry: q01 / q99 (+ min / max
    / mean / std) with the gripper dimension masked out (NORA's normalisation passes its [0, 1]
    value through) and its q01 / q99 set to -1 / 1, so NORA's unnormalisation (which ignores
    the mask) is the identity on it and the 0.5 threshold of the gripper rule sits halfway
    between the targets 0 (close) and 1 (open). NORA's own statistics hold 0 / 1 there, which
    maps a predicted 0 to exactly 0.5: any FAST rounding error then decides open or close
    (benchmarks/fast_roundtrip.py counts it)."""
    if "action" not in stats:
        raise ValueError("training statistics: key 'action' missing")
    act = {
        k: [float(x) for x in stats["action"][k]]
        for k in ("q01", "q99", "min", "max", "mean", "std")
        if k in stats["action"]
    }
    n = len(act["q01"])
    mask = [True] * n
    g = _dim(gripper_dim, n)
    if g is not None:
        mask[g] = False
        for k, v in (("q01", -1.0), ("q99", 1.0), ("min", -1.0), ("max", 1.0)):
            if k in act:
                act[k][g] = v
        act.pop("mean", None), act.pop("std", None)
    act["mask"] = mask
    return act


def build_processor(
    tokenizer,
    image_processor,
    fast,
    cfg: NoraConfig,
    action_stats: dict[str, Any],
    camera: str,
    gripper_dim: int | None = -1,
    max_prompt_tokens: int = 256,
    stats_source: str = "dataset",
) -> Processor:
    """NORA's chain: gripper -> normalise -> encode -> select; conventions for the LIBERO env
    (NORA reads no state: the env's 8-d state is what it is given)."""
    steps: list[Step] = []
    g = _dim(gripper_dim, len(action_stats["q01"]))
    if g is not None:
        steps.append(GripperStep(g))
    steps += [
        NormalizeStep(action_stats, stats_source),
        EncodeStep(tokenizer, image_processor, fast, cfg, camera, max_prompt_tokens),
        Select(list(SAMPLE_KEYS)),
    ]
    conventions = declared_conventions([camera], 8, len(action_stats["q01"]), cfg.horizon)
    return Processor(steps, conventions)


def join_batch(batch: dict[str, Any], pad_id: int, cfg: NoraConfig, with_labels: bool):
    """A processor batch (fixed-length prompts, `target_ids` in training) -> NORA's batch:
    per sample the prompt's ids then, with labels, its target ids; left-padded to the longest
    (`collate`), labels by NORA's rule (`nora_labels`); vision inputs flattened as Qwen2.5-VL
    takes them."""
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    pv = batch["pixel_values"]
    grid = batch["image_grid_thw"]
    if pv.dim() == 3:
        pv = pv.reshape(-1, pv.shape[-1])
    if grid.dim() == 3:
        grid = grid.reshape(-1, grid.shape[-1])
    samples = []
    for b in range(ids.shape[0]):
        seq = ids[b][am[b]]
        if with_labels:
            tm = batch["target_mask"][b].bool()
            seq = torch.cat([seq, batch["target_ids"][b][tm].to(seq.dtype)])
        s = {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if with_labels:
            s["labels"] = nora_labels(seq, pad_id, cfg)
        samples.append(s)
    T = max(int(s["input_ids"].shape[0]) for s in samples)
    out: dict[str, Any] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
        if key in samples[0]:
            out[key] = torch.stack(
                [torch.cat([s[key].new_full((T - len(s[key]),), fill), s[key]]) for s in samples]
            )
    out["pixel_values"], out["image_grid_thw"] = pv, grid
    return out

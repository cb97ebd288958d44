"""GR00T N1.5 input / output conventions as plain tensor functions (the processor chain's pieces).

Follows LeRobot 0.5.1's Groot processor (`processor_groot.py`: `GrootPackInputsStep`,
`GrootActionUnpackUnnormalizeStep`) and the Eagle 2.5 fast image processor with one tile and no
thumbnail (as LeRobot's collate calls it):
- images: uint8 (N, H, W, 3) -> bicubic (antialiased) resize to the model's image size (224 px in
  the release), x / 255, then (x - 0.5) / 0.5 (Eagle's `IMAGENET_STANDARD_MEAN / STD`) -> float
  (N, 3, S, S) in [-1, 1];
- state / action: min-max to [-1, 1] with the dataset statistics (0 where max == min) before
  padding; state (B, D) -> (B, 1, max_state_dim) + mask; action (B, T, D) -> (B, action_horizon,
  action_dim) (a short chunk repeats its last step) + 0/1 mask; predictions are cut back to the
  environment's D and un-normalised (min where max == min);
- embodiment id 31 (`new_embodiment`) unless told otherwise.

The processor chain (`vlatune.policies.processor`) runs these functions on one frame:
`build_processor` gives images (crop / jitter in training) -> `groot.minmax` (state, actions) ->
`groot.eagle` (pixels + the prompt with `<IMG_CONTEXT>` tokens, from the Eagle tokenizer
folder) -> `groot.pack` (padding, masks, embodiment id); `model_batch` turns a collated batch
into GR00T's model batch.

    >>> state, state_mask = pad_state(min_max_normalize(raw_state, stats["observation.state"]), 64)
    >>> env_actions = min_max_unnormalize(unpad_actions(pred, 7), stats["action"])
    >>> proc = build_processor(cams, 224, cfg, "eagle2hg-processor-groot-n1p5", a_stats, s_stats,
    ...                        horizon=10)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from vlatune.policies.groot.configuration import DEFAULT_EMBODIMENT_ID
from vlatune.policies.processor import Step, register

EAGLE_MEAN = (0.5, 0.5, 0.5)
EAGLE_STD = (0.5, 0.5, 0.5)


def preprocess_images(images: Tensor, size: int) -> Tensor:
    """uint8 (N, H, W, 3) or (N, 3, H, W) -> float32 (N, 3, size, size), Eagle-normalised."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3) or (N, 3, H, W), got {tuple(images.shape)}")
    x = images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"images need 3 channels, got shape {tuple(images.shape)}")
    x = x.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0, 255)
    x = x / 255.0
    mean = torch.tensor(EAGLE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(EAGLE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _stat(stats: dict, key: str, d: int, like: Tensor) -> Tensor:
    if key not in stats:
        raise KeyError(f"statistics lack `{key}` (need `min` and `max` per dimension)")
    v = torch.as_tensor(stats[key], dtype=like.dtype, device=like.device).flatten()
    if v.numel() != d:
        raise ValueError(f"statistics `{key}` has {v.numel()} values, the data has {d} dimensions")
    return v


def min_max_normalize(x: Tensor, stats: dict) -> Tensor:
    """2 (x - min) / (max - min) - 1 per last dimension; 0 where max == min (LeRobot's Groot)."""
    d = x.shape[-1]
    lo, hi = _stat(stats, "min", d, x), _stat(stats, "max", d, x)
    denom = hi - lo
    ok = denom != 0
    y = 2 * (x - lo) / torch.where(ok, denom, torch.ones_like(denom)) - 1
    return torch.where(ok, y, torch.zeros_like(y))


def min_max_unnormalize(y: Tensor, stats: dict) -> Tensor:
    """Inverse of `min_max_normalize`; min where max == min."""
    d = y.shape[-1]
    lo, hi = _stat(stats, "min", d, y), _stat(stats, "max", d, y)
    denom = hi - lo
    ok = denom != 0
    x = (y + 1.0) * 0.5 * torch.where(ok, denom, torch.ones_like(denom)) + lo
    return torch.where(ok, x, lo.expand_as(x))


def pad_state(state: Tensor, max_state_dim: int) -> tuple[Tensor, Tensor]:
    """(B, D) -> state (B, 1, max_state_dim) zero-padded, mask (B, 1, max_state_dim) bool."""
    if state.ndim != 2:
        raise ValueError(f"state must be (B, D), got {tuple(state.shape)}")
    b, d = state.shape
    if d > max_state_dim:
        raise ValueError(f"state has {d} dimensions, more than max_state_dim = {max_state_dim}")
    out = state.new_zeros(b, 1, max_state_dim)
    out[:, 0, :d] = state
    mask = torch.zeros(b, 1, max_state_dim, dtype=torch.bool, device=state.device)
    mask[:, :, :d] = True
    return out, mask


def pad_actions(actions: Tensor, horizon: int, action_dim: int) -> tuple[Tensor, Tensor]:
    """(B, T, D) -> actions (B, horizon, action_dim), mask float 0/1 of the same shape.

    A chunk shorter than `horizon` repeats its last step (LeRobot's Groot); a longer one is cut."""
    if actions.ndim != 3:
        raise ValueError(f"actions must be (B, T, D), got {tuple(actions.shape)}")
    b, t, d = actions.shape
    if d > action_dim:
        raise ValueError(f"actions have {d} dimensions, more than action_dim = {action_dim}")
    if t < horizon:
        actions = torch.cat([actions, actions[:, -1:].expand(b, horizon - t, d)], dim=1)
    actions = actions[:, :horizon]
    out = actions.new_zeros(b, horizon, action_dim)
    out[:, :, :d] = actions
    mask = torch.zeros(b, horizon, action_dim, dtype=torch.float32, device=actions.device)
    mask[:, :, :d] = 1.0
    return out, mask


def unpad_actions(pred: Tensor, env_dim: int) -> Tensor:
    """(B, H, action_dim) -> (B, H, env_dim): the environment's columns of the padded chunk."""
    if pred.shape[-1] < env_dim:
        raise ValueError(f"predictions have {pred.shape[-1]} columns, fewer than {env_dim}")
    return pred[..., :env_dim]


def embodiment_ids(batch_size: int, embodiment_id: int = DEFAULT_EMBODIMENT_ID) -> Tensor:
    return torch.full((batch_size,), int(embodiment_id), dtype=torch.long)


# ------------------------------------------------------------------------------ processor chain
# The steps below run the functions above on one frame (`vlatune.policies.processor`): the
# training loader and `predict` both call them, so the two paths give the same model inputs.

IMG_CONTEXT = "<IMG_CONTEXT>"
SYSTEM_PROMPT = "You are a helpful assistant."


def _as_stats(stats: dict, key: str) -> dict[str, list[float]]:
    if "min" not in stats or "max" not in stats:
        raise KeyError(f"statistics of `{key}` lack `min` / `max` (GR00T normalises min-max)")
    return {"min": [float(v) for v in stats["min"]], "max": [float(v) for v in stats["max"]]}


@register
class MinMax(Step):
    """`key` ("state" / "actions", env units) -> min-max [-1, 1] float32 (GR00T's
    `min_max_normalize`). For actions, `inverse` un-normalises predicted chunks and, with
    `gripper_dim`, makes the gripper command its sign (-1 open / +1 close).

    Predictions outside the training range are *not* clipped: neither NVIDIA's
    (`gr00t/data/transform/state_action.py`, `Normalizer.inverse`, mode "min_max") nor
    LeRobot 0.5.1's (`processor_groot.py`, `GrootActionUnpackUnnormalizeStep`) inverse clips.
    They are counted: a query whose chunk leaves [-1, 1] by more than `RANGE_TOLERANCE` on a
    non-gripper dimension with max > min adds one to the counter `out_of_range_actions`
    (`counters()`, so `policy.fallbacks()` and the evaluation report show it)."""

    name = "groot.minmax"
    RANGE_TOLERANCE = 0.01

    def __init__(self, key: str, stats: dict, gripper_dim: int | None = None):
        if key not in ("state", "actions"):
            raise ValueError(f"groot.minmax: key must be 'state' or 'actions', got {key!r}")
        self.key, self.stats, self.gripper_dim = key, _as_stats(stats, key), gripper_dim
        self.dim = len(self.stats["min"])
        self.out_of_range = 0

    def __call__(self, sample, rng):
        x = sample.get(self.key)
        if x is None:
            return sample
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"{self.key} has {x.shape[-1]} dims, the policy's statistics have {self.dim}"
            )
        sample[self.key] = min_max_normalize(x, self.stats).float()
        return sample

    def inverse(self, chunk):
        if self.key != "actions":
            return chunk
        chunk = np.asarray(chunk)
        self.out_of_range += self._count_out_of_range(chunk)
        out = min_max_unnormalize(torch.as_tensor(chunk, dtype=torch.float64), self.stats)
        out = out.numpy()
        if self.gripper_dim is not None:
            g = self.gripper_dim
            out[..., g] = np.where(np.asarray(chunk)[..., g] > 0, 1.0, -1.0)
        return out

    def _count_out_of_range(self, chunk: np.ndarray) -> int:
        """Queries (rows of a (B, H, D) chunk, or one (H, D) chunk) beyond the range."""
        lo, hi = np.asarray(self.stats["min"]), np.asarray(self.stats["max"])
        used = hi > lo
        if self.gripper_dim is not None:
            used[self.gripper_dim] = False
        rows = chunk[None] if chunk.ndim == 2 else chunk
        outside = np.abs(rows[..., used]) > 1.0 + self.RANGE_TOLERANCE
        return int(outside.reshape(len(rows), -1).any(axis=1).sum())

    def counters(self):
        return {"out_of_range_actions": self.out_of_range} if self.key == "actions" else {}

    def describe(self):
        grip = f", gripper dim {self.gripper_dim} -> sign" if self.gripper_dim is not None else ""
        return f"min-max {self.key} to [-1, 1] ({self.dim} dims{grip}); inverse on actions"

    def to_json(self, folder):
        return {"key": self.key, "stats": self.stats, "gripper_dim": self.gripper_dim}


@register
class Eagle(Step):
    """Images and instruction -> Eagle inputs: `eagle_pixel_values` (n_cameras, 3, S, S)
    float32 (`preprocess_images`: bicubic to the model's S, (x/255 - 0.5) / 0.5) and
    `eagle_input_ids` from the prompt: the user turn holds one `<image-k>` per camera and the
    instruction as GR00T writes it (`str([instruction])`); each `<image-k>` becomes
    `<image k><img>` + `<IMG_CONTEXT>` x tokens_per_image + `</img>` (Eagle 2.5's processor,
    one tile, no thumbnail) under the Eagle processor's chat template (`prompt`: system line
    "You are a helpful assistant.", where the template comes from). The ids are left-padded to
    the fixed `max_length` (image tokens + `max_text_tokens`) with `eagle_attention_mask` (L,),
    so any collate stacks them; the policy cuts a batch back to its longest prompt. Left, as
    GR00T pads a batch (`padding_side = "left"`: Isaac-GR00T `gr00t/model/transforms.py`,
    LeRobot 0.5.1 `processor_groot.py`): the prompts of a batch end at the same column. A
    longer prompt is an error."""

    name = "groot.eagle"

    def __init__(
        self,
        cameras,
        image_size: int,
        tokens_per_image: int,
        image_token_id: int,
        tokenizer_dir: str | Path,
        max_text_tokens: int = 96,
    ):
        from transformers import AutoTokenizer

        self.cameras, self.image_size = list(cameras), int(image_size)
        self.tokens_per_image, self.image_token_id = int(tokens_per_image), int(image_token_id)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.max_text_tokens = int(max_text_tokens)
        self.max_length = self.tokens_per_image * len(self.cameras) + self.max_text_tokens
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
            raise FileNotFoundError(
                f"{self.tokenizer_dir}: cannot load the Eagle tokenizer ({e}); pass "
                "policy.tokenizer = the Eagle 2.5 processor folder (tokenizer.json with "
                f"{IMG_CONTEXT})"
            ) from None
        got = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if got != self.image_token_id:
            raise ValueError(
                f"{self.tokenizer_dir}: {IMG_CONTEXT} has id {got}, the model's "
                f"eagle_config.json image_token_index is {self.image_token_id}"
            )
        self.pad_id = int(self.tokenizer.pad_token_id or 0)

    def prompt(self, instruction: str) -> str:
        """The text GR00T N1.5 feeds the Eagle tokenizer for one frame.

        Source: the Eagle 2.5 *processor's* chat template, `chat_template.json` of
        `gr00t/model/backbone/eagle2_hg_model/` (NVIDIA Isaac-GR00T N1.5; the same file is in
        LeRobot's `lerobot/eagle2hg-processor-groot-n1p5` folder), applied by
        `GrootEagleEncodeStep` (lerobot 0.5.1 `policies/groot/processor_groot.py`) to
        `[{"role": "user", "content": [image x n_cameras, {"text": str([instruction])}]}]` with
        `add_generation_prompt=True` and no `add_vision_id`: a first message that is not a
        system one gets the system line "You are a helpful assistant.", each image becomes
        `<image-k>`, then `Eagle2_5_VLProcessor.replace_media_placeholder` expands `<image-k>`
        to `<image k><img>` + `<IMG_CONTEXT>` x tokens + `</img>`. The instruction is used as
        given (LeRobot's `formalize_language` is off: no lowercasing). The tokenizer's own
        `chat_template` (Qwen3's, in tokenizer_config.json) is *not* the one GR00T uses, so it
        is ignored here."""
        marks = "".join(f"<image-{i + 1}>" for i in range(len(self.cameras)))
        rendered = (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            f"{marks}{str([instruction])}<|im_end|>\n<|im_start|>assistant\n"
        )
        n = len(re.findall(r"<image-(\d+)>", rendered))
        if n != len(self.cameras):
            raise ValueError(
                f"{self.tokenizer_dir}: the chat template gave {n} <image-k> placeholders "
                f"for {len(self.cameras)} cameras"
            )
        fill = IMG_CONTEXT * self.tokens_per_image
        return re.sub(
            r"<image-(\d+)>", lambda m: f"<image {m.group(1)}><img>{fill}</img>", rendered
        )

    def __call__(self, sample, rng):
        images = sample.pop("images")
        stack = torch.stack([torch.as_tensor(images[c]) for c in self.cameras])
        sample["eagle_pixel_values"] = preprocess_images(stack, self.image_size)
        text = self.prompt(str(sample.get("instruction", "")))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        n_img = int((ids == self.image_token_id).sum())
        if n_img != self.tokens_per_image * len(self.cameras):
            raise ValueError(
                f"{self.tokenizer_dir}: the prompt tokenised to {n_img} image tokens, "
                f"expected {self.tokens_per_image} x {len(self.cameras)} cameras"
            )
        if len(ids) > self.max_length:
            raise ValueError(
                f"the GR00T prompt has {len(ids)} tokens, more than max_length {self.max_length} "
                f"(image tokens + max_text_tokens {self.max_text_tokens}); instruction: "
                f"{sample.get('instruction')!r}"
            )
        padded = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        mask = torch.zeros(self.max_length, dtype=torch.long)
        padded[self.max_length - len(ids) :], mask[self.max_length - len(ids) :] = ids, 1
        sample["eagle_input_ids"], sample["eagle_attention_mask"] = padded, mask
        return sample

    def describe(self):
        return (
            f"Eagle inputs: {len(self.cameras)} images bicubic to {self.image_size} px, "
            f"(x/255 - 0.5)/0.5; prompt with {self.tokens_per_image} <IMG_CONTEXT> per image"
        )

    def to_json(self, folder):
        folder = Path(folder)
        out = folder / "tokenizer"
        if out.resolve() != self.tokenizer_dir.resolve():
            self.tokenizer.save_pretrained(str(out))
        return {
            "cameras": self.cameras,
            "image_size": self.image_size,
            "tokens_per_image": self.tokens_per_image,
            "image_token_id": self.image_token_id,
            "tokenizer_dir": "tokenizer",
            "max_text_tokens": self.max_text_tokens,
        }

    @classmethod
    def from_json(cls, d, folder):
        d = dict(d)
        d["tokenizer_dir"] = Path(folder) / d["tokenizer_dir"]
        return cls(**d)


@register
class Pack(Step):
    """Normalised state / actions -> GR00T's padded tensors: `state` (1, max_state_dim) +
    `state_mask`, `action` (action_horizon, action_dim) + `action_mask` (0/1 on the real
    dims; steps past the episode end repeat the last action and stay in the loss, as in
    GR00T), `embodiment_id`; keeps only the model's keys. `inverse` cuts predicted chunks
    to the env's `env_action_dim` columns."""

    name = "groot.pack"
    KEEP = ("eagle_pixel_values", "eagle_input_ids", "eagle_attention_mask", "state", "state_mask", "action",
            "action_mask", "embodiment_id")  # fmt: skip

    def __init__(
        self,
        max_state_dim: int,
        action_horizon: int,
        action_dim: int,
        env_action_dim: int,
        embodiment_id: int = 31,
    ):
        self.max_state_dim, self.action_horizon = int(max_state_dim), int(action_horizon)
        self.action_dim, self.env_action_dim = int(action_dim), int(env_action_dim)
        self.embodiment_id = int(embodiment_id)

    def __call__(self, sample, rng):
        state = sample.get("state")
        if state is None:
            state = torch.zeros(0)
        state, mask = pad_state(torch.as_tensor(state).float().view(1, -1), self.max_state_dim)
        sample["state"], sample["state_mask"] = state[0], mask[0]
        actions = sample.pop("actions", None)
        if actions is not None:
            act, amask = pad_actions(
                torch.as_tensor(actions).float()[None], self.action_horizon, self.action_dim
            )
            sample["action"], sample["action_mask"] = act[0], amask[0]
        sample["embodiment_id"] = torch.tensor(self.embodiment_id, dtype=torch.long)
        return {k: v for k, v in sample.items() if k in self.KEEP}

    def inverse(self, chunk):
        return np.asarray(chunk)[..., : self.env_action_dim]

    def describe(self):
        return (
            f"pad state to {self.max_state_dim}, actions to {self.action_horizon} x "
            f"{self.action_dim} (+ masks), embodiment {self.embodiment_id}; predicted "
            f"chunks cut to {self.env_action_dim} dims"
        )

    def to_json(self, folder):
        return {
            "max_state_dim": self.max_state_dim,
            "action_horizon": self.action_horizon,
            "action_dim": self.action_dim,
            "env_action_dim": self.env_action_dim,
            "embodiment_id": self.embodiment_id,
        }


def model_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A collated batch (vlatune's default collate stacks the samples) -> GR00T's model batch:
    `eagle_pixel_values` (B, n_cameras, 3, S, S) -> (B * n_cameras, 3, S, S) in sample order
    (the order the backbone fills the image tokens), the prompts cut to the longest one: the
    columns no sample attends to are removed (left-padded prompts, GR00T's batch padding, lose
    their first columns; a right-padded batch, as recorded fixtures may be, its last ones)."""
    out = dict(batch)
    pix = out["eagle_pixel_values"]
    if pix.ndim == 5:
        out["eagle_pixel_values"] = pix.reshape(-1, *pix.shape[2:])
    mask = out["eagle_attention_mask"]
    used = mask.any(dim=0).nonzero()
    lo, hi = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, mask.shape[1])
    out["eagle_input_ids"] = out["eagle_input_ids"][:, lo:hi]
    out["eagle_attention_mask"] = mask[:, lo:hi]
    return out


def build_processor(
    cameras,
    image_size: int,
    model_cfg,
    tokenizer_dir,
    action_stats: dict,
    state_stats: dict | None,
    *,
    horizon: int,
    crop_area: float = 1.0,
    jitter=(0.0, 0.0, 0.0),
    camera_dropout: float = 0.0,
    min_cameras: int = 1,
    gripper_dim: int | None = -1,
    embodiment_id: int = DEFAULT_EMBODIMENT_ID,
):
    """The GR00T chain: images (crop / jitter in training) -> min-max state and actions ->
    Eagle pixels + prompt -> padding, masks and embodiment id."""
    from vlatune.policies.processor import Images, Processor, declared_conventions

    h = model_cfg.head
    env_dim = len(action_stats["min"])
    if gripper_dim is not None and gripper_dim < 0:
        gripper_dim += env_dim
    if embodiment_id >= h.max_num_embodiments:
        raise ValueError(
            f"policy.embodiment_id {embodiment_id}: the model has {h.max_num_embodiments} rows"
        )
    steps = [Images(cameras, image_size, crop_area, jitter, camera_dropout, min_cameras)]
    if state_stats is not None:
        steps.append(MinMax("state", state_stats))
    steps.append(MinMax("actions", action_stats, gripper_dim))
    eagle = Eagle(
        cameras, model_cfg.image_size, model_cfg.tokens_per_image,
        model_cfg.eagle.image_token_index, tokenizer_dir,
    )  # fmt: skip
    steps.append(eagle)
    steps.append(Pack(h.max_state_dim, horizon, h.action_dim, env_dim, embodiment_id))
    state_dim = len(state_stats["min"]) if state_stats is not None else None
    conventions = declared_conventions(cameras, state_dim, env_dim, horizon)
    return Processor(steps, conventions)


def load_processor(folder):
    """`processor.json` of a saved GR00T policy."""
    from vlatune.policies.processor import Processor

    proc = Processor.load(folder)
    if not any(isinstance(s, Eagle) for s in proc.steps):
        raise ValueError(f"{folder}/processor.json: no groot.eagle step (not a GR00T processor)")
    return proc

"""Processor steps of the pi0 family, as plain functions (LeRobot's `processor_pi0` / `processor_pi05`).

What LeRobot's pre-processor and `PI0Policy._preprocess_images` / `prepare_state` /
`prepare_action` do between a dataset frame and the model, and back:
- images: float (B, 3, H, W) in [0, 1], resized with centred black padding to the square model
  size (openpi `resize_with_pad`), then scaled to [-1, 1] for SigLIP;
- state / actions: zero-padded to `max_state_dim` / `max_action_dim`; predicted actions cut
  back to the dataset's action size;
- prompt: pi0 = the task + "\\n"; pi0.5 = "Task: <task>, State: <256-bin ids>;\\nAction: " with
  the (already normalised to [-1, 1]) state discretised into 256 bins;
- tokens: the PaliGemma tokenizer, right-padded / truncated to `tokenizer_max_length`
  (48 for pi0, 200 for pi0.5), with its attention mask.
Normalisation (mean / std for pi0, quantiles for pi0.5) is the statistics' job, not done here.

    >>> images = to_siglip_range(resize_with_pad(frames01, 224))
    >>> prompts = pi05_prompts(["pick up the soup"], normalized_state)
    >>> tokens, masks = tokenize(tokenizer, prompts, 200)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor


def resize_with_pad(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) float in [0, 1] -> (B, C, size, size): aspect kept, bilinear, centred zero padding."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    out = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    top, left = (size - rh) // 2, (size - rw) // 2
    return F.pad(out, (left, size - rw - left, top, size - rh - top), value=0.0)


def to_siglip_range(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1] (LeRobot's `img * 2 - 1`)."""
    return images * 2.0 - 1.0


def pad_vector(x: Tensor, dim: int) -> Tensor:
    """Zero-pad the last axis to `dim` (state to max_state_dim, actions to max_action_dim)."""
    if x.shape[-1] > dim:
        raise ValueError(f"vector of size {x.shape[-1]} does not fit max dim {dim}")
    return F.pad(x, (0, dim - x.shape[-1]))


def unpad_actions(actions: Tensor, action_dim: int) -> Tensor:
    """(B, H, max_action_dim) -> (B, H, action_dim)."""
    return actions[..., :action_dim]


def discretize_state(state: np.ndarray | Tensor, bins: int = 256) -> np.ndarray:
    """State normalised to [-1, 1] -> integer bins 0..bins-1 (openpi `PaligemmaTokenizer`)."""
    s = state.detach().cpu().numpy() if isinstance(state, Tensor) else np.asarray(state)
    return np.digitize(s, bins=np.linspace(-1, 1, bins + 1)[:-1]) - 1


def pi0_prompts(tasks: Sequence[str]) -> list[str]:
    """pi0: the task ending with a newline (PaliGemma's prompt convention)."""
    return [t if t.endswith("\n") else f"{t}\n" for t in tasks]


def pi05_prompts(
    tasks: Sequence[str], normalized_state: np.ndarray | Tensor, bins: int = 256
) -> list[str]:
    """pi0.5: "Task: <task>, State: <bins>;\\nAction: " with the state discretised in the prompt."""
    ids = discretize_state(normalized_state, bins)
    if ids.ndim != 2 or ids.shape[0] != len(tasks):
        raise ValueError(
            f"state must be (B, state_dim) with B = {len(tasks)} tasks, got {ids.shape}"
        )
    out = []
    for task, row in zip(tasks, ids, strict=True):
        clean = task.strip().replace("_", " ").replace("\n", " ")
        out.append(f"Task: {clean}, State: {' '.join(map(str, row))};\nAction: ")
    return out


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids (B, max_length) int64 and mask (B, max_length) bool, right-padded / truncated."""
    enc = tokenizer(
        list(prompts),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].bool()


def load_tokenizer(path: str):
    """The PaliGemma tokenizer from a local folder (or a hub id where the hub is reachable)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OSError(
            f"cannot load the PaliGemma tokenizer from {path!r} ({e}); pass a folder holding "
            "tokenizer.json / tokenizer_config.json (e.g. a download of google/paligemma-3b-pt-224)"
        ) from None


def model_inputs(
    images01: Sequence[Tensor], state: Tensor | None, actions: Tensor | None, size: int,
    max_state_dim: int, max_action_dim: int, empty_cameras: int = 0,
) -> dict[str, object]:  # fmt: skip
    """Policy-level tensors -> the model's (images in [-1, 1], masks, padded state / actions).

    `empty_cameras` appends that many absent cameras as LeRobot does: images of -1, mask False.
    """
    if not images01:
        raise ValueError("at least one camera image is needed")
    imgs = [to_siglip_range(resize_with_pad(img.float(), size)) for img in images01]
    masks = [torch.ones(img.shape[0], dtype=torch.bool, device=img.device) for img in imgs]
    for _ in range(empty_cameras):
        imgs.append(-torch.ones_like(imgs[0]))
        masks.append(torch.zeros_like(masks[0]))
    out: dict[str, object] = {"images": imgs, "img_masks": masks}
    if state is not None:
        out["state"] = pad_vector(state.float(), max_state_dim)
    if actions is not None:
        out["actions"] = pad_vector(actions.float(), max_action_dim)
    return out


# ---------------------------------------------------------------------------- processor steps
# The chain `vlatune train` and `vlatune eval` run per frame (vlatune.policies.processor), built
# from the functions above. Frames give uint8 (H, W, 3) images, the env-unit state and actions;
# the chain ends with exactly the model-level sample `Pi0Policy` reads (torch's default collate
# turns the lists into lists of batched tensors), so no custom collate is needed.
from vlatune.policies.processor import (  # noqa: E402
    Normalize,
    PadVector,
    Processor,
    Select,
    Step,
    declared_conventions,
    register,
)

TOKENIZER_DIR = "tokenizer"


@register
class Pi0Images(Step):
    """Each camera: uint8 (H, W, 3) -> float (3, S, S) by `resize_with_pad` then [-1, 1]; then
    `empty` absent slots (all -1, mask False), LeRobot's `empty_cameras`. Output `images` (list)
    and `img_masks` (list of 0-d bool). No augmentation (LeRobot trains pi0 without any)."""

    name = "pi0.images"

    def __init__(self, cameras: Sequence[str], size: int, empty: int = 0):
        self.cameras, self.size, self.empty = list(cameras), int(size), int(empty)

    def __call__(self, sample, rng):
        frames = sample["images"]
        images, masks = [], []
        for cam in self.cameras:
            if cam not in frames:
                raise KeyError(f"frame lacks camera '{cam}' (has {sorted(frames)})")
            img = torch.from_numpy(np.ascontiguousarray(frames[cam]))
            if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != torch.uint8:
                raise ValueError(
                    f"camera '{cam}': expected uint8 (H, W, 3), got {img.dtype} {tuple(img.shape)}"
                )
            x = img.permute(2, 0, 1).unsqueeze(0).float() / 255.0
            images.append(to_siglip_range(resize_with_pad(x, self.size))[0])
            masks.append(torch.tensor(True))
        for _ in range(self.empty):
            images.append(-torch.ones(3, self.size, self.size))
            masks.append(torch.tensor(False))
        sample["images"], sample["img_masks"] = images, masks
        return sample

    def describe(self) -> str:
        extra = f" + {self.empty} empty slot(s) (-1, masked)" if self.empty else ""
        return (
            f"images {self.cameras}: resize with padding to {self.size}x{self.size}, [-1, 1]{extra}"
        )

    def to_json(self, folder):
        return {"cameras": self.cameras, "size": self.size, "empty": self.empty}


@register
class Pi0Prompt(Step):
    """The prompt (pi0: task + newline; pi0.5: task and the normalised state, zero-padded to
    `max_state_dim` and cut into 256 bins, as LeRobot's pi05 processor) through the PaliGemma
    tokenizer -> `tokens` (L,) int64 and `token_masks` (L,) bool, right-padded to `max_length`.
    Saved with its tokenizer (a `tokenizer/` folder beside processor.json)."""

    name = "pi0.prompt"

    def __init__(self, variant: str, max_length: int, max_state_dim: int, tokenizer):
        if variant not in ("pi0", "pi05"):
            raise ValueError(f"pi0.prompt: variant must be 'pi0' or 'pi05', got {variant!r}")
        self.variant, self.max_length = variant, int(max_length)
        self.max_state_dim, self.tokenizer = int(max_state_dim), tokenizer

    def prompt(self, sample) -> str:
        task = str(sample.get("instruction", ""))
        if self.variant == "pi0":
            return pi0_prompts([task])[0]
        state = sample.get("state")
        if state is None:
            raise KeyError("pi0.5 puts the state in the prompt: the frame has no 'state'")
        padded = pad_vector(torch.as_tensor(state, dtype=torch.float32)[None], self.max_state_dim)
        return pi05_prompts([task], padded)[0]

    def __call__(self, sample, rng):
        ids, mask = tokenize(self.tokenizer, [self.prompt(sample)], self.max_length)
        sample["tokens"], sample["token_masks"] = ids[0], mask[0]
        return sample

    def describe(self) -> str:
        what = "task + newline" if self.variant == "pi0" else "task + 256-bin state"
        return f"prompt ({what}) -> PaliGemma tokens, right-padded to {self.max_length}"

    def to_json(self, folder):
        self.tokenizer.save_pretrained(str(Path(folder) / TOKENIZER_DIR))
        return {
            "variant": self.variant,
            "max_length": self.max_length,
            "max_state_dim": self.max_state_dim,
            "tokenizer": TOKENIZER_DIR,
        }

    @classmethod
    def from_json(cls, d, folder):
        d = dict(d)
        path = Path(folder) / d.pop("tokenizer", TOKENIZER_DIR)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{Path(folder) / 'processor.json'}: step 'pi0.prompt' names the tokenizer folder "
                f"{path}, which is missing"
            )
        return cls(tokenizer=load_tokenizer(str(path)), **d)


MODEL_KEYS = ("images", "img_masks", "tokens", "token_masks", "state", "actions")


def build_processor(
    variant: str,
    cameras: Sequence[str],
    image_size: int,
    tokenizer,
    max_length: int,
    action_norm,
    state_norm=None,
    max_state_dim: int = 32,
    max_action_dim: int = 32,
    empty_cameras: int = 0,
    horizon: int = 50,
) -> Processor:
    """The pi0 / pi0.5 chain: images, normalised state and actions (the statistics are saved
    in processor.json), prompt tokens, padding to `max_state_dim` / `max_action_dim`.

    Every action dimension is normalised, the gripper included, as LeRobot does (its
    normalisation mapping has no per-dimension exception); predicted actions come back through
    the inverses (cut to the dataset's action size, un-normalised; a q99 prediction is clipped
    to [-1, 1] first and counted as `clipped_actions`)."""
    if variant == "pi05" and state_norm is None:
        raise ValueError("pi0.5 puts the state in the prompt: the data has no state statistics")
    action_dim = len(action_norm.low)
    state_dim = len(state_norm.low) if state_norm is not None else None
    steps: list[Step] = [Pi0Images(cameras, image_size, empty_cameras)]
    if state_norm is not None:
        steps.append(Normalize("state", state_norm))
    steps += [
        Normalize("actions", action_norm),
        Pi0Prompt(variant, max_length, max_state_dim, tokenizer),
    ]
    keys = list(MODEL_KEYS)
    if variant == "pi0" and state_norm is not None:
        steps.append(PadVector("state", max_state_dim, state_dim))
    else:  # pi0.5 reads the state from the prompt only
        keys.remove("state")
    steps += [PadVector("actions", max_action_dim, action_dim), Select(keys)]
    return Processor(steps, declared_conventions(cameras, state_dim, action_dim, horizon))

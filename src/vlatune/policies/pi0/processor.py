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

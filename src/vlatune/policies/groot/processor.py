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
The Eagle prompt (chat template with `<IMG_CONTEXT>` image tokens) needs the Eagle tokenizer
folder and is not built here.

    >>> state, state_mask = pad_state(min_max_normalize(raw_state, stats["observation.state"]), 64)
    >>> env_actions = min_max_unnormalize(unpad_actions(pred, 7), stats["action"])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from vlatune.policies.groot.configuration import DEFAULT_EMBODIMENT_ID

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

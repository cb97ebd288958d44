"""Transforms shared by training and evaluation, each with its inverse where one exists.

- `Normalizer`: per-dimension q01/q99 -> [-1, 1] ("BOUNDS_Q99", clipped) or mean/std; chosen
  dimensions (the gripper) are left as they are. Tiny ranges are clamped so losses cannot
  diverge. Saved with every checkpoint: a mismatch between training and evaluation statistics
  is the first cause of "trains fine, evaluates at 0%" (openpi#406, #773, #839).
- `ImageTransform`: uint8 (H, W, 3) -> uint8 (3, S, S). Training: random crop keeping
  `crop_area` of the area (OFT: 0.9), then brightness/contrast/saturation jitter. Evaluation: the
  same crop, centred, no jitter, so both see objects at the same scale.

    >>> norm = Normalizer.from_stats(stats["action"], "q99", keep_dims=[6])
    >>> np.allclose(norm.inverse(norm(a)), a)   # inside [q01, q99]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MIN_RANGE = 1e-3  # clamp for q99 - q01 and for std


@dataclass(frozen=True)
class Normalizer:
    mode: str  # "q99", "mean_std" or "none"
    low: np.ndarray  # q01 or mean
    high: np.ndarray  # q99 or std
    keep_dims: tuple[int, ...] = ()

    @classmethod
    def from_stats(
        cls, stats: dict[str, Any], mode: str, keep_dims: Sequence[int] = ()
    ) -> Normalizer:
        if mode not in ("q99", "mean_std", "none"):
            raise ValueError(f"normalization must be q99, mean_std or none, got {mode!r}")
        need = {"q99": ("q01", "q99"), "mean_std": ("mean", "std"), "none": ("mean",)}[mode]
        missing = [k for k in need if k not in stats]
        if missing:
            raise KeyError(
                f"normalisation '{mode}' needs statistics {missing}; recompute with `vlatune data stats`"
            )
        dim = len(np.asarray(stats[need[0]]).reshape(-1))
        if mode == "q99":
            low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
        elif mode == "mean_std":
            low, high = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        else:
            low, high = np.zeros(dim), np.ones(dim)
        keep = tuple(sorted(d % dim for d in keep_dims))
        return cls(mode, low.reshape(-1), high.reshape(-1), keep)

    @cached_property  # computed once: the normaliser runs on every sample
    def _scale(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "q99":
            center = (self.high + self.low) / 2
            half = np.maximum((self.high - self.low) / 2, MIN_RANGE / 2)
        elif self.mode == "mean_std":
            center, half = self.low, np.maximum(self.high, MIN_RANGE)
        else:
            center, half = np.zeros_like(self.low), np.ones_like(self.low)
        center, half = center.copy(), half.copy()
        for d in self.keep_dims:
            center[d], half[d] = 0.0, 1.0
        return center, half

    def __call__(self, x: np.ndarray) -> np.ndarray:
        center, half = self._scale
        y = (np.asarray(x, np.float64) - center) / half
        if self.mode == "q99":
            y = np.clip(y, -1.0, 1.0)
        return y.astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        center, half = self._scale
        return np.asarray(y, np.float64) * half + center

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "low": self.low.tolist(),
            "high": self.high.tolist(),
            "keep_dims": list(self.keep_dims),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Normalizer:
        for key in ("mode", "low", "high"):
            if key not in d:
                raise KeyError(f"saved normaliser lacks '{key}'")
        return cls(
            d["mode"],
            np.asarray(d["low"], np.float64),
            np.asarray(d["high"], np.float64),
            tuple(d.get("keep_dims", ())),
        )


@dataclass
class ImageTransform:
    size: int
    crop_area: float = 1.0
    train: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        side = np.sqrt(self.crop_area)
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        if self.train:
            top = int(self.rng.integers(0, h - ch + 1))
            left = int(self.rng.integers(0, w - cw + 1))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        return left, top, left + cw, top + ch

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        if self.train and (self.brightness or self.contrast or self.saturation):
            # on the whole frame (contrast pivots on its mean grey), then crop: jittering the
            # crop would be ~2% faster per sample but change every trained recipe's inputs
            image = self._jitter(image)
        if self.crop_area < 1.0:
            left, top, right, bottom = self.crop_box(h, w)
            image = image[top:bottom, left:right]
        # (3, h, w) over the HWC buffer: channels-last, the layout of torch's vectorised uint8
        # resize (bilinear with antialiasing, as PIL's; about 3x faster than PIL here)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if x.shape[1:] != (self.size, self.size):
            x = F.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0]
        # uint8: the model converts whole batches to float (4x less to move between processes)
        return x.contiguous()

    def _jitter(self, image: np.ndarray) -> np.ndarray:
        """Brightness, contrast and saturation, composed into one affine colour map.

        brightness x -> b x; contrast x -> c (x - m) + m (m: mean grey level); saturation
        x -> s (x - g) + g (g: the pixel's grey level). All three are linear, so
        x' = M x + o with M = c b (s I + (1 - s) 1 w^T) and o = (1 - c) b m, applied once on the
        source frame (before resizing) and clipped once at the end.
        """

        def factor(amount: float) -> float:
            return float(self.rng.uniform(1 - amount, 1 + amount)) if amount > 0 else 1.0

        b, c, s = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        x = image.astype(np.float32)  # (h, w, 3)
        m = float((x.reshape(-1, 3) @ _GREY).mean())
        M = c * b * (s * _EYE3 + (1 - s) * _GREY_ROWS)
        out = x.reshape(-1, 3) @ M.T
        out += (1 - c) * b * m + 0.5  # + 0.5: round
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8).reshape(image.shape)


_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's "L"
_EYE3 = np.eye(3, dtype=np.float32)
_GREY_ROWS = np.outer(np.ones(3, np.float32), _GREY)

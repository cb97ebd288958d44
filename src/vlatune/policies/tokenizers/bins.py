"""Uniform bins (OpenVLA): 256 bins over [-1, 1] per action value, one id per value.

>>> tok = BinTokenizer(); ids = tok.encode(chunk); tok.decode(ids, *chunk.shape).actions
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlatune.policies.tokenizers.fast import DecodeResult


class BinTokenizer:
    def __init__(self, n_bins: int = 256, low: float = -1.0, high: float = 1.0):
        self.n_bins, self.low, self.high = n_bins, low, high
        self.edges = np.linspace(low, high, n_bins + 1)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2

    @property
    def vocab_size(self) -> int:
        return self.n_bins

    def encode(self, chunk: np.ndarray) -> list[int]:
        x = np.clip(np.asarray(chunk, dtype=np.float64).reshape(-1), self.low, self.high)
        return np.clip(np.digitize(x, self.edges[1:-1]), 0, self.n_bins - 1).tolist()

    def decode(self, ids: Sequence[int], horizon: int, dim: int) -> DecodeResult:
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size != horizon * dim:
            return DecodeResult(None, False, f"{ids.size} ids, expected {horizon} x {dim}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_bins):
            return DecodeResult(None, False, f"ids outside 0..{self.n_bins - 1}")
        return DecodeResult(self.centers[ids].reshape(horizon, dim), True)

    def quantization_bound(self) -> float:
        return (self.high - self.low) / self.n_bins / 2

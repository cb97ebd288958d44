"""FAST action tokenizer (Pertsch et al., 2025): DCT, quantise, BPE.

encode: chunk (H, D), normalised to about [-1, 1] -> orthonormal DCT-II along time per dimension
-> x scale, round -> flatten frequency-major (all dims of frequency 0, then frequency 1, ...)
-> minus the fitted minimum token -> one character per value -> BPE ids (HF `tokenizers`).
decode reverses it; a sequence that does not decode to exactly H x D values (truncated
generation, an id outside the vocabulary) returns a flagged failure, never an exception, so the
policy can fall back to a safe action.

The saved folder is `processor_config.json` (`scale`, `vocab_size`, `min_token`,
`time_horizon`, `action_dim`, as the FAST+ release names them) plus the BPE `tokenizer.json`; a
FAST+ folder downloaded from the hub loads the same way. The value -> character mapping is
`chr(value - min_token)`, the one FAST+ uses, so ids are interchangeable.

    >>> tok = FastTokenizer.fit(chunks, scale=10, vocab_size=1024)
    >>> ids = tok.encode(chunk); tok.decode(ids, *chunk.shape).actions
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.fft import dct, idct

from vlatune.fsutil import atomic_dir


@dataclass
class DecodeResult:
    actions: np.ndarray | None  # (H, D) or None on failure
    ok: bool
    error: str | None = None


class FastTokenizer:
    def __init__(
        self,
        bpe,
        scale: float = 10.0,
        min_token: int = 0,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        vocab_size: int = 1024,
    ):
        self.bpe, self.scale, self.min_token = bpe, float(scale), int(min_token)
        self.time_horizon, self.action_dim, self.vocab_size = time_horizon, action_dim, vocab_size

    # ------------------------------------------------------------------ the DCT part
    def quantize(self, chunk: np.ndarray) -> np.ndarray:
        """(H, D) -> integer DCT coefficients, frequency-major, flattened (H * D,)."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"FAST encodes one chunk (H, D) at a time; got shape {chunk.shape}")
        coeffs = dct(chunk, type=2, norm="ortho", axis=0)
        return np.rint(coeffs * self.scale).astype(np.int64).reshape(-1)

    def dequantize(self, flat: np.ndarray, horizon: int, dim: int) -> np.ndarray:
        coeffs = np.asarray(flat, dtype=np.float64).reshape(horizon, dim) / self.scale
        return idct(coeffs, type=2, norm="ortho", axis=0)

    def _to_text(self, flat: np.ndarray) -> str:
        return "".join(map(chr, np.maximum(flat - self.min_token, 0)))

    # ------------------------------------------------------------------ fit / encode / decode
    @classmethod
    def fit(
        cls, chunks: Sequence[np.ndarray], scale: float = 10.0, vocab_size: int = 1024
    ) -> FastTokenizer:
        from tokenizers import Tokenizer, models, trainers

        chunks = [np.asarray(c, dtype=np.float64) for c in chunks]
        if not chunks:
            raise ValueError("FAST needs at least one action chunk to fit")
        shapes = {c.shape for c in chunks}
        probe = cls(None, scale)
        flats = [probe.quantize(c) for c in chunks]
        min_token = int(min(f.min() for f in flats))
        probe.min_token = min_token
        texts = [probe._to_text(f) for f in flats]
        alphabet = sorted({ch for t in texts for ch in t})
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, len(alphabet)),
            min_frequency=2,
            initial_alphabet=alphabet,
            show_progress=False,
            max_token_length=10_000,
        )
        bpe.train_from_iterator(texts, trainer)
        (H, D) = next(iter(shapes)) if len(shapes) == 1 else (None, None)
        return cls(bpe, scale, min_token, H, D, vocab_size)

    def encode(self, chunk: np.ndarray) -> list[int]:
        text = self._to_text(self.quantize(chunk))
        unknown = {ch for ch in text if self.bpe.token_to_id(ch) is None}
        if unknown:  # values outside the fitted range: clamp to the nearest known character
            known = np.array(sorted(ord(c) for c in self.alphabet()))
            text = "".join(
                ch if ch not in unknown else chr(known[np.abs(known - ord(ch)).argmin()])
                for ch in text
            )
        return self.bpe.encode(text).ids

    def alphabet(self) -> set[str]:
        return {t for t in self.bpe.get_vocab() if len(t) == 1}

    def decode(
        self, ids: Sequence[int], horizon: int | None = None, dim: int | None = None
    ) -> DecodeResult:
        H = horizon or self.time_horizon
        D = dim or self.action_dim
        if H is None or D is None:
            return DecodeResult(None, False, "horizon and action dim are unknown")
        pieces = []
        for i in ids:
            tok = self.bpe.id_to_token(int(i))
            if tok is None:
                return DecodeResult(None, False, f"id {i} is not in the vocabulary")
            pieces.append(tok)
        values = np.array([ord(c) for c in "".join(pieces)], dtype=np.int64) + self.min_token
        if values.size != H * D:
            return DecodeResult(
                None, False, f"decoded {values.size} values, expected {H} x {D} = {H * D}"
            )
        return DecodeResult(self.dequantize(values, H, D), True)

    # ------------------------------------------------------------------ folder
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.bpe.save(str(tmp / "tokenizer.json"))
            config = {
                "processor_class": "FastTokenizer",
                "scale": self.scale,
                "vocab_size": self.vocab_size,
                "min_token": self.min_token,
                "time_horizon": self.time_horizon,
                "action_dim": self.action_dim,
            }
            (tmp / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FastTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        cfg_file, tok_file = path / "processor_config.json", path / "tokenizer.json"
        for f in (cfg_file, tok_file):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: not a FAST tokenizer folder ({f.name} missing)")
        cfg = json.loads(cfg_file.read_text())
        missing = [k for k in ("scale", "min_token") if k not in cfg]
        if missing:
            raise ValueError(f"{cfg_file}: lacks {missing}")
        return cls(
            Tokenizer.from_file(str(tok_file)),
            cfg["scale"],
            cfg["min_token"],
            cfg.get("time_horizon"),
            cfg.get("action_dim"),
            cfg.get("vocab_size", 1024),
        )

    def quantization_bound(self, horizon: int) -> float:
        """Largest reconstruction error rounding can cause per value: the orthonormal inverse
        DCT of an error of at most 0.5 / scale per coefficient, summed over H coefficients."""
        basis = idct(np.eye(horizon), type=2, norm="ortho", axis=0)
        return float(np.abs(basis).sum(axis=1).max() * 0.5 / self.scale)

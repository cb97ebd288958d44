"""FAST / FAST+ action tokenizer (Pertsch et al., 2025), bit-compatible with the reference.

The reference is `UniversalActionProcessor` of `physical-intelligence/fast`
(`processing_action_tokenizer.py`; lerobot ships the same code). This module reads, writes and
fits its folders and encodes / decodes exactly as it does:

encode: chunk (H, D) -> orthonormal DCT-II along time per dimension (computed on a batch of one,
axis 1, in the input's dtype, as the reference does) -> x `scale`, `np.around` -> flattened
time-major (row t holds the D coefficients of frequency t) -> minus `min_token`, clamped at 0 ->
one character `chr(value)` per coefficient -> the byte-level BPE of `tokenizer.json` (HF
`tokenizers`): the ByteLevel pre-tokenizer splits the string with the GPT-2 pattern and writes
each character's UTF-8 bytes in the byte-level alphabet, then BPE merges; ids are the BPE's.
decode: BPE ids -> tokens -> the ByteLevel decoder (byte-level alphabet -> bytes -> UTF-8,
invalid bytes become U+FFFD) -> `ord` of each character + `min_token` -> reshape (-1, D), which
must be (H, D) -> `idct(coeff / scale)`. The decoder must read the characters through the
byte-level alphabet: mapping ids with `id_to_token` + `ord` (what vlatune did before) reads the
alphabet's code points instead, wrong for every coefficient whose character is not printable
ASCII, i.e. almost every FAST+ value (`min_token` -354).

Invalid id sequences, as the reference handles them (`DecodeResult.actions` is always the
reference's result):
- a sequence that does not decode to exactly H x D characters (truncated, extra ids, empty,
  negative or non-integer ids): the reference logs an error and returns `idct` of a zero block,
  i.e. an all-zero chunk. Here: `reference_ok=False`, `ok=False`, `actions` all zeros, `error`
  says why (also logged as a warning, as the reference does).
- an id outside the vocabulary: the BPE decoder maps it to the empty string, so the reference
  decodes the remaining ids without any error. Here: `actions` is that same chunk,
  `reference_ok=True`, but `ok=False` and `ignored_ids` lists the dropped ids: a policy must not
  act on it silently.
- bytes that are not valid UTF-8 (a multi-byte character cut in two) become U+FFFD (65533),
  a huge coefficient; the reference returns that chunk without an error. Here too, with
  `ok=False` and the count in `error`.
At encode time the reference also loses information silently: a coefficient below `min_token`
is clamped to `min_token`, and a character whose bytes are not in the fitted alphabet is
dropped by the BPE (no unknown token). `encode` returns the reference's ids unchanged and
counts every chunk it could not encode losslessly in `lossy_encodes` (with a warning the first
time).

The folder (`save` / `from_pretrained`) is the reference's `save_pretrained` output:
`processor_config.json` (`action_dim`, `min_token`, `processor_class`
"UniversalActionProcessor", `scale`, `time_horizon`, `vocab_size`), `tokenizer.json` (the
byte-level BPE, written by `tokenizers` with `pretty=True`) and `tokenizer_config.json` (the
reference's fields, but `tokenizer_class` "PreTrainedTokenizerFast", the name transformers 4
writes and resolves, instead of transformers 5's "TokenizersBackend"; transformers 5 loads it
too). `fit` runs the reference's recipe (a `ByteLevelBPETokenizer` trained with the whole
coefficient range as initial alphabet, `min_frequency` 2), so a folder fitted here loads in the
reference code and the reference's FAST+ folder (hub `physical-intelligence/fast`) loads here.
Proof: tests/test_reference.py (`test_reference[fast]`, the reference's fixture) and
scripts/fast_compat.py (against the reference code itself, both ways).

    >>> tok = FastTokenizer.fit(chunks, scale=10, vocab_size=1024)
    >>> ids = tok.encode(chunk); tok.decode(ids, *chunk.shape).actions
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.fft import dct, idct

from vlatune.fsutil import atomic_dir

log = logging.getLogger(__name__)

PROCESSOR_CLASS = "UniversalActionProcessor"
# the reference's tokenizer_config.json fields (transformers' save_pretrained), with the class
# name transformers 4 (NORA, openpi) and transformers 5 both resolve
TOKENIZER_CONFIG = {
    "backend": "tokenizers",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1000000000000000019884624838656,
    "processor_class": PROCESSOR_CLASS,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


@dataclass
class DecodeResult:
    """`actions`: the (H, D) chunk; for FAST always the reference's output (all zeros when the
    reference fails); for bins None on failure. `ok`: safe to act on (every id decoded, exactly
    H x D valid values). `reference_ok` (FAST only): whether the reference decodes without an
    error. `ignored_ids`: ids outside the vocabulary, which the reference drops silently."""

    actions: np.ndarray | None
    ok: bool
    error: str | None = None
    reference_ok: bool | None = None
    ignored_ids: list[int] = field(default_factory=list)


def _json_scale(scale: float) -> int | float:
    """The reference writes the scale as given (its default is the int 10)."""
    return int(scale) if float(scale).is_integer() else float(scale)


class FastTokenizer:
    def __init__(
        self,
        bpe,
        scale: float = 10,
        min_token: int = 0,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        vocab_size: int = 1024,
    ):
        """`bpe`: a `tokenizers.Tokenizer`, the byte-level BPE of the reference format."""
        self.bpe, self.scale, self.min_token = bpe, _json_scale(scale), int(min_token)
        self.time_horizon, self.action_dim, self.vocab_size = time_horizon, action_dim, vocab_size
        self.lossy_encodes = 0  # chunks whose ids do not reproduce their coefficients

    # ------------------------------------------------------------------ the DCT part
    def quantize(self, chunk: np.ndarray) -> np.ndarray:
        """(H, D) -> integer DCT coefficients x scale, time-major, flattened (H * D,)."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ValueError(f"FAST encodes one chunk (H, D) at a time; got shape {chunk.shape}")
        # as the reference: a batch of one, DCT along axis 1, in the chunk's own dtype
        coeffs = np.around(dct(chunk[None], axis=1, norm="ortho") * self.scale)[0]
        return coeffs.reshape(-1).astype(np.int64)

    def dequantize(self, flat: np.ndarray, horizon: int, dim: int) -> np.ndarray:
        coeffs = np.asarray(flat).reshape(horizon, dim)
        return idct(coeffs / self.scale, axis=0, norm="ortho")

    def _to_text(self, flat: np.ndarray) -> str:
        return "".join(map(chr, np.maximum(flat - self.min_token, 0)))

    # ------------------------------------------------------------------ fit / encode / decode
    @classmethod
    def fit(
        cls,
        chunks: Sequence[np.ndarray],
        scale: float = 10,
        vocab_size: int = 1024,
        *,
        time_horizon: int | None = None,
        action_dim: int | None = None,
    ) -> FastTokenizer:
        """The reference's `UniversalActionProcessor.fit`: same alphabet, trainer and result.
        `time_horizon` / `action_dim` default to the chunks' shape when all chunks share one."""
        from tokenizers import ByteLevelBPETokenizer
        from tokenizers.trainers import BpeTrainer

        if len(chunks) == 0:
            raise ValueError("FAST needs at least one action chunk to fit")
        coeffs = [dct(np.asarray(c), axis=0, norm="ortho").flatten() for c in chunks]
        rounded = np.around(np.concatenate(coeffs) * scale)
        max_token, min_token = int(rounded.max()), int(rounded.min())
        if max_token - min_token > vocab_size:
            raise ValueError(
                f"FAST vocab_size {vocab_size} is smaller than the range of quantised DCT "
                f"coefficients ({min_token}..{max_token}, {max_token - min_token}): raise "
                "policy.fast_vocab or lower policy.fast_scale"
            )
        if max_token - min_token + 100 > vocab_size:
            log.warning(
                "FAST: the coefficient range %d is almost as large as vocab_size %d; "
                "consider a larger vocabulary",
                max_token - min_token,
                vocab_size,
            )

        def texts():
            for c in coeffs:
                values = (np.around(c * scale) - min_token).astype(int)
                yield "".join(map(chr, values))

        bpe = ByteLevelBPETokenizer()
        trainer = BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=[chr(i) for i in range(max_token - min_token + 1)],
            max_token_length=10000,
        )
        bpe._tokenizer.train_from_iterator(texts(), trainer=trainer)
        shapes = {np.shape(c) for c in chunks}
        if len(shapes) == 1:
            H, D = next(iter(shapes))
            time_horizon = time_horizon if time_horizon is not None else int(H)
            action_dim = action_dim if action_dim is not None else int(D)
        return cls(bpe._tokenizer, scale, min_token, time_horizon, action_dim, vocab_size)

    def encode(self, chunk: np.ndarray) -> list[int]:
        """The reference's ids for one chunk (H, D). A chunk the reference cannot encode
        losslessly (see the module docstring) keeps the reference's ids and is counted in
        `lossy_encodes`."""
        flat = self.quantize(chunk)
        text = self._to_text(flat)
        ids = self.bpe.encode(text).ids
        if (flat < self.min_token).any() or self.bpe.decode(ids) != text:
            if self.lossy_encodes == 0:
                log.warning(
                    "FAST: a chunk's DCT coefficients leave the fitted range (below min_token "
                    "%d, or characters outside the BPE alphabet); its ids, as the reference's, "
                    "do not decode back to it (counted in lossy_encodes)",
                    self.min_token,
                )
            self.lossy_encodes += 1
        return ids

    def decode(
        self, ids: Sequence[int], horizon: int | None = None, dim: int | None = None
    ) -> DecodeResult:
        """One id sequence -> DecodeResult; never raises on bad ids (see the module docstring)."""
        H = horizon or self.time_horizon
        D = dim or self.action_dim
        if H is None or D is None:
            raise ValueError(
                "FAST decode needs the time horizon and action dim: pass them, or load a folder "
                "whose processor_config.json has time_horizon and action_dim"
            )
        ids = list(ids)
        ignored: list[int] = []
        problems: list[str] = []
        try:
            ids = [operator.index(i) for i in ids]  # ints, numpy and torch integers
            ignored = [i for i in ids if 0 <= i < 2**32 and self.bpe.id_to_token(i) is None]
            text = self.bpe.decode(ids)
            coeffs = np.array(list(map(ord, text))) + self.min_token
            coeffs = coeffs.reshape(-1, D)
            if coeffs.shape != (H, D):
                raise ValueError(f"decoded DCT coefficients have shape {coeffs.shape}")
            reference_ok = True
            if "\ufffd" in text:
                problems.append(
                    f"{text.count(chr(0xFFFD))} invalid UTF-8 sequence(s) decoded as U+FFFD"
                )
        except Exception as e:  # the reference catches everything here and returns zeros
            log.warning("FAST: error decoding tokens %s: %s", ids, e)
            coeffs = np.zeros((H, D))
            reference_ok = False
            problems.append(f"ids do not decode to {H} x {D} coefficients ({e})")
        if ignored:
            problems.append(f"ids {ignored} are not in the vocabulary (the decoder drops them)")
        return DecodeResult(
            idct(coeffs / self.scale, axis=0, norm="ortho"),
            ok=not problems,
            error="; ".join(problems) or None,
            reference_ok=reference_ok,
            ignored_ids=ignored,
        )

    # ------------------------------------------------------------------ folder
    def save(self, path: str | Path) -> Path:
        """The reference's folder: processor_config.json, tokenizer.json, tokenizer_config.json."""
        path = Path(path)
        config = {
            "action_dim": self.action_dim,
            "min_token": self.min_token,
            "processor_class": PROCESSOR_CLASS,
            "scale": self.scale,
            "time_horizon": self.time_horizon,
            "vocab_size": self.vocab_size,
        }
        with atomic_dir(path) as tmp:
            self.bpe.save(str(tmp / "tokenizer.json"), pretty=True)
            for name, obj in (
                ("processor_config.json", config),
                ("tokenizer_config.json", TOKENIZER_CONFIG),
            ):
                (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FastTokenizer:
        """A reference-format folder (this module's `save`, the reference's `save_pretrained`,
        the FAST+ hub folder)."""
        from tokenizers import Tokenizer

        path = Path(path)
        cfg_file, tok_file = path / "processor_config.json", path / "tokenizer.json"
        for f in (cfg_file, tok_file):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: not a FAST tokenizer folder ({f.name} missing)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object")
        missing = [k for k in ("scale", "min_token") if k not in cfg]
        if missing:
            raise ValueError(f"{cfg_file}: lacks {missing} (the FAST processor's fields)")

        def number(key, kind, optional):
            v = cfg.get(key)
            if v is None and optional:
                return None
            ok = isinstance(v, kind) and not isinstance(v, bool)
            if not ok or (key != "min_token" and v <= 0):
                what = "an integer" if kind is int else "a number"
                what += "" if key == "min_token" else " > 0"
                raise ValueError(f"{cfg_file}: {key!r} must be {what}; got {v!r}")
            return v

        scale = number("scale", (int, float), False)
        min_token = number("min_token", int, False)
        horizon = number("time_horizon", int, True)
        dim = number("action_dim", int, True)
        vocab_size = number("vocab_size", int, True)
        try:
            spec = json.loads(tok_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{tok_file}: not valid JSON ({e})") from None
        kinds = {
            k: ((spec.get(k) or {}).get("type")) for k in ("model", "pre_tokenizer", "decoder")
        }
        if kinds != {"model": "BPE", "pre_tokenizer": "ByteLevel", "decoder": "ByteLevel"}:
            raise ValueError(
                f"{tok_file}: expected FAST's byte-level BPE (model BPE, pre_tokenizer and "
                f"decoder ByteLevel); got {kinds}. A folder written by vlatune before the "
                "reference format (a character-level BPE) must be refitted: leave "
                "policy.action_tokenizer_path empty"
            )
        bpe = Tokenizer.from_file(str(tok_file))
        return cls(
            bpe,
            scale,
            min_token,
            horizon,
            dim,
            vocab_size if vocab_size is not None else bpe.get_vocab_size(),
        )

    def quantization_bound(self, horizon: int) -> float:
        """Largest reconstruction error rounding can cause per value: the orthonormal inverse
        DCT of an error of at most 0.5 / scale per coefficient, summed over H coefficients."""
        basis = idct(np.eye(horizon), type=2, norm="ortho", axis=0)
        return float(np.abs(basis).sum(axis=1).max() * 0.5 / self.scale)

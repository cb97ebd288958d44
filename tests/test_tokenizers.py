"""FAST and bin action tokenizers: round trip within the quantisation bound, invalid input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlatune.policies.tokenizers import BinTokenizer, FastTokenizer


def smooth_chunks(n: int, H: int = 8, D: int = 7, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[:, None]
    return [
        np.clip(
            np.sin(2 * np.pi * (t * rng.uniform(0.1, 1, D) + rng.uniform(0, 1, D)))
            * rng.uniform(0.2, 1, D),
            -1,
            1,
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def fast() -> FastTokenizer:
    return FastTokenizer.fit(smooth_chunks(1500), scale=10, vocab_size=512)


def test_fast_round_trip_within_bound(fast):
    bound = fast.quantization_bound(8)
    errors, lengths = [], []
    for chunk in smooth_chunks(200, seed=1):
        ids = fast.encode(chunk)
        res = fast.decode(ids, 8, 7)
        assert res.ok, res.error
        errors.append(np.abs(res.actions - chunk).max())
        lengths.append(len(ids))
    assert max(errors) <= bound
    assert np.mean(lengths) < 8 * 7 / 1.75  # compresses (FAST paper: 1.75x to 13x)


def test_fast_frequency_major_and_dct(fast):
    chunk = np.zeros((8, 7))
    chunk[:, 2] = 0.5  # a constant: only the frequency-0 coefficient of dim 2 is non-zero
    flat = fast.quantize(chunk)
    assert flat[2] == round(0.5 * np.sqrt(8) * 10)
    assert np.count_nonzero(flat) == 1


def test_fast_invalid_sequences_are_flagged(fast):
    ids = fast.encode(smooth_chunks(1, seed=3)[0])
    for bad in (ids[:-2], ids + ids, [10**7], []):
        res = fast.decode(bad, 8, 7)
        assert not res.ok and res.actions is None and res.error


def test_fast_folder_round_trip(fast, tmp_path):
    fast.save(tmp_path / "fast")
    cfg = json.loads((tmp_path / "fast" / "processor_config.json").read_text())
    assert {"scale", "vocab_size", "min_token", "time_horizon", "action_dim"} <= set(cfg)
    loaded = FastTokenizer.from_pretrained(tmp_path / "fast")
    chunk = smooth_chunks(1, seed=4)[0]
    assert loaded.encode(chunk) == fast.encode(chunk)
    (tmp_path / "fast" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        FastTokenizer.from_pretrained(tmp_path / "fast")


def test_bins():
    tok = BinTokenizer()
    chunk = smooth_chunks(1)[0]
    ids = tok.encode(chunk)
    assert len(ids) == 56 and min(ids) >= 0 and max(ids) <= 255
    res = tok.decode(ids, 8, 7)
    assert res.ok and np.abs(res.actions - chunk).max() <= tok.quantization_bound() + 1e-12
    assert tok.encode(np.array([[-1.0, 1.0, 0.0]])) == [0, 255, 128]
    assert not tok.decode(ids[:5], 8, 7).ok
    assert not tok.decode([300] * 56, 8, 7).ok

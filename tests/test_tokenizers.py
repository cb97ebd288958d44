"""FAST and bin action tokenizers: round trip within the quantisation bound, FAST+-sized
coefficients (2-byte characters), the reference folder format, invalid input.

The reference fixture itself (ids, decoded chunks and invalid sequences of the reference code)
is checked by tests/test_reference.py (`test_reference[fast]`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.fft import idct

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


def wide_chunks(n: int, H: int = 10, D: int = 7, seed: int = 0) -> list[np.ndarray]:
    """Chunks whose scaled DCT coefficients span about +-354, FAST+'s range: most characters
    are >= 128, i.e. 2-byte UTF-8 in the byte-level BPE."""
    rng = np.random.default_rng(seed)
    amp = 35.0 / np.sqrt(H)  # DC coefficient x scale 10 reaches +-350
    steps = rng.normal(0, 0.3, (n, H, D)) * amp
    return list(np.clip(rng.uniform(-0.9, 0.9, (n, 1, D)) * amp + np.cumsum(steps, 1), -amp, amp))


@pytest.fixture(scope="module")
def fast() -> FastTokenizer:
    return FastTokenizer.fit(smooth_chunks(1500), scale=10, vocab_size=512)


@pytest.fixture(scope="module")
def fast_plus() -> FastTokenizer:
    H = 10
    pin = np.full((H, 7), -35.4 / np.sqrt(H))  # DC x scale = -354: FAST+'s min_token
    return FastTokenizer.fit([pin, *wide_chunks(600, H)], scale=10, vocab_size=2048)


def reference_decode(tok: FastTokenizer, text: str, H: int, D: int) -> np.ndarray:
    """The reference's arithmetic on a decoded string, written out."""
    coeffs = (np.array([ord(c) for c in text]) + tok.min_token).reshape(H, D)
    return idct(coeffs / tok.scale, axis=0, norm="ortho")


def test_fast_round_trip_within_bound(fast):
    bound = fast.quantization_bound(8)
    errors, lengths = [], []
    for chunk in smooth_chunks(200, seed=1):
        ids = fast.encode(chunk)
        res = fast.decode(ids, 8, 7)
        assert res.ok and res.reference_ok, res.error
        errors.append(np.abs(res.actions - chunk).max())
        lengths.append(len(ids))
    assert max(errors) <= bound
    assert np.mean(lengths) < 8 * 7 / 1.75  # compresses (FAST paper: 1.75x to 13x)
    assert fast.lossy_encodes == 0


def test_fast_time_major_and_dct(fast):
    chunk = np.zeros((8, 7))
    chunk[:, 2] = 0.5  # a constant: only the frequency-0 coefficient of dim 2 is non-zero
    flat = fast.quantize(chunk)
    assert flat[2] == round(0.5 * np.sqrt(8) * 10)
    assert np.count_nonzero(flat) == 1


def test_fast_plus_sized_coefficients_round_trip(fast_plus):
    """min_token -354, scale 10: the characters are mostly >= 128 (2 UTF-8 bytes); the
    decoder must read them through the byte-level alphabet (id_to_token + ord does not)."""
    tok = fast_plus
    assert tok.min_token == -354 and tok.scale == 10
    H, D = 10, 7
    multi_byte, naive_wrong = 0, 0
    for chunk in wide_chunks(100, H, D, seed=1):
        ids = tok.encode(chunk)
        flat = tok.quantize(chunk)
        text = tok._to_text(flat)
        multi_byte += sum(ord(c) >= 128 for c in text)
        res = tok.decode(ids, H, D)
        assert res.ok and res.reference_ok, res.error
        np.testing.assert_array_equal(res.actions, tok.dequantize(flat, H, D))
        assert np.abs(res.actions - chunk).max() <= tok.quantization_bound(H)
        # the old decoder: token strings' code points are the byte-level alphabet's
        naive = "".join(tok.bpe.id_to_token(i) for i in ids)
        naive_wrong += naive != text
    assert multi_byte > 0.5 * 100 * H * D
    assert naive_wrong == 100
    assert tok.lossy_encodes == 0


def test_fast_values_outside_the_fitted_range_are_counted(fast):
    tok = fast
    before = tok.lossy_encodes
    wild = np.cumsum(np.random.default_rng(5).normal(0, 2.0, (8, 7)), 0)  # far outside [-1, 1]
    ids = tok.encode(wild)
    assert tok.lossy_encodes == before + 1
    res = tok.decode(ids, 8, 7)  # as the reference: the ids no longer hold 56 values
    assert not res.ok and not res.reference_ok and not res.actions.any()


def test_fast_invalid_sequences(fast_plus):
    tok, H, D = fast_plus, 10, 7
    ids = tok.encode(wide_chunks(1, H, D, seed=3)[0])
    good = tok.decode(ids, H, D)
    # wrong length, empty, negative / huge ids: the reference fails and returns zeros
    for bad in (ids[:-2], ids + ids[:3], [], [-1, *ids], [2**40]):
        res = tok.decode(bad, H, D)
        assert not res.ok and res.reference_ok is False and res.error
        np.testing.assert_array_equal(res.actions, np.zeros((H, D)))
    # an id outside the vocabulary: the reference drops it and decodes the rest
    unknown = tok.bpe.get_vocab_size() + 7
    res = tok.decode(ids[:2] + [unknown] + ids[2:], H, D)
    assert res.reference_ok and not res.ok and res.ignored_ids == [unknown]
    np.testing.assert_array_equal(res.actions, good.actions)
    # a 2-byte character cut in two decodes as U+FFFD (65533): the reference acts on it
    pieces = tok.bpe.pre_tokenizer.pre_tokenize_str(tok._to_text(tok.quantize(np.zeros((H, D)))))
    byte_chars = "".join(p for p, _ in pieces)  # one byte-level character per UTF-8 byte
    assert len(byte_chars) > H * D  # some 2-byte characters
    byte_ids = [tok.bpe.token_to_id(c) for c in byte_chars]
    assert tok.decode(byte_ids, H, D).ok  # unmerged byte tokens are a valid sequence
    res = tok.decode(byte_ids[:-1], H, D)  # the last character loses its second byte
    assert res.reference_ok and not res.ok and "U+FFFD" in res.error
    text = tok.bpe.decode(byte_ids[:-1])
    assert text[-1] == "\ufffd" and len(text) == H * D
    np.testing.assert_array_equal(res.actions, reference_decode(tok, text, H, D))


def test_fast_reference_folder_round_trip(fast_plus, tmp_path):
    tok = fast_plus
    tok.save(tmp_path / "fast")
    names = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert names == ["processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "fast" / "processor_config.json").read_text())
    assert cfg == {
        "action_dim": 7,
        "min_token": -354,
        "processor_class": "UniversalActionProcessor",
        "scale": 10,
        "time_horizon": 10,
        "vocab_size": 2048,
    }
    spec = json.loads((tmp_path / "fast" / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE"
    loaded = FastTokenizer.from_pretrained(tmp_path / "fast")
    for chunk in wide_chunks(20, 10, 7, seed=4):
        ids = tok.encode(chunk)
        assert loaded.encode(chunk) == ids
        np.testing.assert_array_equal(loaded.decode(ids).actions, tok.decode(ids).actions)
    loaded.save(tmp_path / "again")
    for name in names:  # a re-save is byte-identical
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes()


def test_fast_fit_then_load_through_transformers(fast, tmp_path):
    """The reference loads the BPE with transformers' PreTrainedTokenizerFast: our folder must
    give it the same ids and the same decoded string."""
    from transformers import PreTrainedTokenizerFast

    fast.save(tmp_path / "fast")
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "fast"))
    for chunk in smooth_chunks(20, seed=6):
        text = fast._to_text(fast.quantize(chunk))
        ids = fast.encode(chunk)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text


def test_fast_folder_errors(fast, tmp_path):
    fast.save(tmp_path / "fast")
    cfg_file = tmp_path / "fast" / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "min_token": "-3"}))
    with pytest.raises(ValueError, match=r"processor_config.json: 'min_token' must be an integer"):
        FastTokenizer.from_pretrained(tmp_path / "fast")
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "scale"}))
    with pytest.raises(ValueError, match=r"lacks \['scale'\]"):
        FastTokenizer.from_pretrained(tmp_path / "fast")
    cfg_file.write_text(json.dumps(cfg))
    # a character-level BPE (vlatune's format before the reference one) is refused, not misread
    spec_file = tmp_path / "fast" / "tokenizer.json"
    spec = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**spec, "pre_tokenizer": None, "decoder": None}))
    with pytest.raises(ValueError, match="byte-level BPE.*refitted"):
        FastTokenizer.from_pretrained(tmp_path / "fast")
    spec_file.unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        FastTokenizer.from_pretrained(tmp_path / "fast")
    with pytest.raises(ValueError, match="vocab_size 20 is smaller"):
        FastTokenizer.fit(smooth_chunks(50), scale=10, vocab_size=20)


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

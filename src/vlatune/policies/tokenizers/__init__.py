"""Action tokenizers: FAST (DCT + BPE) and uniform bins."""

from vlatune.policies.tokenizers.bins import BinTokenizer
from vlatune.policies.tokenizers.fast import DecodeResult, FastTokenizer

__all__ = ["BinTokenizer", "DecodeResult", "FastTokenizer"]

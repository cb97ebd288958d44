"""The policy server's wire format: msgpack maps, numpy arrays as tagged maps.

Every websocket message is one binary frame holding one msgpack map. A numpy array anywhere in
a message is the map

    {"__ndarray__": true, "dtype": "<f8", "shape": [16, 7], "data": <raw bytes, C order>}

with `dtype` numpy's `dtype.str` (byte order + kind + size: "|u1" uint8, "<f4" float32, "<f8"
float64, "|b1" bool, "<i8" int64, ...); only booleans, integers and floats are accepted (never
objects: nothing on the wire is unpickled). Any language with msgpack can speak it.
`vlatune.serving.server` documents the messages themselves.

    >>> decode(encode({"state": np.zeros(8, np.float32)}))["state"].dtype
    dtype('float32')
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL = "vlatune-serve/1"
MAX_MESSAGE = 64 * 2**20  # bytes: eight 1024 px RGB cameras fit
_KINDS = "biuf"  # bool, signed, unsigned, float


class WireError(ValueError):
    """A message that does not follow the format; `field` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def _pack(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent (bool, int, float only)")
        return {
            "__ndarray__": True,
            "dtype": obj.dtype.str,
            "shape": list(obj.shape),
            "data": np.ascontiguousarray(obj).tobytes(),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, default=_pack, use_bin_type=True)


def _array(d: dict[str, Any], field: str) -> np.ndarray:
    dtype, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in _KINDS:
        raise WireError(f"{field}.dtype", f"expected a numeric numpy dtype string, got {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WireError(f"{field}.shape", f"expected a list of sizes, got {shape!r}")
    if not isinstance(data, bytes):
        raise WireError(f"{field}.data", "expected raw bytes")
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        raise WireError(
            f"{field}.data", f"{len(data)} bytes do not make an array {dtype} of shape {shape}"
        )
    return np.frombuffer(bytearray(data), dtype=dt).reshape(shape)  # writable, owns its copy


def _unwire(obj: Any, field: str) -> Any:
    if isinstance(obj, dict):
        if obj.get("__ndarray__") is True:
            return _array(obj, field)
        for k in obj:
            if not isinstance(k, str):
                raise WireError(field or "message", f"map keys must be strings, got {k!r}")
        return {k: _unwire(v, f"{field}.{k}" if field else k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unwire(v, f"{field}[{i}]") for i, v in enumerate(obj)]
    return obj


def decode(payload: bytes | str) -> dict[str, Any]:
    """One message -> dict with numpy arrays (writable copies)."""
    if not isinstance(payload, bytes):
        raise WireError("message", "expected a binary frame holding msgpack, got a text frame")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for truncated / invalid data
        raise WireError("message", f"not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise WireError("message", f"expected a map, got {type(obj).__name__}")
    return _unwire(obj, "")

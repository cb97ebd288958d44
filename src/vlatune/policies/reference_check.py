"""Helpers the families' `reference.py` checks share: comparing an output with a reference
fixture's expected tensor, and reading a fixture's `keys.txt`.

The fixtures (`../shared/reference/<folder>`, see its README) are float32 and reproduce bit for
bit with the reference implementations; a port differs by float32 rounding only. Comparisons run
in float64 so the tolerance, not the comparison, decides.

    >>> assert_close("loss", ours, expected["loss"], tol=1e-4)
    >>> shapes = read_keys_txt(folder / "keys.txt")   # {key: shape}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def assert_close(name: str, got, want, tol: float = 1e-4) -> None:
    """`got` equals `want` within atol = rtol = `tol`, else an AssertionError naming the output,
    the largest difference and where it is."""
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got)
    want = torch.as_tensor(want)
    assert tuple(got.shape) == tuple(want.shape), (
        f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    )
    got, want = got.detach().cpu().double(), want.cpu().double()
    if got.numel() and not torch.allclose(got, want, atol=tol, rtol=tol):
        diff = (got - want).abs()
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3e} exceeds atol = rtol = {tol:g} "
            f"(at index {where})"
        )


def read_keys_txt(path: Path) -> dict[str, tuple[int, ...]]:
    """A fixture's `keys.txt`: `key<TAB>(shape)<TAB>dtype` lines and `#` comments -> {key: shape}."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        dims = shape.strip().strip("()").replace(" ", "")
        out[key] = tuple(int(d) for d in dims.split(",") if d)
    return out

"""Rendering settings for simulator worker processes (shared by `vlatune eval` and `sim synth`).

Mesa's software rasteriser (llvmpipe) starts one thread per core in every process; with one
simulator worker per core they contend.

    >>> one_render_thread()   # first thing in a worker process, before MuJoCo renders
"""

from __future__ import annotations

import os


def one_render_thread() -> None:
    """One llvmpipe thread in this process (2-worker evaluation was about 25% faster on our 2
    cores). A user's own LP_NUM_THREADS is kept."""
    os.environ.setdefault("LP_NUM_THREADS", "1")

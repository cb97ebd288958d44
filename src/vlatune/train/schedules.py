"""Learning-rate schedules as multipliers of the base rate (for torch's LambdaLR).

- constant: 1 (after warm-up);
- cosine: warm-up, then cosine from 1 to 0 at `max_steps`;
- linear: warm-up, then linear from 1 to 0 at `max_steps`;
- multistep: warm-up, then x `decay_factor` at each of `decay_steps` (OFT: x0.1 at 100k).
Warm-up is linear from 1/warmup to 1 over `warmup_steps` optimizer steps.

    >>> f = lr_multiplier("cosine", max_steps=1000, warmup_steps=100); f(50), f(100), f(1000)
    (0.51, 1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def lr_multiplier(
    schedule: str,
    max_steps: int,
    warmup_steps: int = 0,
    decay_steps: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> Callable[[int], float]:
    if schedule not in ("constant", "cosine", "linear", "multistep"):
        raise ValueError(f"unknown schedule {schedule!r}: constant, cosine, linear or multistep")
    milestones = sorted(decay_steps)

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "multistep":
            return decay_factor ** sum(step >= m for m in milestones)
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f

"""Exponential moving average of the trained parameters (Polyak averaging), `train.ema_decay`.

A policy trained with a constant learning rate and stopped at an arbitrary step (the demo stops
by wall time) is one draw from a noisy trajectory: two checkpoints a few hundred steps apart can
differ from 0% to 100% closed-loop success although their losses are alike. The average of the
recent parameters is far steadier, which is why diffusion-policy and flow-matching recipes
deploy it. Here the average is what a checkpoint's `policy/` holds (what evaluation loads); the
raw parameters the optimiser works on are saved beside it (`train_weights.safetensors`) so a
resumed run continues exactly.

    shadow <- d * shadow + (1 - d) * param,   d = min(decay, (1 + step) / (10 + step))

The warm-up of d keeps the random initialisation from lingering in the average of a short run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, shadow: dict | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if shadow is None:
            shadow = {n: p.detach() for n, p in params.items()}
        missing = sorted(set(params) - set(shadow))
        if missing:
            raise KeyError(f"the saved average lacks parameters {missing[:5]}")
        self.shadow = {n: shadow[n].detach().float().clone() for n in params}

    def rate(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the parameters after optimiser step `step` (0-based)."""
        d = self.rate(step)
        for n, p in model.named_parameters():
            s = self.shadow.get(n)
            if s is not None:
                s.lerp_(p.detach().float(), 1.0 - d)

    @contextmanager
    @torch.no_grad()
    def averaged(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside the block the model holds the averages; its own parameters come back after."""
        raw = {}
        for n, p in model.named_parameters():
            if n in self.shadow:
                raw[n] = p.detach().clone()
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            for n, p in model.named_parameters():
                if n in raw:
                    p.copy_(raw[n])


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as they are (contiguous copies, for safetensors)."""
    return {
        n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], file) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if unknown or missing:
        raise KeyError(
            f"{file}: parameters do not match the policy (missing {missing[:5]}, unknown {unknown[:5]})"
        )
    for n, v in state.items():
        params[n].copy_(v.to(params[n].dtype))

"""Policies, one family per folder: `composed/` (vlatune's backbone x head composition), `pi0/`,
`rdt/`, `openvla/`, `groot/`; `registry.py` names them, `base.py` is the interface the trainer
and evaluator see, `io.py` loads any folder by its layout. Exports are imported lazily, so
`import vlatune.policies.registry` does not load torch.

    >>> from vlatune.policies import load
    >>> policy = load("runs/demo/checkpoint-2000")
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VLAPolicy": "vlatune.policies.composed.policy",
    "build_policy": "vlatune.policies.composed.policy",
    "build": "vlatune.policies.registry",
    "load": "vlatune.policies.io",
    "detect": "vlatune.policies.io",
    "inspect": "vlatune.policies.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlatune.policies' has no attribute '{name}'")

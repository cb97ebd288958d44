"""Training checkpoints: `checkpoint-<step>/`, complete or absent.

    checkpoint-<step>/
      policy/                 Policy.save format (safetensors + config.json + normalization.json);
                              with train.ema_decay the moving average of the weights
      train_weights.safetensors   with train.ema_decay only: the raw trainable parameters
      optimizer.pt            optimizer state (tensors and numbers only; read with weights_only)
      rng_rank<r>.json        python, numpy and torch (CPU and CUDA) generator states per process
      trainer_state.json      step, micro-step, epoch, scheduler state, resolved config; written
                              last: its presence marks a complete checkpoint

A checkpoint is written under `.checkpoint-<step>.tmp/` and renamed when complete, so a process
killed mid-write leaves a temporary folder that is never picked up (and is cleared on the next
save). `find_latest` skips, with a warning, any checkpoint that does not read back.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("vlatune.train")
_NAME = re.compile(r"^checkpoint-(\d+)$")
REQUIRED = ("trainer_state.json", "optimizer.pt", "policy/model.safetensors", "policy/config.json")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_step(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [
        p
        for p in Path(run_dir).glob("checkpoint-*")
        if p.is_dir() and checkpoint_step(p) is not None
    ]
    return sorted(found, key=checkpoint_step)


def validate(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint; raises ValueError naming what is wrong."""
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ValueError(f"missing {missing}")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"trainer_state.json is not valid JSON ({e})") from None
    for key in ("step", "micro_step", "world_size", "scheduler"):
        if key not in state:
            raise ValueError(f"trainer_state.json lacks '{key}'")
    if state["step"] != checkpoint_step(path):
        raise ValueError(f"trainer_state.json says step {state['step']}")
    return state


def find_latest(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, validate(path)
        except ValueError as e:
            log.warning("ignoring checkpoint %s: %s", path, e)
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_optimizer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)

"""Training checkpoints: `checkpoint-<step>/`, complete or absent.

    checkpoint-<step>/
      policy/                 Policy.save format (safetensors + config.json + normalization.json);
                              with train.ema_decay the moving average of the weights
      train_weights.safetensors   with train.ema_decay only: the raw trainable parameters
      optimizer.pt            optimizer state (tensors and numbers only; read with weights_only)
      rng_rank<r>.json        python, numpy and torch (CPU and CUDA) generator states per process
      trainer_state.json      step, micro-step, epoch, scheduler state, resolved config; written
                              last: its presence marks a complete checkpoint

A checkpoint is written under `.checkpoint-<step>.tmp/` (holding `vlatune-owner.json`: host and
process id) and renamed when complete, so a process killed mid-write leaves a temporary folder
that is never picked up; `clean_stale` removes those whose process is gone at the next start
(and a failed save removes its own). `find_latest` skips, with a warning naming the checkpoint
and the reason, any checkpoint that does not read back: a missing file, invalid JSON, a
truncated or corrupt safetensors file (header and size checked) or optimizer archive (zip
directory checked), and resumes from the previous good one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("vlatune.train")
_NAME = re.compile(r"^checkpoint-(\d+)$")
REQUIRED = ("trainer_state.json", "optimizer.pt", "policy/model.safetensors", "policy/config.json")
OWNER = "vlatune-owner.json"
_TMP = re.compile(r"^\.checkpoint-\d+\.tmp$")


def mark_owner(tmp: Path) -> None:
    """Record which process writes this temporary checkpoint folder."""
    from vlatune.fsutil import _HOST

    (tmp / OWNER).write_text(json.dumps({"host": _HOST, "pid": os.getpid()}))


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove `.checkpoint-<step>.tmp/` folders of killed runs (their writer, on this host, is
    gone; a folder without an owner record was killed before writing it); returns them."""
    from vlatune.fsutil import _HOST, pid_alive

    removed = []
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        if not (p.is_dir() and _TMP.match(p.name)):
            continue
        try:
            owner = json.loads((p / OWNER).read_text())
            stale = owner.get("host") == _HOST and not pid_alive(int(owner.get("pid", 0)))
        except (OSError, ValueError, TypeError):
            stale = True
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.warning(
            "removed %d unfinished checkpoint folder(s) of killed runs: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def check_safetensors(path: Path) -> None:
    """Raises ValueError when a safetensors file is truncated or its header is corrupt (reads
    the header only)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path.name} is truncated (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path.name} has a corrupt header") from None
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
        default=0,
    )
    if 8 + n + end != size:
        raise ValueError(
            f"{path.name} is truncated or padded: {size} bytes, expected {8 + n + end}"
        )


def check_zip(path: Path) -> None:
    """Raises ValueError when a torch.save archive is truncated (its zip directory is read)."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path.name} is truncated or corrupt ({e})") from None


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
    for f in sorted(path.rglob("*.safetensors")):
        check_safetensors(f)
    for f in sorted(path.rglob("*.json")):
        try:
            json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f.relative_to(path)} is not valid JSON ({e})") from None
    check_zip(path / "optimizer.pt")
    return state


def find_latest(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, validate(path)
        except (ValueError, OSError) as e:
            log.warning("ignoring checkpoint %s (skipped: %s); trying the previous one", path, e)
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_optimizer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)

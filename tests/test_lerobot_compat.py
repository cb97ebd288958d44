"""The LeRobot library itself loads what our writers produce, and we read what it writes
(scripts/lerobot_compat.py).

LeRobot imports torchvision, which has no build for this machine's CPU torch, so the check runs
lerobot in its own interpreters: those `scripts/setup_lerobot.sh` makes (`make test-lerobot`),
or the ones named by VLATUNE_LEROBOT_V21_PYTHON (lerobot 0.3.x, reads v2.1) and
VLATUNE_LEROBOT_V30_PYTHON (lerobot >= 0.4, reads v3.0). Without any the test is skipped with
that instruction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(var: str, venv: str) -> str | None:
    """The interpreter named by `var`, else the one scripts/setup_lerobot.sh made, if any."""
    made = REPO / venv / "bin" / "python"
    return os.environ.get(var) or (str(made) if made.is_file() else None)


V21 = _python("VLATUNE_LEROBOT_V21_PYTHON", ".venv-lerobot")
V30 = _python("VLATUNE_LEROBOT_V30_PYTHON", ".venv-lerobot-v3")


@pytest.mark.skipif(
    not (V21 or V30),
    reason="no Python with lerobot: run `make test-lerobot` (scripts/setup_lerobot.sh, ~6 GB), "
    "or set VLATUNE_LEROBOT_V21_PYTHON / VLATUNE_LEROBOT_V30_PYTHON",
)
def test_lerobot_library_and_vlatune_read_each_others_v21_and_v30(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "lerobot_compat.py"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    if V21:
        cmd += ["--v21-python", V21]
    if V30:
        cmd += ["--v30-python", V30]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {r["format"] for r in rows} == {v for v, p in (("v2.1", V21), ("v3.0", V30)) if p}
    for r in rows:  # both directions ran and passed
        assert r["ok"], r
        assert r["lerobot_loads_ours"]["actions_exact"] and r["lerobot_loads_ours"]["chunks_equal"]
        assert r["we_read_theirs"]["actions_exact"] and r["we_read_theirs"]["tasks_equal"]

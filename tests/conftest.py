"""Shared test helpers. Simulator tests carry the `sim` marker; long ones `slow`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m vlatune ARGS` in a subprocess, stdin closed (CI has none)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vlatune", *args],
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def repo() -> Path:
    return REPO


# A folder the eval test policies (tests/eval_policies.py) use for their crash markers. Set at
# import, before any forkserver starts, so worker processes inherit it.
os.environ.setdefault("VLATUNE_TEST_TMP", __import__("tempfile").mkdtemp(prefix="vlatune-test-"))

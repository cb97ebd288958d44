"""TensorFlow Datasets loads the RLDS folders vlatune writes, and vlatune reads the ones TFDS
writes (scripts/rlds_compat.py).

vlatune reads and writes RLDS without tensorflow; the check needs TensorFlow Datasets itself,
which lives in the side environment `scripts/setup_rlds.sh` makes (`.venv-rlds`, about 2 GB;
`make test-rlds`), or the interpreter named by VLATUNE_RLDS_PYTHON. Without one the test is
skipped with that instruction. (The files TFDS wrote are also committed under
tests/fixtures/rlds_tfds and read by tests/test_rlds.py in every run.)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MADE = REPO / ".venv-rlds" / "bin" / "python"
PYTHON = os.environ.get("VLATUNE_RLDS_PYTHON") or (str(MADE) if MADE.is_file() else None)


@pytest.mark.skipif(
    PYTHON is None,
    reason="no Python with tensorflow-datasets: run `make test-rlds` (scripts/setup_rlds.sh "
    "makes .venv-rlds, ~2 GB) or set VLATUNE_RLDS_PYTHON",
)
def test_tfds_and_vlatune_read_each_others_rlds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [PYTHON, str(REPO / "scripts" / "rlds_compat.py"), "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "r.json").read_text())
    ours = r["vlatune_reads_tfds"]
    assert ours["format_detected"] == "rlds" and ours["episodes"] == 3
    assert ours["actions_exact"] and ours["states_exact"] and ours["flags_exact"]
    assert ours["instructions_equal"] and ours["image_max_abs_diff"]["wrist"] == 0
    assert ours["jpeg_vs_tf_accurate_idct_max_abs_diff"] == 0
    assert ours["conventions"]["image_orientation"].startswith("declared (known dataset")
    theirs = r["tfds_loads_vlatune"]
    assert theirs["actions_exact"] and theirs["action_dtype"] == "float64"
    assert theirs["states_exact"] and theirs["extras_exact"] and theirs["instructions_equal"]
    assert all(v == 0 for v in theirs["image_max_abs_diff"].values())
    assert r["ok"]

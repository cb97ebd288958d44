#!/usr/bin/env bash
# Two side environments with the LeRobot library, for scripts/lerobot_compat.py and
# tests/test_lerobot_compat.py (which use them when present):
#   .venv-lerobot     lerobot 0.3.3 (reads LeRobot v2.1)
#   .venv-lerobot-v3  lerobot 0.4.4 (reads v3.0); shares the first one's torch through a .pth
# LeRobot imports torchvision, and PyPI has torchvision only for CUDA torch builds, which the
# CPU torch pin of .venv cannot load: so these get torch 2.7.1 + torchvision 0.22.1 (CUDA builds,
# about 6 GB; they run on the CPU). Idempotent: an environment that imports lerobot is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
TORCH=("torch==2.7.1" "torchvision==0.22.1")

ready() { [ -x "$1/bin/python" ] && "$1/bin/python" -c "import lerobot.datasets.lerobot_dataset" 2>/dev/null; }

if ! ready .venv-lerobot; then
  echo "creating .venv-lerobot (lerobot 0.3.3, LeRobot v2.1; a CUDA torch build, ~6 GB)"
  "$PY" -m venv .venv-lerobot
  quiet .venv-lerobot/bin/python -m pip install -q "lerobot==0.3.3" "${TORCH[@]}"
fi
if ! ready .venv-lerobot-v3; then
  echo "creating .venv-lerobot-v3 (lerobot 0.4.4, LeRobot v3.0)"
  "$PY" -m venv .venv-lerobot-v3
  base=$(.venv-lerobot/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own=$(.venv-lerobot-v3/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # after its own site-packages: torch, torchvision and the CUDA libraries come from the first
  echo "$(cd "$base" && pwd)" > "$own/zz_lerobot_v21_base.pth"
  quiet .venv-lerobot-v3/bin/python -m pip install -q "lerobot==0.4.4" "${TORCH[@]}"
fi
ready .venv-lerobot && ready .venv-lerobot-v3
echo "LeRobot environments ready: .venv-lerobot (v2.1), .venv-lerobot-v3 (v3.0)"

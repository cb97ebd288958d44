#!/usr/bin/env bash
# Set up vlatune in ./.venv: create it if missing, install what changed, prepare LIBERO.
# A second run with nothing changed takes seconds (a stamp of the install inputs is kept).
#
#   scripts/setup.sh            # CPU machine: torch pinned to 2.13.0 (constraints-cpu.txt)
#   VLATUNE_GPU=1 scripts/setup.sh   # keep the CUDA torch you installed into .venv yourself
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLATUNE_VENV:-.venv}
PY=${PYTHON:-python3}
HF_LIBERO="hf-libero==0.1.4"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
    echo "vlatune needs Python >= 3.10; $("$PY" --version) found. Set PYTHON=/path/to/python3.11." >&2
    exit 1
  }
  echo "creating $VENV"
  "$PY" -m venv "$VENV"
fi

constraints=constraints-cpu.txt
if [ -n "${VLATUNE_GPU:-}" ]; then
  constraints=$(mktemp)
  grep -v '^torch==' constraints-cpu.txt > "$constraints"
fi

stamp="$VENV/.vlatune-setup"
want=$(cat pyproject.toml constraints-cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)${VLATUNE_GPU:+-gpu}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing vlatune with the LIBERO stack into $VENV (a few minutes the first time)"
  # pip's notes about local index folders it skips are noise here
  quiet() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip
  quiet "$VENV/bin/python" -m pip install -q -c "$constraints" -e ".[sim,dev]"
  # hf-libero declares robomimic, wandb, thop, transformers and an unpinned torch that running
  # environments does not need: its real needs come through the sim extra above.
  quiet "$VENV/bin/python" -m pip install -q --no-deps "$HF_LIBERO"
  "$VENV/bin/python" -c 'import vlatune.cli' >/dev/null
  echo "$want" > "$stamp"
fi

# LIBERO config folder, asset link, headless GL check (fast, idempotent)
"$VENV/bin/vlatune" sim setup

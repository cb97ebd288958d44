#!/usr/bin/env bash
# A side environment with TensorFlow and TensorFlow Datasets, for scripts/rlds_compat.py and
# tests/test_rlds_compat.py (which use it when present): `.venv-rlds`, tensorflow-cpu 2.20 +
# tensorflow-datasets 4.9 (about 2 GB; vlatune itself reads and writes RLDS without them).
# vlatune is installed into it without dependencies plus the few it needs to read and write
# RLDS (numpy, pyyaml, pydantic, pillow, google-crc32c, h5py, pyarrow, av), so the check runs vlatune's own code.
# Idempotent: an environment that imports tensorflow_datasets is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }

ready() { [ -x "$1/bin/python" ] && "$1/bin/python" -c "import tensorflow_datasets, av, pyarrow, vlatune.data.formats.rlds" 2>/dev/null; }

if ! ready .venv-rlds; then
  echo "creating .venv-rlds (tensorflow-cpu 2.20, tensorflow-datasets 4.9; about 2 GB)"
  "$PY" -m venv .venv-rlds
  quiet .venv-rlds/bin/python -m pip install -q "tensorflow-cpu==2.20.0" "tensorflow-datasets==4.9.10" \
    "numpy>=1.24" "pyyaml>=6" "pydantic>=2.6" "pillow>=10" "google-crc32c>=1.5" "h5py>=3.9" "pyarrow>=14" "av>=12" "click>=8.1" "rich>=13"
  quiet .venv-rlds/bin/python -m pip install -q --no-deps -e .
fi
ready .venv-rlds
echo "RLDS environment ready: .venv-rlds ($(.venv-rlds/bin/python -c 'import tensorflow as tf, tensorflow_datasets as tfds; print("tensorflow", tf.__version__, "tensorflow-datasets", tfds.__version__)' 2>/dev/null))"

#!/usr/bin/env bash
# Creates .venv (if missing) and installs cowenv with everything it needs.
# PyTorch is pinned to the CPU build *before* stable-baselines3 so that pip does not
# pull a multi-GB CUDA build; the pin lives here, not in the library requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet -e ".[dev,ray]"

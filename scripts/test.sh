#!/usr/bin/env bash
# Sets up .venv (see setup.sh) and runs the whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 tests "$@"

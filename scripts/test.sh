#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m pytest "$@"

#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, the layer contracts, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
# import-linter's contracts in pyproject.toml: serve_app → parallel → standin, inference apart from training
$PY -c 'import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())'
$PY -m pytest "$@"

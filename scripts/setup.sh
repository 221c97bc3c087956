#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: torch first and pinned (a CPU wheel here), then
# the package with every later install held to constraints.txt so pip never swaps torch
# for a CUDA build. Re-installs only when pyproject.toml or constraints.txt change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_torch=$(sed -n 's/^torch==//p' constraints.txt)
have_torch=$($PY -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have_torch" != "$want_torch" ]; then
  $PY -m pip install --quiet "torch==$want_torch"
fi
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
# Where the installed package lives, asked from outside the repo (inside it, the working
# directory would shadow a missing or stale editable install, e.g. one made from another path).
installed=$(cd / && $PY -c 'import pathlib, serve_app, standin; print(pathlib.Path(standin.__file__).resolve().parents[1])' 2>/dev/null || true)
if [ "$(cat .setup-stamp 2>/dev/null)" != "$stamp" ] || [ "$installed" != "$(pwd -P)" ]; then
  $PY -m pip install --quiet -c constraints.txt -e '.[dev]'
  echo "$stamp" > .setup-stamp
fi

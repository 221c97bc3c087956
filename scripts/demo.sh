#!/usr/bin/env bash
# The main job on a fresh machine: set-up, then one identity-preserving video on the
# embedded `tiny` preset (no GPU, no downloads). Writes outputs/demo.mp4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
standin generate --preset tiny \
  --image tests/data/faces/astronaut.jpg \
  --prompt "An astronaut smiles at the camera, then turns to look out of the window." \
  --output outputs/demo.mp4 "$@"

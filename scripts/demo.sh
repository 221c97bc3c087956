#!/usr/bin/env bash
# The main job on a fresh machine: set-up, start the server (a private local Ray cluster with the
# CPU profile of serve_config.yaml: `tiny` preset, 2-rank sequence-parallel DiT), generate one
# identity-preserving video through the HTTP API, write outputs/demo.mp4, then stop the server
# (and only the cluster it started). No GPU, no downloads.
#   PORT=8010 bash scripts/demo.sh      # another port; extra args go to `standin generate`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
PORT=${PORT:-8000}
export STANDIN_STATE_DIR=${STANDIN_STATE_DIR:-$PWD/outputs/serve-state}
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

standin serve --config serve_config.yaml --port "$PORT" > outputs/serve.log 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"   # the server shuts down Serve and its own Ray cluster
    for _ in $(seq 60); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
    kill -0 "$server" 2>/dev/null && kill -KILL "$server"
  fi
  wait "$server" 2>/dev/null || true
}
trap stop_server EXIT

# `--server` waits for GET /healthz (the whole application RUNNING), then submits and polls.
standin generate --server "http://127.0.0.1:$PORT" --wait-ready 600 \
  --image examples/glyph_reference.png --subject object \
  --prompt "moves right on navy" --guidance 3 --seed 1 \
  --output outputs/demo.mp4 "$@" \
  || { echo "generation failed; server log: outputs/serve.log" >&2; tail -n 40 outputs/serve.log >&2; exit 1; }

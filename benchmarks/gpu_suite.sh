#!/usr/bin/env bash
# The GPU suite: what production runs, on this machine's GPUs, in one command (random weights,
# bf16, no checkpoint needed). Everything is in benchmarks/gpu_suite.py; this wrapper only picks
# the interpreter and the repository root.
#
#   benchmarks/gpu_suite.sh                  # 8+ GPUs: 14B at SP 1/2/4/8 × 480p/720p (< 8 min)
#   benchmarks/gpu_suite.sh --mode single    # one GPU: 1.3B, and 14B cut to 8 layers
#   benchmarks/gpu_suite.sh --dry-run        # the plan and its time estimate, no GPU needed
#   RESULTS_DIR=/tmp/r benchmarks/gpu_suite.sh --reps 3
#
# Reports step time, achieved TFLOP/s (benchmarks/flops.py), peak memory per rank, the
# attention kernels that ran, identity overhead, weight-load and VAE decode time, as
# benchmarks/results/gpu_suite_<mode>_<gpu>.json. Without a CUDA GPU it exits with status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu_suite --out-dir "${RESULTS_DIR:-benchmarks/results}" "$@"

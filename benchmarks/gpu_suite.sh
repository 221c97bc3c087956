#!/usr/bin/env bash
# The GPU benchmark suite: one command on a CUDA machine, no checkpoint needed (random weights).
#
#   benchmarks/gpu_suite.sh                 # results in benchmarks/results/
#   RESULTS_DIR=/tmp/r REPS=5 benchmarks/gpu_suite.sh
#
# 1. identity overhead at the real Wan2.1 1.3B and 14B sizes (832×480×81 → 32,760 video tokens,
#    1,024 identity tokens, 512 text tokens), bf16, with achieved TFLOP/s against the FLOP count
#    of a forward (benchmarks/flops.py: every matmul incl. attention and the identity tokens);
# 2. the tiny pipeline breakdown on the GPU;
# 3. the sequence-parallel bench (benchmarks/sp_bench.py) over SP degrees 1, 2, 4, 8 up to the
#    GPUs present.
# Without a CUDA GPU it stops at once with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${RESULTS_DIR:-benchmarks/results}
REPS=${REPS:-10}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_suite.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False)." >&2
    echo "On a CPU machine run: python -m benchmarks.model identity --threads 1" >&2
    exit 2
fi

GPU=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
mkdir -p "$OUT"
echo "== GPU suite on ${NGPU}× ${GPU} → ${OUT}"

echo "== identity overhead, real sizes, bf16"
"$PY" -m benchmarks.model identity --device cuda --dtype bfloat16 --reps "$REPS" \
    --presets wan2.1-t2v-1.3b wan2.1-t2v-14b --out-dir "$OUT" --name "identity_overhead_${GPU}"

echo "== pipeline breakdown, tiny preset"
"$PY" -m benchmarks.model breakdown --device cuda --reps 3 --out-dir "$OUT" --name "pipeline_breakdown_tiny_${GPU}"

if [ -f benchmarks/sp_bench.py ]; then
    DEGREES=""
    for d in 1 2 4 8; do
        if [ "$d" -le "$NGPU" ]; then DEGREES="$DEGREES $d"; fi
    done
    echo "== sequence-parallel bench, degrees:${DEGREES}"
    # shellcheck disable=SC2086  # DEGREES is a list of numbers
    "$PY" -m benchmarks.sp_bench --device cuda --degrees $DEGREES --out "$OUT/sp_bench_${GPU}.json"
else
    echo "== benchmarks/sp_bench.py not present: sequence-parallel bench skipped"
fi

echo "== achieved TFLOP/s (median DiT call)"
"$PY" - "$OUT/identity_overhead_${GPU}.json" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["results"]:
    print(f"{r['preset']:>16}: forward {r['flops']['forward'] / 1e12:8.1f} TFLOP, "
          f"{1000 * r['median_s']['standin_cached']:8.1f} ms → {r['achieved_tflops']['standin_cached']:6.1f} TFLOP/s; "
          f"cached ×{r['ratio_to_wan']['standin_cached']:.3f}, uncached ×{r['ratio_to_wan']['standin_uncached']:.3f} of Wan2.1")
PYEOF

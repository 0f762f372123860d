#!/usr/bin/env bash
# One device call: cold JIT build, warm load in a second process, GPU tests, benchmark.
# Usage (on the device machine, from the repo root): bash bench/device_run.sh  (logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/svdq-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SVDQ_CACHE_DIR=${SVDQ_CACHE_DIR:-/tmp/svdq-cache}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1 | tee "$OUT/gpu.txt"
echo "== cold build"; { time python3 -m svdq.build; } 2>&1 | tee "$OUT/build.log"
echo "== warm load (second process)"; { time python3 -m svdq.build; } 2>&1 | tee -a "$OUT/build.log"
echo "== tests"; timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --maxfail=${MAXFAIL:-15} tests/test_cuda_kernels.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -25
echo "== bench"; timeout ${BENCH_TIMEOUT:-240} python3 bench/linear.py --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40

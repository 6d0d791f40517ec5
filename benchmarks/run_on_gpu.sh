#!/usr/bin/env bash
# One device-machine call: install attnhub (and FA4 when its wheels were carried), run the GPU
# tests, the Triton conformance tier and the benchmark; everything lands in $OUT.
# Usage on the device: bash benchmarks/run_on_gpu.sh [quick|full]
set -uo pipefail
export PYTHONUNBUFFERED=1
tier=${1:-quick}
out=${OUT:-/tmp/attnhub-out}
mkdir -p "$out"
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -25 | tee "$out/pytest-gpu.log"
attnhub conformance --backend triton --device cuda --tier "$tier" \
  --report "$out/conformance-triton-$tier.md" --json "$out/conformance-triton-$tier.json" \
  2>&1 | tail -30
python3 benchmarks/bench_attention.py --out "$out/bench.md" 2>&1 | tee "$out/bench.log" | tail -60

#!/usr/bin/env bash
# One device-machine call of `attnhub bench` (docs/bench.md): install attnhub (and FA4 when its
# wheels were carried), then the matrix on the GPU, stopping new cells after 520 s so that the
# call ends within 10 minutes; the report lands in $OUT/bench (bench.md, bench.json, bench.png).
# Usage on the device: bash benchmarks/bench_on_gpu.sh [attnhub bench options, e.g. --part 1/2]
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/attnhub-out}
mkdir -p "$out"
source benchmarks/gpu_env.sh || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
attnhub bench --device cuda --time-limit 520 --output "$out/bench" "$@" \
  2> "$out/bench.log"
rc=$?
tail -n 25 "$out/bench.log"
[ -f "$out/bench/bench.md" ] && sed -n '/^## Forward: /,/^## Detail/p' "$out/bench/bench.md"
exit $rc

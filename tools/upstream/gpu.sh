#!/usr/bin/env bash
# One device-machine call: install attnhub, run flash-attention's and FlashInfer's upstream
# test files through the import shim (docs/upstream-suites.md), reports into $OUT.
# Needs .upstream/ carried (python tools/upstream/run.py fetch ..., plus
# .upstream/wheels/einops-*.whl). Usage: bash tools/upstream/gpu.sh [SAMPLE] [JOBS] [SUITES]
# (SUITES: "flash_attn flashinfer" by default; one suite per call keeps each under 10 min)
set -uo pipefail
export PYTHONUNBUFFERED=1
sample=${1:-6}
jobs=${2:-8}
suites=${3:-flash_attn flashinfer}
out=${OUT:-/tmp/attnhub-out}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
cp .upstream/SOURCES.txt "$out/" 2>/dev/null
status=0
for suite in $suites; do
  start=$(date +%s)
  python3 tools/upstream/run.py run --suite "$suite" --sample "$sample" --jobs "$jobs" \
    --out "$out/upstream" 2>&1 | tee "$out/upstream-$suite.log" | tail -45
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "$suite: $(( $(date +%s) - start )) s" | tee -a "$out/timings.txt"
done
exit $status

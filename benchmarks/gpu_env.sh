# Sourced by the device-machine scripts (run_on_gpu.sh, bench_on_gpu.sh): installs attnhub from
# the working tree without dependencies and, when FA4's wheels were carried (.fa4b plus
# /root/fa4/part_aa on the machine), FA4 into /tmp/site; FA4 installed there by an earlier call
# on the same machine goes on PYTHONPATH too. FA4 and Triton keep their compiled kernels on disk
# (/root/fa4-cache, ~/.triton) for the machine's later calls. Needs $out; logs to
# $out/install.log; returns 1 when attnhub does not install.
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || return 1
if [ -d .fa4b ] && [ -f /root/fa4/part_aa ] && [ ! -d /tmp/site/flash_attn ]; then
  cat /root/fa4/part_aa .fa4b/part_ab > "/tmp/$(cat .fa4b/BIG_WHEEL_NAME)"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/*.whl .fa4b/*.whl \
    >> "$out/install.log" 2>&1
fi
if [ -d /tmp/site/flash_attn ]; then
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/root/fa4-cache
fi

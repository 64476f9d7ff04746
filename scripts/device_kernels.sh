#!/usr/bin/env bash
# GPU tests of the Triton kernels, then the kernel benchmark; logs, CSV and plot under $OUT (or ./out).
# Usage: bash scripts/device_kernels.sh [benchmark args...]
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
[ -n "${SKIP_TESTS:-}" ] || VSA_TRITON_AUTOTUNE=${GPU_TESTS_AUTOTUNE:-0} timeout 250 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_gpu.py -k "${GPU_TESTS:-}" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -n 25
timeout ${BENCH_TIMEOUT:-320} python3 scripts/benchmark_kernels.py --csv "$OUT/bench.csv" --plot "$OUT/bench.png" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^ *warnings.warn\|UserWarning"

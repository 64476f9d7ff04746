#!/usr/bin/env bash
# On a CUDA machine (H100/H200): the Triton kernels' GPU tests, then the kernel benchmark: ~5-6 min (7.5 at the timeouts).
#
#   bash scripts/device_kernels.sh [extra benchmark_kernels.py args...]      # logs under $OUT (default ./out)
#
# 1. pytest tests/test_gluon_fwd.py tests/test_gluon_bwd.py tests/test_triton_gpu.py tests/test_tuning.py
#    (timeout 240 s): the Gluon kernels against the Triton ones and float64 (ragged keys, padded queries,
#    both backward walks), fwd/bwd vs float64, deterministic backward bit-identical, pointer path forced,
#    every config of the single-pass backward. Prints the pytest summary.
# 2. scripts/benchmark_kernels.py (timeout 300 s; ssta720p first, its table printed as soon as it is done), one process, do_bench medians, cases ssta720p
#    (HunyuanVideo-1.5 720p/121f SSTA mask) and sta46k (STA, S=46k), B=1 H=16 D=128 bf16. For each case
#    a table: rows tma (the defaults: the Gluon kernels on sm90), stepwise (the Gluon backward without
#    the next step's S^T under the dQ adds), triton (the Triton kernels on sm90), ptr (pointer loads
#    forced, the Ampere/Ada path), det (deterministic two-pass backward) — VARIANTS overrides, ROUNDS=N
#    times them N times in alternating order (medians) — and flex (compiled FlexAttention, same mask); columns fwd ms, TFLOP/s,
#    FlexAttention time / ours, the same for bwd, and rel. L2 of out / worst gradient vs FlexAttention.
#    Kernel families missing from the shipped tuning table (the single-pass backward) are autotuned;
#    the picks are printed at the end and saved in $OUT/tuning_cache.json. CSV: $OUT/bench.csv.
#    Then, on an H200, scripts/compare_benchmarks.py against benchmarks/kernels_h200_v7.csv (each variant's
#    time relative to FlexAttention in the same run; +5% is flagged as a regression).
# 3. Optional (FIRST_CALL=1, ~1 min): first-call latency of a fresh process at 720p (issue 14): once with
#    an empty Triton cache (compile; tuning from the shipped table + $OUT/tuning_cache.json), once more
#    reusing that Triton cache.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== GPU tests"
    timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_gluon_fwd.py \
        tests/test_gluon_bwd.py tests/test_triton_gpu.py tests/test_tuning.py \
        -k "${GPU_TESTS:-}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
fi

echo "== benchmark"
timeout ${BENCH_TIMEOUT:-300} python3 scripts/benchmark_kernels.py --cases ssta720p sta46k \
    --variants ${VARIANTS:-tma stepwise triton ptr det} --rounds ${ROUNDS:-1} --skip-cudnn \
    --csv "$OUT/bench.csv" --plot "$OUT/bench.png" --tuning-cache "$OUT/tuning_cache.json" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^ *warnings.warn\|UserWarning"

# the guard: each variant's time relative to FlexAttention against the recorded H200 run (+5% = regression)
BASELINE=${BASELINE:-benchmarks/kernels_h200_v7.csv}
if [ -f "$BASELINE" ] && [ -f "$OUT/bench.csv" ] && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    echo "== against $BASELINE"
    python3 scripts/compare_benchmarks.py "$BASELINE" "$OUT/bench.csv" | tail -n 25
fi

if [ -n "${FIRST_CALL:-}" ]; then
    echo "== first call in a fresh process (720p/121f, fwd+bwd)"
    export VSA_TUNING_CACHE="$OUT/tuning_cache.json" TRITON_CACHE_DIR="$OUT/triton_cache_first_call"
    rm -rf "$TRITON_CACHE_DIR"
    for run in "empty Triton cache" "warm Triton cache"; do
        timeout 120 python3 -c "
import time, torch
t = time.perf_counter()
from video_sparse_attn.warmup import warmup
s = warmup((1, 16, (31, 45, 80), 128, torch.bfloat16, 384))
print(f'$run: first fwd+bwd {s[0]:.2f} s (process {time.perf_counter() - t:.2f} s)')
" 2>&1 | tail -n 3
    done
    rm -rf "$TRITON_CACHE_DIR"
fi

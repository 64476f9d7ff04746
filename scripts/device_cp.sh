#!/usr/bin/env bash
# SSTA under Ulysses context parallelism on one host: the 720p / 121-frame HunyuanVideo-1.5 block at
# degree N (default 2) vs 1. Log under $OUT (or ./out).
# Usage: bash scripts/device_cp.sh [benchmark_context_parallel.py args...]
set -o pipefail
OUT=${OUT:-out}
NPROC=${NPROC:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${BENCH_TIMEOUT:-240} torchrun --standalone --nproc_per_node "$NPROC" scripts/benchmark_context_parallel.py "$@" 2>&1 \
    | tee "$OUT/cp_bench.log" | grep -v "Warning\|warnings.warn\|^W[0-9]\|experimental feature"

#!/usr/bin/env bash
# On a CUDA machine (H100/H200, FA4 extra installed for the fa4 rows): the SSTA numbers the README
# reports, in one go (~6-7 min; logs and CSV/JSON under $OUT, default ./out).
#
#   PYTHONPATH=$PWD bash scripts/device_ssta.sh
#
# 1. scripts/benchmark_ssta.py (fa4, triton): kernels alone, the parts around them, ssta_attention
#    end to end, exact dense baseline (cuDNN over valid tokens).           -> $OUT/ssta.json
# 2. scripts/benchmark_kernels.py --cases plain gqa causal varlen: the library parity cases beside
#    FlexAttention, per kept block relative to the plain case.           -> $OUT/parity.csv
# 3. scripts/benchmark_transformer.py --modes cudnn_valid ssta --compile: one HunyuanVideo-1.5 block,
#    eager and compiled (needs diffusers).                                -> $OUT/block.csv
# 4. scripts/benchmark_finetune_step.py: one fine-tuning step, stock vs SSTA through Triton and FA4 (needs diffusers).
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name --format=csv,noheader
step() {   # step NAME TIMEOUT CMD...: run, keep the log, print its table lines
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || echo "($name: exit $?, see $OUT/$name.log)"
    grep -E '^\||ms|×|x ' "$OUT/$name.log" | grep -v -i warn | tail -40
}
step ssta 240 $PY scripts/benchmark_ssta.py --backends fa4,triton --no-flex --json "$OUT/ssta.json"
step parity 360 $PY scripts/benchmark_kernels.py --cases plain gqa causal varlen varlen_plan --backend auto --csv "$OUT/parity.csv"
step block 300 $PY scripts/benchmark_transformer.py --modes cudnn_valid ssta --compile --csv "$OUT/block.csv"
step finetune 200 $PY scripts/benchmark_finetune_step.py --json "$OUT/finetune.json"

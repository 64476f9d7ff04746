#!/usr/bin/env bash
# First-call latency of a fresh process at HunyuanVideo-1.5 720p/121f (B=1 H=16 D=128 bf16, 384-token
# tiles), run on the CUDA machine from the repository root (~2-3 min; each process at most 150 s):
#
#   PYTHONPATH=$PWD bash scripts/device_first_call.sh          # logs and JSON lines under $OUT (default ./out)
#
# Every process is `scripts/first_call.py` (one JSON line: import, setup, first forward / backward, the
# same call again). Caches live in fresh directories under $OUT/first_call:
#   triton p1        empty Triton cache, empty tuning cache (shipped table only)      target <= 5 s
#   triton p2        the same caches, now warm                                         target <= 1.5 s
#   triton fwd p1    forward only (inference, --no-backward), empty caches again
#   fa4 p1 / p2      --backend fa4, empty then warm FLASH_ATTENTION_CUTE_DSL_CACHE_DIR (skipped if fa4 is absent)
#   warmup+call      `python -m video_sparse_attn warmup` in one process (empty caches), then a first call
# Then a table of the JSON lines.
set -o pipefail
OUT=${OUT:-out}
ROOT="$OUT/first_call"
rm -rf "$ROOT"
mkdir -p "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$ROOT/results.jsonl"
: > "$LOG"
nvidia-smi --query-gpu=name --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"

fresh() {   # fresh cache directories named $1 for Triton, the tuning cache and FA4
    mkdir -p "$ROOT/$1/triton" "$ROOT/$1/fa4"
    export TRITON_CACHE_DIR="$ROOT/$1/triton" VSA_TUNING_CACHE="$ROOT/$1/tuning.json"
    export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR="$ROOT/$1/fa4"
}

run() {     # run LABEL ARGS...: one first_call.py process, its JSON line appended to $LOG
    local label=$1; shift
    local t0=$SECONDS
    if timeout 150 $PY scripts/first_call.py --label "$label" "$@" > "$ROOT/$label.log" 2>&1; then
        grep '^{' "$ROOT/$label.log" | tail -1 | sed "s/}\$/, \"wall_s\": $((SECONDS - t0))}/" >> "$LOG"
    else
        echo "{\"label\": \"$label\", \"error\": \"rc $? (see $ROOT/$label.log)\", \"wall_s\": $((SECONDS - t0))}" >> "$LOG"
        tail -5 "$ROOT/$label.log"
    fi
    tail -1 "$LOG"
}

fresh triton
run "triton p1" --backend triton
run "triton p2" --backend triton

fresh triton_fwd
run "triton fwd p1" --backend triton --no-backward

if $PY -c "from video_sparse_attn.kernels.registry import fa4_importable as f; import sys; sys.exit(f() is not None)"; then
    fresh fa4
    run "fa4 p1" --backend fa4
    run "fa4 p2" --backend fa4
else
    echo "fa4 not importable here: skipped"
fi

fresh warm
t0=$SECONDS
if timeout 150 $PY -m video_sparse_attn warmup --heads 16 --head-dim 128 --tile 6,8,8 --dtype bfloat16 \
        --backend triton > "$ROOT/warmup.log" 2>&1; then
    echo "{\"label\": \"warmup cmd\", \"process_s\": $((SECONDS - t0)), \"said\": \"$(tail -1 "$ROOT/warmup.log" | tr -d '"')\"}" >> "$LOG"
else
    echo "{\"label\": \"warmup cmd\", \"error\": \"rc $?\"}" >> "$LOG"; tail -5 "$ROOT/warmup.log"
fi
run "after warmup" --backend triton

$PY - "$LOG" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
cols = ["import_s", "setup_s", "first_fwd_s", "first_bwd_s", "first_call_s", "second_fwd_s", "second_bwd_s", "wall_s"]
print("| run | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for r in rows:
    if "error" in r or "said" in r:
        print(f"| {r['label']} | {r.get('error') or r['said']} (process {r.get('process_s', '?')} s) |")
        continue
    print(f"| {r['label']} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
EOF

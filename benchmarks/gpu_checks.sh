#!/usr/bin/env bash
# Every GPU check of one short lease, most valuable first, each under its own time limit. Results go to
# $OUT/results.jsonl (one {"check": ..., "rc": ..., "result": <the command's JSON>} line per check, written as each
# ends, so a lease cut short still returns what finished) and stderr to $OUT/errors.log. Runs from the repository
# root without installing (PYTHONPATH=src). ONLY="name ..." runs those checks alone; DRY=1 runs the same sequence
# on the CPU in tiny configurations.
#
#   bash benchmarks/gpu_checks.sh                 # on a GPU machine
#   DRY=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_checks.sh
#
# Checks: the bf16/TF32/fp32 matmul rates; the official 8B InfinityStar, random weights, at 480p (81 frames) with
# the packed forward under each attention backend (FlexAttention vs SDPA equality) and at 720p, memory and time
# per stage (compare with `infinitystar plan`, docs/gpu.md), 480p with --token-chunk 4096 (the 24 GB card's
# setting) and with the allocator's trace replayed at the peak (--peak-breakdown); the built-in model's generator
# training step; sparse vs dense generation as videos grow.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=python3
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; GPU_ARGS="--dry-run --peak-tflops 1"; WIDTH=64; DEPTH=2; CLIPS="1 2"
else
  DEV=cuda; GPU_ARGS="--no-plan"; WIDTH=1024; DEPTH=8; CLIPS="1 2 4"
fi

check() {   # check NAME SECONDS COMMAND...: one line of results.jsonl, "result" = the command's JSON lines
  local name=$1 limit=$2 rc out
  shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "== $name ($(date +%T))" | tee -a "$OUT/errors.log"
  timeout "$limit" "$@" > "$OUT/stdout.tmp" 2>>"$OUT/errors.log"
  rc=$?
  out=$(grep '^{' "$OUT/stdout.tmp" | paste -sd, -)
  rm -f "$OUT/stdout.tmp"
  echo "{\"check\": \"$name\", \"rc\": $rc, \"result\": [$out]}" >> "$OUT/results.jsonl"
  echo "rc=$rc ${out:0:400}"
}

{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee -a "$OUT/errors.log"
check matmul 40 $PY -c "
import json, torch
from infinitystar.bench import matmul_rate
d = torch.device('$DEV')
torch.backends.cuda.matmul.allow_tf32 = False
r = {'bf16': matmul_rate(d, torch.bfloat16, n=8192 if d.type == 'cuda' else 1024),
     'fp32': matmul_rate(d, torch.float32, n=8192 if d.type == 'cuda' else 1024)}
torch.backends.cuda.matmul.allow_tf32 = True
r['tf32'] = matmul_rate(d, torch.float32, n=8192 if d.type == 'cuda' else 1024)
print(json.dumps(r))"
check gpu_480p_flex 170 $PY benchmarks/gpu.py $GPU_ARGS --flex --json --resolution 480p
check gpu_480p_chunk4096 110 $PY benchmarks/gpu.py $GPU_ARGS --json --resolution 480p --token-chunk 4096
check gpu_480p_breakdown 150 $PY benchmarks/gpu.py $GPU_ARGS --json --resolution 480p --peak-breakdown
# a 24 GiB card holds ~23 GiB for the process (the CUDA context and the driver take the rest); 21.4 GiB (23 GB)
# with token chunks of 4096 and 2048 ran out of memory in the transformer stage (2026-12-04)
check gpu_480p_cap23gib 110 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $PY benchmarks/gpu.py \
  $GPU_ARGS --json --resolution 480p --memory-cap-gib 23
check gpu_480p_cap23gib_chunk4096 110 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $PY benchmarks/gpu.py \
  $GPU_ARGS --json --resolution 480p --token-chunk 4096 --memory-cap-gib 23
check gpu_720p 150 $PY benchmarks/gpu.py $GPU_ARGS --json --resolution 720p
check train_default_auto 80 $PY -m infinitystar.cli bench --train --device $DEV --precision auto --steps 5 --json
check sparse_vs_dense 80 $PY -m infinitystar.cli bench --device $DEV --clips $CLIPS --width $WIDTH --depth $DEPTH --json
echo "done $(date +%T)"

#!/usr/bin/env bash
# The validation measures a candidate built-in model is chosen on (docs/default_model.md, "Reproducing and extending"):
# text-to-image with 4 samples per prompt on prompt seeds 3 and 4, every other task once per prompt on seed 3,
# 200 prompts each. The evaluation's own seed 0 is kept for the report. Compare two models' folders with
# scripts/compare_evals.py.
#
#   THREADS=2 bash scripts/validate_model.sh MODEL OUT [t2i3 t2i4 t2v3 i2v3 continuation3 long3]
#
# Each measure writes OUT/<name>/ (samples.jsonl, results.json, grid.png) and is skipped when its results exist,
# so an interrupted run resumes. Two cores: ~45 min in all, most of it the long videos.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MODEL OUT [measure ...]" >&2; exit 2; }
model=$1; out=$2; shift 2
measures=("$@"); [ ${#measures[@]} -gt 0 ] || measures=(t2i3 t2i4 t2v3 i2v3 continuation3 long3)
export OMP_NUM_THREADS="${THREADS:-2}"
for m in "${measures[@]}"; do
  task=${m%?}; seed=${m: -1}; k=1; [ "$task" = t2i ] && k=4
  [ -f "$out/$m/results.json" ] && continue
  infinitystar eval shapes --model "$model" --n 200 --seed "$seed" --tasks "$task" --samples-per-prompt $k \
    --out-dir "$out/$m"
done

#!/usr/bin/env bash
# Run several 75-epoch screens at once on one GPU machine, each into runs/NAME, and copy each run's record
# (results.json, metrics.csv, log) to $OUT/NAME. One screen per line of the SCREENS file: NAME, then the command's
# arguments after `python` (model_train.py or experiments/recipe.py and its flags). Workers are split evenly.
#   bash experiments/gpu_screen.sh SCREENS_FILE
# The data must be in ./data already (experiments/gpu_data.py unpack, one call per part).
set -u
screens=${1:?give a SCREENS file}
n=$(grep -cv '^\s*\(#\|$\)' "$screens")
workers=$(( ($(nproc) - 1) / n )); [ "$workers" -ge 1 ] || workers=1
python -m pip install -q -r requirements.txt 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>/dev/null || echo "no nvidia-smi"
while read -r name args; do
  case "$name" in ''|'#'*) continue ;; esac
  mkdir -p "runs/$name"
  # shellcheck disable=SC2086
  (python $args --out-dir "runs/$name" --workers "$workers" > "runs/$name/log.txt" 2>&1; echo "exit $?" >> "runs/$name/log.txt") &
done < "$screens"
wait
for dir in runs/*/; do
  name=$(basename "$dir"); mkdir -p "${OUT:-out}/$name"
  cp "$dir"/results.json "$dir"/metrics.csv "$dir"/log.txt "${OUT:-out}/$name/" 2>/dev/null
  grep -h '"best_test_acc"\|"last_test_acc"\|"training_minutes"' "$dir/results.json" 2>/dev/null | tr -d '\n'; echo " $name"
done

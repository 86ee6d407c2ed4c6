#!/usr/bin/env bash
# Run several 75-epoch screens at once on one GPU machine, each into runs/NAME, and copy each run's record
# (results.json, metrics.csv, log) to $OUT/NAME. One screen per line of the SCREENS file: NAME, then the command's
# arguments after `python` (model_train.py or experiments/recipe.py and its flags). Workers are split evenly.
#   LIMIT=540 bash experiments/gpu_screen.sh SCREENS_FILE
# The data must be in ./data already (experiments/gpu_data.py unpack, one call per part). A device call runs at most
# 10 minutes: after LIMIT seconds (default 540) the runs still going get a Ctrl-C, which saves their finished epochs;
# their last_checkpoint.pth and best_model.pth come back too, and the next call of this script (on the same machine,
# or with runs/ carried) continues each with --resume.
set -u -m  # -m: each run in its own process group, so a Ctrl-C (SIGINT) reaches it; bash ignores it for & otherwise
screens=${1:?give a SCREENS file}
n=$(grep -cv '^\s*\(#\|$\)' "$screens")
workers=$(( ($(nproc) - 1) / n )); [ "$workers" -ge 1 ] || workers=1
python -m pip install -q -r requirements.txt 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>/dev/null || echo "no nvidia-smi"
names=(); pids=()
while read -r name args; do
  case "$name" in ''|'#'*) continue ;; esac
  mkdir -p "runs/$name"
  resume=(); [ -f "runs/$name/last_checkpoint.pth" ] && resume=(--resume "runs/$name/last_checkpoint.pth")
  # shellcheck disable=SC2086
  python $args --out-dir "runs/$name" --workers "$workers" "${resume[@]}" >> "runs/$name/log.txt" 2>&1 &
  names+=("$name"); pids+=($!)
done < "$screens"
end=$((SECONDS + ${LIMIT:-540}))
while [ "$SECONDS" -lt "$end" ] && [ -n "$(jobs -r)" ]; do sleep 2; done
for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null; done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; echo "exit $?" >> "runs/${names[$i]}/log.txt"
done
for name in "${names[@]}"; do
  dir=runs/$name; mkdir -p "${OUT:-out}/$name"
  cp "$dir"/results.json "$dir"/metrics.csv "$dir"/log.txt "${OUT:-out}/$name/" 2>/dev/null
  grep -q '"finished": true' "$dir/results.json" 2>/dev/null || \
    cp "$dir"/last_checkpoint.pth "$dir"/best_model.pth "${OUT:-out}/$name/" 2>/dev/null
  grep -h '"best_test_acc"\|"last_test_acc"\|"epochs_done"\|"training_minutes"' "$dir/results.json" 2>/dev/null \
    | tr -d '\n'; echo " $name"
done

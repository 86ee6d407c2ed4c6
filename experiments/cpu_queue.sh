#!/usr/bin/env bash
# Works through a queue of CPU runs of experiments/recipe.py, one at a time, each into RUNS/NAME: a finished run is
# skipped and a stopped one resumed, so each session restarts the queue with the same command, from the repository root:
#
#   nohup bash experiments/cpu_queue.sh [QUEUE] [RUNS] >> RUNS/queue.log 2>&1 &
#
# QUEUE (default experiments/screens/cpu_queue.txt) has a line "NAME PARTS SEED [model_train.py flags]" per run.
# RECIPE and MODEL_TRAIN_DIR may name a frozen copy of recipe.py and of the folder holding model_train.py, so that
# commits made while a run goes on do not change it.
set -u
here=$(cd "$(dirname "$0")" && pwd)
queue=${1:-$here/screens/cpu_queue.txt}
runs=${2:-runs}
recipe=${RECIPE:-$here/recipe.py}
mkdir -p "$runs"
exec 9> "$runs/.queue.lock"
flock -n 9 || { echo "another cpu_queue.sh is working in $runs; not starting a second"; exit 1; }
grep -v '^[[:space:]]*\(#\|$\)' "$queue" | while read -r name parts seed flags; do
  out=$runs/$name
  if [ -f "$out/results.json" ] && grep -q '"training_minutes"' "$out/results.json"; then
    continue  # finished, final report written
  fi
  echo "$(date '+%F %T') $name: --parts $parts --seed $seed $flags"
  if [ -f "$out/last_checkpoint.pth" ]; then
    python "$recipe" --parts "$parts" --resume "$out/last_checkpoint.pth" < /dev/null
  else
    # shellcheck disable=SC2086  # the flags are words
    python "$recipe" --parts "$parts" --seed "$seed" --out-dir "$out" $flags < /dev/null
  fi || { status=$?; echo "$(date '+%F %T') $name stopped (exit $status); the queue stops here"; exit 1; }
done

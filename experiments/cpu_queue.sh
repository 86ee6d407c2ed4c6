#!/usr/bin/env bash
# Works through a SCREENS file (the format gpu_screen.sh reads: NAME, then the arguments after `python`) one run at a
# time on the CPU, each into RUNS/NAME: a finished run is skipped and a stopped one resumed, so each session restarts
# the queue with the same command, from the repository root:
#
#   nohup bash experiments/cpu_queue.sh [SCREENS] [RUNS] >> RUNS/queue.log 2>&1 &
#
# SCREENS defaults to experiments/screens/issue57_58.txt, RUNS to runs. So that commits made while a run goes on do not
# change it, run the queue from a frozen copy of the repository (git worktree add ../frozen) with RUNS outside it.
set -u
screens=${1:-experiments/screens/issue57_58.txt}
runs=${2:-runs}
mkdir -p "$runs"
exec 9> "$runs/.queue.lock"
flock -n 9 || { echo "another cpu_queue.sh is working in $runs; not starting a second"; exit 1; }
grep -v '^[[:space:]]*\(#\|$\)' "$screens" | while read -r name args; do
  out=$runs/$name
  if grep -qs '"training_minutes"' "$out/results.json"; then
    continue  # finished, final report written
  fi
  resume=(); [ -f "$out/last_checkpoint.pth" ] && resume=(--resume "$out/last_checkpoint.pth")
  echo "$(date '+%F %T') $name: python $args ${resume[*]}"
  # shellcheck disable=SC2086  # the arguments are words
  python $args --out-dir "$out" "${resume[@]}" < /dev/null \
    || { status=$?; echo "$(date '+%F %T') $name stopped (exit $status); the queue stops here"; exit 1; }
done

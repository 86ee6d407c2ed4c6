#!/usr/bin/env bash
# Works through a SCREENS file (the format gpu_screen.sh reads: NAME, then the arguments after `python`) on the CPU,
# each run into RUNS/NAME: a finished run is skipped and a stopped one resumed, so each session restarts the queue with
# the same command, from the repository root:
#
#   nohup bash experiments/cpu_queue.sh [SCREENS] [RUNS] >> RUNS/queue.log 2>&1 &
#
# SCREENS defaults to experiments/screens/issue57_58.txt, RUNS to runs. LANES=2 runs two at a time (the runs left,
# dealt in turn to the lanes, one after another in each), one thread each: on 2 cores two such runs trained 1.2-1.3
# times the images of one run with both threads (docs/experiments.md), and with two threads each both would crawl.
# So that commits made while a run goes on do not change it, run the queue from a frozen copy of the repository
# (git worktree add ../frozen) with RUNS outside it.
set -u
screens=${1:-experiments/screens/issue57_58.txt}
runs=${2:-runs}
lanes=${LANES:-1}
mkdir -p "$runs"
exec 9> "$runs/.queue.lock"
flock -n 9 || { echo "another cpu_queue.sh is working in $runs; not starting a second"; exit 1; }
[ "$lanes" -gt 1 ] && export OMP_NUM_THREADS=1
left=()
while read -r line; do
  grep -qs '"training_minutes"' "$runs/${line%%[[:space:]]*}/results.json" || left+=("$line")  # finished: skipped
done < <(grep -v '^[[:space:]]*\(#\|$\)' "$screens")

lane() {  # runs left number $1, $1 + lanes, ... one after another
  local i name args out resume
  for ((i = $1; i < ${#left[@]}; i += lanes)); do
    read -r name args <<< "${left[$i]}"
    out=$runs/$name
    resume=(); [ -f "$out/last_checkpoint.pth" ] && resume=(--resume "$out/last_checkpoint.pth")
    echo "$(date '+%F %T') $name: python $args ${resume[*]}"
    # shellcheck disable=SC2086  # the arguments are words
    python $args --out-dir "$out" "${resume[@]}" < /dev/null \
      || { echo "$(date '+%F %T') $name stopped (exit $?); its lane stops here"; return 1; }
  done
}
for ((l = 0; l < lanes; l++)); do lane "$l" & done
wait

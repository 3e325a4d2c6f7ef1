#!/usr/bin/env bash
# Issue 19 on a machine with several GPUs: one replication run per GPU, all at once.
#
#   OUT=$OUT JOBS="1:mxfp4 0:nvfp4_no_rht 0:nvfp4_no_sr 0:nvfp4_no_2d" SESSION=s15 \
#     LIMIT_S=570 bash bench/gpu_replicate_multi.sh
#
# JOBS: SEED:RUN pairs (whitespace-separated, each distinct); job i runs on the i-th visible
# GPU (CUDA_VISIBLE_DEVICES as set, else 0, 1, ...; at most one job per GPU) as
# bench/gpu_replicate.sh with that SEED and RUNS=RUN, its copies under $OUT/job<i> and its
# output in $OUT/job<i>.log (the tail is printed). The corpus is built once, before the jobs
# start; the jobs share it and the per-seed run folders (each run's files are its own). As
# with gpu_replicate.sh, a run's checkpoint cannot leave the machine: call this back to back,
# with the same arguments, until it prints "all done". A job that exits non-zero is reported
# and makes this exit 1. Other gpu_replicate.sh settings (TOKENS, MAX_BYTES, TRAIN_ARGS, EVAL,
# MARGIN_S, CORPUS, RUNS_DIR as a prefix: <RUNS_DIR>_seed<SEED>) pass through; FORK does
# not apply (one run per job).
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT}" "${JOBS:?set JOBS, e.g. 1:mxfp4 0:nvfp4_no_rht}"
T0=$(date +%s); LIMIT_S=${LIMIT_S:-560}
read -r -d '' -a jobs <<< "$JOBS" || true
if (( ${#jobs[@]} == 0 )); then
  echo "JOBS holds no SEED:RUN entry" >&2; exit 2
fi
for job in "${jobs[@]}"; do
  if ! [[ $job =~ ^[0-9]+:[A-Za-z0-9_]+$ ]]; then
    echo "JOBS entry '$job' is not SEED:RUN (e.g. 0:nvfp4_no_rht)" >&2; exit 2
  fi
done
if (( $(printf '%s\n' "${jobs[@]}" | sort -u | wc -l) != ${#jobs[@]} )); then
  echo "JOBS lists an entry twice: two processes would train the same run" >&2; exit 2
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null; then
  mapfile -t devices < <(seq 0 $(( $(nvidia-smi -L | grep -c '^GPU ') - 1 )))
else  # no GPU (a CPU trial): the job index
  mapfile -t devices < <(seq 0 $(( ${#jobs[@]} - 1 )))
fi
if (( ${#jobs[@]} > ${#devices[@]} )); then
  echo "${#jobs[@]} jobs but ${#devices[@]} GPUs: one job per GPU" >&2; exit 2
fi
export CORPUS=${CORPUS:-/tmp/corpus}
mkdir -p "$OUT"
if [ ! -f "$CORPUS/manifest.json" ]; then
  python3 bench/corpus.py --out "$CORPUS" --max-bytes "${MAX_BYTES:-400000000}" \
    > "$OUT/corpus.log" 2>&1 || { tail -20 "$OUT/corpus.log"; exit 1; }
fi
pids=()
for i in "${!jobs[@]}"; do
  seed=${jobs[$i]%%:*}; run=${jobs[$i]#*:}
  echo "job$i: ${jobs[$i]} on GPU ${devices[$i]}"
  CUDA_VISIBLE_DEVICES=${devices[$i]} OUT=$OUT/job$i SEED=$seed RUNS=$run FORK= \
    RUNS_DIR=${RUNS_DIR:-/tmp/replicate}_seed$seed SITE=/tmp/site_job$i \
    LIMIT_S=$(( LIMIT_S - ($(date +%s) - T0) )) bash bench/gpu_replicate.sh \
    > "$OUT/job$i.log" 2>&1 &
  pids+=($!)
done
done_all=1; failed=0
for i in "${!jobs[@]}"; do
  wait "${pids[$i]}"; rc=$?
  echo "== job$i (${jobs[$i]}): rc $rc"
  tail -4 "$OUT/job$i.log"
  grep -q "^all done" "$OUT/job$i.log" || done_all=0
  (( rc == 0 )) || failed=1
done
[ $done_all = 1 ] && echo "all done" || echo "call again"
exit $failed

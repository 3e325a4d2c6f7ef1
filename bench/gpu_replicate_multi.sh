#!/usr/bin/env bash
# Issue 19 on a machine with several GPUs: one replication run per GPU, all at once.
#
#   OUT=$OUT JOBS="1:mxfp4 0:nvfp4_no_rht 0:nvfp4_no_sr 0:nvfp4_no_2d" SESSION=s15 \
#     LIMIT_S=570 bash bench/gpu_replicate_multi.sh
#
# JOBS: SEED:RUN pairs; job i runs on GPU i (CUDA_VISIBLE_DEVICES=i, so at most as many jobs
# as GPUs) as bench/gpu_replicate.sh with that SEED and RUNS=RUN, its copies under
# $OUT/job<i> and its output in $OUT/job<i>.log (the tail is printed). The corpus is built
# once, before the jobs start; the jobs share it and the per-seed run folders (each run's
# files are its own). As with gpu_replicate.sh, a run's checkpoint cannot leave the machine:
# call this back to back, with the same arguments, until it prints "all done".
# Other gpu_replicate.sh settings (TOKENS, MAX_BYTES, TRAIN_ARGS, EVAL, MARGIN_S, CORPUS,
# RUNS_DIR as a prefix: <RUNS_DIR>_seed<SEED>) pass through.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT}" "${JOBS:?set JOBS, e.g. 1:mxfp4 0:nvfp4_no_rht}"
T0=$(date +%s); LIMIT_S=${LIMIT_S:-560}
export CORPUS=${CORPUS:-/tmp/corpus}
mkdir -p "$OUT"
if [ ! -f "$CORPUS/manifest.json" ]; then
  python3 bench/corpus.py --out "$CORPUS" --max-bytes "${MAX_BYTES:-400000000}" \
    > "$OUT/corpus.log" 2>&1 || { tail -20 "$OUT/corpus.log"; exit 1; }
fi
read -r -a jobs <<< "$JOBS"
if command -v nvidia-smi > /dev/null; then
  gpus=$(nvidia-smi -L | wc -l)
  if (( ${#jobs[@]} > gpus )); then
    echo "${#jobs[@]} jobs but $gpus GPUs: one job per GPU" >&2; exit 2
  fi
fi
i=0
for job in "${jobs[@]}"; do
  seed=${job%%:*}; run=${job#*:}
  if [ "$seed" = "$job" ] || [ -z "$run" ]; then
    echo "JOBS entry '$job' is not SEED:RUN" >&2; exit 2
  fi
  CUDA_VISIBLE_DEVICES=$i OUT=$OUT/job$i SEED=$seed RUNS=$run \
    RUNS_DIR=${RUNS_DIR:-/tmp/replicate}_seed$seed \
    LIMIT_S=$(( LIMIT_S - ($(date +%s) - T0) )) bash bench/gpu_replicate.sh \
    > "$OUT/job$i.log" 2>&1 &
  i=$(( i + 1 ))
done
wait
done_all=1
i=0
for job in "${jobs[@]}"; do
  echo "== job$i ($job)"
  tail -4 "$OUT/job$i.log"
  grep -q "^all done" "$OUT/job$i.log" || done_all=0
  i=$(( i + 1 ))
done
[ $done_all = 1 ] && echo "all done" || echo "call again"

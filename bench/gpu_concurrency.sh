#!/usr/bin/env bash
# Issue 19's budget: does a second replication run sharing the one GPU add throughput?
#
#   OUT=$OUT RUN=nvfp4 STEPS=1000 bash bench/gpu_concurrency.sh
#
# Trains RUN for STEPS steps alone (bench/replicate.py, the study's options: seq 1024, batch
# 16, torch.compile with CUDA graphs; no validation or telemetry steps in between), then two
# copies at once (data-order seeds 0 and 1, two processes), and writes $OUT/concurrency.json:
# each process's tokens/s over its timed steps (after the first WARMUP_STEPS, which compile),
# the two together over one alone, and the wall time of each phase. The alone run goes first,
# so the pair compiles from a warm inductor cache and their timed steps overlap.
# Reuses the corpus the study built on this machine (CORPUS, default /tmp/corpus), else
# builds one (MAX_BYTES, default 400000000). TRIAL_ARGS replaces the training options (a CPU
# trial: TRIAL_ARGS='--size tiny --seq 64 --batch 4 --tokens 2048 --device cpu').
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
: "${OUT:?set OUT}"
RUN=${RUN:-nvfp4}; STEPS=${STEPS:-1000}; C=${CORPUS:-/tmp/corpus}; W=${WORK:-/tmp/concurrency}
if [ ! -f "$C/manifest.json" ]; then
  python3 bench/corpus.py --out "$C" --max-bytes "${MAX_BYTES:-400000000}" > "$OUT/corpus.log" 2>&1 \
    || { tail -20 "$OUT/corpus.log"; exit 1; }
fi
rm -rf "$W"
ARGS=(--corpus "$C" --runs "$RUN" --tokens $(( STEPS * 16384 )) --seq 1024 --batch 16
      --val-every 1000000 --val-blocks 8 --telemetry-every 0 --compile
      --compile-mode reduce-overhead)
# shellcheck disable=SC2206
[ -n "${TRIAL_ARGS:-}" ] && ARGS=(--corpus "$C" --runs "$RUN" $TRIAL_ARGS)
t0=$(date +%s)
python3 bench/replicate.py "${ARGS[@]}" --seed 0 --out "$W/alone" 2>&1 | grep -v -i warn
t1=$(date +%s)
python3 bench/replicate.py "${ARGS[@]}" --seed 0 --out "$W/pair0" 2>&1 | grep -v -i warn &
python3 bench/replicate.py "${ARGS[@]}" --seed 1 --out "$W/pair1" 2>&1 | grep -v -i warn &
wait
t2=$(date +%s)
python3 - "$W" "$RUN" "$OUT/concurrency.json" $(( t1 - t0 )) $(( t2 - t1 )) <<'PY'
import json, sys
from pathlib import Path
import torch
w, run, out, alone_s, pair_s = Path(sys.argv[1]), sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
res = {k: json.loads((w / k / f"{run}.json").read_text()) for k in ("alone", "pair0", "pair1")}
tps = {k: r["tokens_per_s"] for k, r in res.items()}
summary = {
    "what": "bench/gpu_concurrency.sh: one replication run alone, then two sharing the GPU",
    "run": run, "steps": res["alone"]["steps"], "torch": torch.__version__,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "tokens_per_s": tps,
    "pair_over_alone": (tps["pair0"] + tps["pair1"]) / tps["alone"],
    "wall_s": {"alone": alone_s, "pair": pair_s},
    "segments": {k: r["segments"] for k, r in res.items()},
}
Path(out).write_text(json.dumps(summary, indent=2))
print(json.dumps({k: summary[k] for k in ("tokens_per_s", "pair_over_alone", "wall_s")}))
PY

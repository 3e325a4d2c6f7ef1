#!/usr/bin/env bash
# Replication (issue 8) and the reduce_amax multi-GPU runs (issue 9) on 2 x H200, across
# one or more device calls (the machine must stay warm between them: /tmp holds the corpus
# and the interrupted runs). Each call: build the corpus if missing; on the first call run
# the reduce_amax comparison while the corpus builds, probe every run's speed alone on a GPU
# and plan the tokens per run to fit FUTURE_S more seconds of later calls; then train all
# nine runs concurrently (runs spread over both GPUs by probed cost) until this call's time
# is up. When every run is done: the eval suite on the BF16, FP8 and NVFP4 checkpoints and
# the report.
#   OUT=dir FIRST=1 FUTURE_S=420 LIMIT_S=570 bash bench/gpu_session3.sh
# (CORPUS, RUNS_DIR and REPLICATE_ARGS override the defaults for a small trial on CPU.)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
T0=$(date +%s); LIMIT_S=${LIMIT_S:-570}; FUTURE_S=${FUTURE_S:-0}; FIRST=${FIRST:-0}
left() { echo $(( LIMIT_S - ($(date +%s) - T0) )); }
C=${CORPUS:-/tmp/corpus}; R=${RUNS_DIR:-/tmp/runs}; mkdir -p $R $OUT/runs
RUNS=bf16,fp8_block,nvfp4,nvfp4_no_rht,nvfp4_no_sr,nvfp4_no_2d,nvfp4_all_blocks,mxfp4,nvfp4_late_switch
COMMON="--corpus $C --out $R ${REPLICATE_ARGS:---seq 1024 --batch 16 --val-every 50 --val-blocks 64}"
[ -f $C/manifest.json ] || python3 bench/corpus.py --out $C --max-bytes 120000000 \
  > $OUT/corpus.log 2>&1 &
if [ "$FIRST" = 1 ]; then
  cp bench/results/multi_gpu_h200x2.json $OUT/multi_gpu_h200x2.json
  timeout 200 python3 bench/multi_gpu.py --steps 100 --out $OUT/multi_gpu_h200x2.json \
    --runs single_no_sr_reduced,ddp_no_sr_reduced,fsdp2_no_sr_reduced > $OUT/multi_gpu.log 2>&1
fi
wait
cp $C/manifest.json $OUT/corpus_manifest.json
if [ ! -f $R/plan.json ]; then
  CUDA_VISIBLE_DEVICES=0 python3 bench/replicate.py $COMMON --probe-steps 8 \
    --runs bf16,fp8_block,nvfp4,nvfp4_no_rht,nvfp4_no_sr > $OUT/probe0.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 python3 bench/replicate.py $COMMON --probe-steps 8 \
    --runs nvfp4_no_2d,nvfp4_all_blocks,mxfp4,nvfp4_late_switch > $OUT/probe1.log 2>&1 &
  wait
  python3 bench/replicate.py $COMMON --runs $RUNS --gpus 2 --tokens 200000000 \
    --plan-seconds $(( $(left) - 200 + FUTURE_S )) > $R/plan.json
fi
cat $R/plan.json
TOK=$(python3 -c "import json; print(json.load(open('$R/plan.json'))['tokens'])")
TRAIN_S=$(( $(left) - 150 ))
for g in 0 1; do
  for r in $(python3 -c "import json; print(*json.load(open('$R/plan.json'))['gpus'][$g])"); do
    CUDA_VISIBLE_DEVICES=$g timeout $(( TRAIN_S + 120 )) python3 bench/replicate.py $COMMON \
      --runs $r --tokens $TOK --stop-after-seconds $TRAIN_S --save-models >> $OUT/run_$r.log 2>&1 &
  done
done
wait
cp $R/*.json $OUT/runs/; cp -r $R/probe $OUT/runs/
if python3 -c "import json,sys; sys.exit(not all(json.load(open(f'$R/{r}.json')).get('done') for r in '$RUNS'.split(',')))"; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  M=$R/models
  PYTHONPATH=$PWD:/tmp/site timeout $(( $(left) - 15 )) python3 eval/run_compare.py \
    --models bf16=$M/bf16 fp8_block=$M/fp8_block nvfp4=$M/nvfp4 \
    --tasks gsm8k_loglik,humaneval_loglik,mmlu_pro_loglik,mmlu_pro_mc --limit 300 \
    --data-dir .shared_data --offline --no-progress --output-dir $OUT/eval > $OUT/eval.log 2>&1
fi
python3 bench/replicate_report.py --runs $R --out $OUT/report > $OUT/report.log 2>&1
echo "left: $(left) s"

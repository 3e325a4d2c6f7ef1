#!/usr/bin/env bash
# Second GPU call (2 x H200): the demo's two checkpoints through the eval comparison, then
# 1- vs 2-GPU throughput with warm-up excluded. Usage: OUT=dir DATA=path bash bench/gpu_session2.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
R=$OUT/r; mkdir -p $R
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m hf_nvfp4.demo --steps 200 --out /tmp/demo > $R/demo.log 2>&1
cp /tmp/demo/results.json $R/demo_results.json; cp /tmp/demo/loss_curves.png $R/
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 eval/run_compare.py \
  --models bf16=/tmp/demo/bf16_model nvfp4=/tmp/demo/nvfp4_model \
  --tasks gsm8k_loglik,humaneval_loglik,mmlu_pro_loglik,mmlu_pro_mc --limit 150 \
  --data-dir $DATA --offline --no-progress --output-dir $R/eval > $R/eval.log 2>&1
C=integrations/accelerate; S="--steps 60 --hidden 512 --layers 4 --seq 256"
for cfg in single_gpu:32 ddp:16 fsdp2:16; do
  HF_NVFP4_RECIPE=$C/nvfp4_recipe.yaml timeout 60 python3 -m accelerate.commands.launch \
    --config_file $C/${cfg%%:*}.yaml examples/pretrain.py $S --batch ${cfg##*:} \
    --out $R/tp_${cfg%%:*} > $R/tp_${cfg%%:*}.log 2>&1
done
tar czf $OUT/results.tar.gz -C $OUT r

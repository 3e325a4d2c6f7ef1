#!/usr/bin/env bash
# Everything measured on the lent 2 x H200 machine in one call (see bench/README.md).
# Phase 1 uses both GPUs (DDP/FSDP2, issue 9); phase 2 runs two jobs side by side, one per GPU.
# Usage: OUT=dir DATA=path/to/shared/data bash bench/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
timeout 250 python3 bench/multi_gpu.py --steps 100 --out $R/multi_gpu.json > $R/multi_gpu.log 2>&1
(
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m hf_nvfp4.demo --out $R/demo > $R/demo.log 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 eval/run_compare.py \
    --models bf16=$R/demo/bf16_model nvfp4=$R/demo/nvfp4_model \
    --tasks gsm8k_loglik,humaneval_loglik,mmlu_pro_loglik,mmlu_pro_mc --limit 200 \
    --data-dir $DATA --offline --no-progress --output-dir $R/eval > $R/eval.log 2>&1
) &
(
  CUDA_VISIBLE_DEVICES=1 timeout 130 python3 bench/optim.py --steps 150 --out $R/optim_h200.json \
    > $R/optim.log 2>&1
  for run in bf16 reference; do
    if [ $run = bf16 ]; then rec=false; else rec=bench/recipes/nvfp4_reference.yaml; fi
    CUDA_VISIBLE_DEVICES=1 timeout 75 python3 -m accelerate.commands.launch \
      --config_file integrations/accelerate/single_gpu.yaml examples/pretrain.py \
      --steps 150 --batch 16 --nvfp4 $rec --out $R/ref_$run > $R/ref_$run.log 2>&1
  done
) &
wait
rm -rf $R/demo/*_model/*.safetensors $R/demo/bf16 $R/demo/nvfp4
tar czf $OUT/results.tar.gz -C $OUT r

#!/usr/bin/env bash
# The device calls of the speed push (issues 14/15). Usage, from the repository root:
#   OUT=/some/dir bash bench/gpu_session4.sh tests     # kernel/quant/compile/FP8 tests on the GPU
#   OUT=/some/dir bash bench/gpu_session4.sh e2e       # bench/e2e.py, both sizes and modes
#   OUT=/some/dir bash bench/gpu_session4.sh kernels   # dev_quantize + dev_gemm tables
#   OUT=/some/dir bash bench/gpu_session4.sh graphs    # e2e compiled columns with CUDA graphs
#   OUT=/some/dir bash bench/gpu_session4.sh moe       # bench/moe.py (MoE experts fwd+bwd)
#   OUT=/some/dir bash bench/gpu_session4.sh formats   # FP8/MXFP4/NVFP4 quantize kernel tests,
#                                                      # kernel_speed --check, format e2e columns
#   OUT=/some/dir bash bench/gpu_session4.sh gpu-tests [SECONDS]
#       # tests/kernels, nn, backends, quant and the experts tests in 12 pytest-xdist workers
#       # (Triton compiles on the CPU: the workers compile in parallel), stopping at SECONDS
#       # (default 560); the Triton cache in .gpu_cache makes a repeated call on a warm
#       # machine finish faster
#   OUT=/some/dir bash bench/gpu_session4.sh rht       # issue 17: the correctly rounded RHT's
#       # bit exactness at large shapes, the tensor cores' RHT error and the quantize timings
#       # (bench/rht_exactness.py), then the 124M e2e figure with CUDA graphs
#   OUT=/some/dir bash bench/gpu_session4.sh verify [SECONDS]
#       # a quantizer change's checks in about nine minutes on a cold machine: the quantize,
#       # grouped and MXFP4 kernel tests compiled (stopping at SECONDS, default 200), the
#       # quantize table with the amax pass's GPU time (kernel_speed --quantize-only), with
#       # AMAX_BASE (a folder of kernels, e.g. a carried frozen copy's) the dense and grouped
#       # amax passes against that one's (dev_quantize --amax), the 124M e2e with CUDA graphs
#       # and bench/moe.py (with BASE_TREE, a frozen tree such as .snap, its bench/moe.py too)
#   OUT=/some/dir bash bench/gpu_session4.sh kernel-tests [SECONDS]
#       # tests/kernels file by file, each file's result in $OUT/pytest_<file>.txt, stopping
#       # before SECONDS (default 540) run out; files already passed (listed in
#       # .gpu_cache/passed, kept between calls on a warm machine) are skipped, and the Triton
#       # and Inductor caches live in .gpu_cache too, so repeated calls finish the suite
# e2e resumes: JSONs of a cut-off call copied back into bench/results/ are continued.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16
what=${1:-tests}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
case $what in
  kernel-tests)
    budget=${2:-540}
    mkdir -p .gpu_cache && touch .gpu_cache/passed
    export TRITON_CACHE_DIR=$PWD/.gpu_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu_cache/inductor
    start=$SECONDS
    for f in tests/kernels/test_*.py; do
      grep -qx "$f" .gpu_cache/passed && { echo "$f: passed in an earlier call"; continue; }
      left=$((budget - (SECONDS - start)))
      (( left < 60 )) && { echo "stopping: ${left}s left"; break; }
      name=$(basename "$f" .py)
      timeout "$left" python3 -m pytest -q -p no:cacheprovider "$f" > "$OUT/pytest_$name.txt" 2>&1
      rc=$?
      echo "$f: rc=$rc $(tail -1 "$OUT/pytest_$name.txt")"
      [[ $rc == 0 ]] && echo "$f" >> .gpu_cache/passed
    done
    ;;
  gpu-tests)
    mkdir -p .gpu_cache
    export TRITON_CACHE_DIR=$PWD/.gpu_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu_cache/inductor
    timeout "${2:-560}" python3 -m pytest -q -n 12 -p no:cacheprovider -rfE --durations=10 \
      tests/kernels tests/nn tests/backends tests/quant tests/test_experts.py \
      > "$OUT/pytest_gpu.txt" 2>&1
    echo "rc=$?"; grep -E "passed|failed|FAILED|ERROR" "$OUT/pytest_gpu.txt" | tail -40
    ;;
  verify)
    mkdir -p .gpu_cache
    export TRITON_CACHE_DIR=$PWD/.gpu_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu_cache/inductor
    timeout "${2:-200}" python3 -m pytest -q -n 12 -p no:cacheprovider -rfE \
      tests/kernels/test_kernels_quantize.py tests/kernels/test_kernels_grouped.py \
      tests/kernels/test_kernels_mxfp4.py > "$OUT/pytest_verify.txt" 2>&1
    echo "rc=$?"; tail -3 "$OUT/pytest_verify.txt"
    python3 bench/kernel_speed.py --quantize-only --out "$OUT/kernel_speed_quantize.json" 2>&1 \
      | grep "^|"
    if [ -n "${AMAX_BASE:-}" ]; then
      python3 bench/dev_quantize.py --amax --base "$AMAX_BASE" 2>&1 | grep -v "^{"
    fi
    python3 bench/e2e.py --size 124m --modes bf16_params --compile-mode reduce-overhead \
      --columns bf16_compiled,nvfp4_compiled --out "$OUT/e2e_124m_verify.json" 2>&1 \
      | grep -E "^\[|^\|"
    python3 bench/moe.py --out "$OUT/moe_verify.json" 2>&1 | tail -4; echo "moe rc=$?"
    if [ -n "${BASE_TREE:-}" ]; then  # the same MoE step from a frozen tree, side by side
      (cd "$BASE_TREE" && python3 bench/moe.py --out "$OUT/moe_base.json" 2>&1 | tail -4)
      echo "moe (base tree) rc=$?"
    fi
    ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/kernels tests/quant tests/nn tests/backends \
      tests/test_experts.py > "$OUT/pytest_gpu.txt" 2>&1; tail -12 "$OUT/pytest_gpu.txt"
    ;;
  e2e)
    for f in e2e_124m_h200.json e2e_953m_h200.json; do
      [[ -f bench/results/$f && ! -f $OUT/$f ]] && cp "bench/results/$f" "$OUT/$f"
    done
    for mode in bf16_params fp32_masters; do
      for size in 124m 953m; do
        python3 bench/e2e.py --size "$size" --modes "$mode" --out "$OUT/e2e_${size}_h200.json" \
          2>&1 | grep -v Warning | tail -4
      done
    done
    ;;
  graphs)
    for size in 124m 953m; do
      python3 bench/e2e.py --size "$size" --modes bf16_params --compile-mode reduce-overhead \
        --columns bf16_eager,bf16_compiled,nvfp4_compiled \
        --out "$OUT/e2e_${size}_h200_cudagraphs.json" 2>&1 | grep -E "^\[|^\||cudagraph"
    done
    ;;
  formats)
    python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_fp8.py \
      tests/kernels/test_kernels_mxfp4.py tests/kernels/test_kernels_quantize.py tests/backends \
      tests/quant > "$OUT/pytest_formats.txt" 2>&1; tail -8 "$OUT/pytest_formats.txt"
    python3 bench/kernel_speed.py --check --out "$OUT/kernel_speed_h200_formats.json" \
      > "$OUT/kernel_speed_check.txt" 2>&1
    tail -20 "$OUT/kernel_speed_check.txt"
    [[ -f bench/results/e2e_124m_h200_formats2.json && ! -f $OUT/e2e_124m_h200_formats2.json ]] \
      && cp bench/results/e2e_124m_h200_formats2.json "$OUT/"
    python3 bench/e2e.py --size 124m --modes bf16_params --out "$OUT/e2e_124m_h200_formats2.json" \
      --columns bf16_eager,bf16_compiled,nvfp4_compiled,fp8_block_eager,fp8_block_compiled,mxfp4_eager,mxfp4_compiled \
      2>&1 | grep -E "^\[|^\|"
    ;;
  rht)
    python3 bench/rht_exactness.py --out "$OUT/rht_exactness_h200_interval.json" 2>&1 \
      | grep -v -i warn | tail -40
    python3 bench/e2e.py --size 124m --modes bf16_params --compile-mode reduce-overhead \
      --columns bf16_compiled,nvfp4_compiled --out "$OUT/e2e_124m_h200_interval_rht.json" \
      2>&1 | grep -E "^\[|^\|"
    ;;
  moe)
    python3 bench/moe.py --out "$OUT/moe_h200_grouped.json" 2>&1 | tail -4
    ;;
  kernels)
    python3 bench/dev_quantize.py 2>&1 | tail -30
    python3 bench/dev_gemm.py 2>&1 | tail -30
    ;;
esac

#!/usr/bin/env bash
# One device call of the 2026-12-02 speed session (issues 14/15): the e2e table at both
# sizes and modes (resumable: pass back the JSONs of a cut-off call in bench/results/), then
# the kernel tests compiled on the GPU. Usage: OUT=/some/dir bash bench/gpu_session4.sh [e2e|tests|all]
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if [[ $what != tests ]]; then
  for f in e2e_124m_h200.json e2e_953m_h200.json; do
    [[ -f bench/results/$f && ! -f $OUT/$f ]] && cp "bench/results/$f" "$OUT/$f"
  done
  for mode in bf16_params fp32_masters; do
    for size in 124m 953m; do
      python3 bench/e2e.py --size "$size" --modes "$mode" --out "$OUT/e2e_${size}_h200.json" \
        2>&1 | grep -v Warning | tail -4
    done
  done
fi
if [[ $what != e2e ]]; then
  python3 -m pytest -q tests/kernels tests/quant tests/nn/test_compile.py 2>&1 \
    | tail -8 | tee "$OUT/pytest_gpu.txt"
fi

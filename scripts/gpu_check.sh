#!/usr/bin/env bash
# The one script to run when a GPU is lent: the kernel tests compiled on the GPU (fp16 and bf16
# cases added) and the quick benchmark, everything written into one folder, in about 6 minutes.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: bench_results/<date>-<gpu>)
# Needs python3 with torch, triton, numpy, pytest and matplotlib; gpudl itself is put on the path
# from this checkout (no install), so it also runs on a machine that cannot reach PyPI.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || { echo "no CUDA device"; exit 1; }
out=${1:-bench_results/$(date +%Y-%m-%d)-$gpu}
mkdir -p "$out"

# gpudl maps kernels/ to gpudl.kernels; build that layout in a scratch folder instead of installing.
stage=$(mktemp -d)
cp -r src/gpudl "$stage/gpudl"
rm -rf "$stage/gpudl/kernels" && cp -r kernels "$stage/gpudl/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$out/environment.txt" 2>&1

timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
  -k "not compiles" --junitxml="$out/kernel_tests.xml" 2>&1 | tee "$out/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 200 python3 scripts/bench_kernels.py --quick --out "$out" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "kernel tests exit $tests_rc, benchmark exit $bench_rc; results in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]

#!/usr/bin/env bash
# The one script to run when a GPU is lent: the whole test suite on the GPU (kernels compiled,
# fp16 and bf16 cases added, `gpu` tests included), then the quick kernel benchmark and the
# whole-model benchmark, then the full compiled-code audit, everything written into one folder, in
# at most 13 minutes on a 16-core machine with one H200 (the sum of the parts' time limits; the
# first three took under 9 minutes before the audit was added).
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: bench_results/<date>-<gpu>)
#
# Python: $PYTHON if set, else the activated virtual environment's python ($VIRTUAL_ENV), else
# python3 from PATH; the script prints which. It needs torch, triton, numpy, pytest (pytest-xdist
# for parallel workers), lightning, scikit-learn and matplotlib; gpudl itself is put on the path
# from this checkout (no install), so it also runs on a machine that cannot reach PyPI. Tests that
# need hydra-core, omegaconf, wandb or mlxtend skip themselves where those are missing.
#
# Deselected here: the `slow` tests (training to a target accuracy, which takes minutes per model
# and checks the models, not the GPU; and the sm_80/sm_90 compile check, which the GPU itself
# replaces). `python -m pytest` runs them.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON; why='$PYTHON'
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  py=$VIRTUAL_ENV/bin/python; why="the active virtual environment"
else
  py=python3; why="python3 on PATH (no virtual environment active; activate one or set PYTHON to choose)"
fi
command -v "$py" >/dev/null || { echo "python not found: $py"; exit 1; }
echo "python: $("$py" -c 'import sys; print(sys.executable)') (from $why)"

gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null) \
  || { echo "no CUDA device visible to $py (or no torch there)"; exit 1; }
out=${1:-bench_results/$(date +%Y-%m-%d)-$gpu}
mkdir -p "$out"

# gpudl maps kernels/ to gpudl.kernels; build that layout in a scratch folder instead of installing.
stage=$(mktemp -d)
cp -r src/gpudl "$stage/gpudl"
rm -rf "$stage/gpudl/kernels" && cp -r kernels "$stage/gpudl/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 WANDB_MODE=offline
unset TRITON_INTERPRET

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "cpus: $(nproc)"
  git rev-parse HEAD 2>/dev/null
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n $(nproc)" || echo "")
start=$(date +%s)
# SIGINT at the limit: pytest stops, still writes the junit XML of what ran, and exits non-zero.
timeout -s INT -k 30 270 "$py" -m pytest -p no:cacheprovider -o addopts="" -ra $workers -m "not slow" \
  --durations=25 --junitxml="$out/tests.xml" tests 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "tests: exit $tests_rc in $(( $(date +%s) - start )) s" | tee -a "$out/tests.log"

start=$(date +%s)
timeout 140 "$py" scripts/bench_kernels.py --quick --out "$out" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: exit $bench_rc in $(( $(date +%s) - start )) s" | tee -a "$out/bench.log"

# One training step per model: triton vs torch vs torch.compile at GPU sizes (no Hydra needed).
start=$(date +%s)
mkdir -p "$out/models"
timeout 120 "$py" scripts/bench_models.py --iters 10 --out "$out/models" 2>&1 | tee "$out/models/bench_models.log"
models_rc=${PIPESTATUS[0]}
echo "model benchmark: exit $models_rc in $(( $(date +%s) - start )) s" | tee -a "$out/models/bench_models.log"

# The full compiled-code audit (every variant for sm_80 and sm_90 recompiled and disassembled, the
# hot-loop model, the rules' figures; no GPU used): what CI takes from bench_results/audit/current.
start=$(date +%s)
timeout 240 "$py" -m gpudl.kernels.audit --full --out "$out/audit" --jobs "$(nproc)" 2>&1 | tail -n 3 | tee "$out/audit.log"
audit_rc=${PIPESTATUS[0]}
echo "audit: exit $audit_rc in $(( $(date +%s) - start )) s" | tee -a "$out/audit.log"

rm -rf "$stage"
echo "tests exit $tests_rc, benchmark exit $bench_rc, model benchmark exit $models_rc, audit exit $audit_rc; results in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$models_rc" = 0 ] && [ "$audit_rc" = 0 ]

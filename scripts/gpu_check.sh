#!/usr/bin/env bash
# The whole GPU check in one call (see README "Running on a GPU"):
#   build the CUDA extension, run the CUDA tests, compute-sanitizer, the benchmarks.
# Writes logs and results under $OUT (default ./gpu_out). Usage:
#   OUT=/some/dir bash scripts/gpu_check.sh [build|test|bench|all]...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export DIFFKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-all}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

want() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }

if want build; then
  log "machine"; { nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version | tail -2; } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt" | tee -a "$OUT/summary.txt"
  log "build (build_ext --inplace)"
  if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -50 "$OUT/build.log"; log "BUILD FAILED"; exit 1
  fi
  grep -E "diffkern build|spill|warning" "$OUT/build.log" | head -20 | tee -a "$OUT/summary.txt"
  $PY -c "import diffkern as dk; print('native:', dk.native_available('cuda'), dk.native_error())" | tee -a "$OUT/summary.txt"
fi

if want test; then
  log "CUDA tests"
  $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_cuda.log"
  tail -30 "$OUT/pytest_cuda.log" | tee -a "$OUT/summary.txt"
  log "compute-sanitizer (memcheck, racecheck) on a small run of every op"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/sanitizer_workload.py > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?" | tee -a "$OUT/summary.txt"
    tail -3 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
  done
fi

if want bench; then
  log "benchmarks"
  # >= 100 timed calls per row (CUDA events), sizes larger than L2 plus the tiny one.
  timeout ${BENCH_TIMEOUT:-420} $PY benchmarks/step_speed.py --device cuda --out "$OUT" --min-reps 100 --reps 200 \
    --budget 0.5 --sizes 1x4x64x64,64x4x128x128,16x3x512x512,1e7x2 --dtypes float32,bfloat16 \
    > "$OUT/step_speed.txt" 2>&1
  echo "step_speed rc=$?" | tee -a "$OUT/summary.txt"
  tail -60 "$OUT/step_speed.txt"
  if [ -f benchmarks/loop_speed.py ]; then
    timeout ${LOOP_TIMEOUT:-240} $PY benchmarks/loop_speed.py --device cuda --out "$OUT" > "$OUT/loop_speed.txt" 2>&1
    echo "loop_speed rc=$?" | tee -a "$OUT/summary.txt"
    tail -25 "$OUT/loop_speed.txt"
  fi
fi
log "done"

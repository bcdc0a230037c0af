#!/usr/bin/env bash
# The whole GPU check in one call, sized for one H200 lease (README "Running on a GPU"):
# build the CUDA extension, run every CUDA test of every test file, compute-sanitizer
# memcheck and racecheck, the benchmarks. Ends within GPU_CHECK_BUDGET seconds (default
# 530, under 9 minutes) whatever happens: each unit runs under `timeout`, bounded by its
# own cap, its stage's budget and what is left of the whole.
#
#   OUT=/some/dir bash scripts/gpu_check.sh                    # everything
#   STAGES=tests,bench bash scripts/gpu_check.sh               # or: bash scripts/gpu_check.sh tests bench
#   STAGES=memcheck,bench_loop bash scripts/gpu_check.sh       # single units (list below)
#
# Stages and their units (a stage name selects all of its units):
#   build      build       pip install --no-deps --no-build-isolation . (sm_90, MAX_JOBS=16)
#   tests      tests       pytest over tests/, CUDA tests only (scripts/pytest_cuda_select.py)
#   sanitizer  memcheck racecheck   compute-sanitizer on scripts/sanitizer_workload.py
#   bench      bench_roofline bench_overhead bench_gmm bench_scheduler bench_sweep
#              bench_loop bench_compile         (benchmarks/*.py, see the bench_* below)
# Caps per unit (seconds): build 180, tests 130, memcheck 60, racecheck 30, bench_roofline
# 60, bench_overhead 40, bench_gmm 30, bench_scheduler and bench_sweep 40, bench_loop 45,
# bench_compile 90; override one with UNIT_TIMEOUT (BUILD_TIMEOUT=240), a stage's total
# with BUILD_BUDGET/TESTS_BUDGET/SANITIZER_BUDGET/BENCH_BUDGET (180/130/90/200), the whole
# with GPU_CHECK_BUDGET (530, which wins). Extra pytest arguments: PYTEST_ARGS.
# A unit that needs the extension builds it first when the installed one is not this
# tree's. Stamps: a unit that passed is not run again while its inputs (the sources it
# depends on, by content hash) are unchanged, so a rerun redoes only what failed or
# changed; FORCE=1 reruns everything. Stamps and full logs live in GPU_CHECK_STATE
# (default /tmp/diffkern-gpu-check: a rerun on the same machine finds them; a fresh
# machine starts over, and the summary prints the STAGES= line that redoes the failures).
#
# What comes back under $OUT (at most 8 files, as the device tool returns): summary.txt
# (also printed last) and gpu_check.tar.gz (every log, the benchmark JSONs, the stamps),
# packed after every unit so that a kill still leaves the latest.
#
# Wheels: if .whl/ holds wheels (scripts/fetch_gpu_wheels.sh; the device tool's
# carry=[".whl"]), those whose distribution is not installed are installed into
# $GPU_CHECK_STATE/site (pip --no-index --no-deps) and put on PYTHONPATH: diffusers for the
# baseline rows and the diffusers tests. Without them those rows/tests say n/a / skip.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
STATE=${GPU_CHECK_STATE:-/tmp/diffkern-gpu-check}
LOGS=$STATE/logs RES=$STATE/results STAMPS=$STATE/stamps
mkdir -p "$OUT" "$LOGS" "$RES" "$STAMPS"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-530}
declare -A STAGE_BUDGET=([build]=${BUILD_BUDGET:-180} [tests]=${TESTS_BUDGET:-130} [sanitizer]=${SANITIZER_BUDGET:-90}
                         [bench]=${BENCH_BUDGET:-200})
# torch takes CUDA_HOME as the folder above `which nvcc`: wrong when that nvcc is a link or
# a wrapper in /usr/local/bin (as on the CI machine). nvcc says where its toolkit is.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
  top=$(nvcc -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$top" ] && [ -f "$top/include/cuda_runtime_api.h" ] && CUDA_HOME=$(cd "$top" && pwd) && export CUDA_HOME
fi
export DIFFKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A failed ahead-of-time build must show as a failure, not be papered over by a compile on
# first use (where the package has one).
export DIFFKERN_JIT=0
[ -d "$STATE/site" ] && export PYTHONPATH=$STATE/site${PYTHONPATH:+:$PYTHONPATH}
export ROOT PY LOGS RES
T0=$SECONDS
: > "$LOGS/highlights.txt"
echo "=== gpu_check run $(date -u +%FT%TZ)" >> "$LOGS/progress.txt"

ALL_UNITS=(build tests memcheck racecheck bench_roofline bench_overhead bench_gmm bench_scheduler bench_sweep
           bench_loop bench_compile)
stage_of() { case $1 in build) echo build ;; tests) echo tests ;; memcheck|racecheck) echo sanitizer ;; *) echo bench ;; esac; }
want=${STAGES:-${*:-all}}
want=" ${want//,/ } "
want=${want// test / tests }  # the old script's names
selected() {  # unit -> is it asked for (by its own name, its stage's, or all)?
  [[ $want == *" all "* || $want == *" $1 "* || $want == *" $(stage_of "$1") "* ]]
}

# ---- content keys: a stamp is valid while the inputs of its unit are unchanged ----------
hash_paths() {
  (cd "$ROOT" && find "$@" -type f ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort \
    | xargs -r sha256sum | sha256sum | cut -c1-16)
}
TORCH_ID=$($PY -c "import torch; print(torch.__version__, torch.version.cuda)" 2>/dev/null || echo none)
BUILD_KEY=$(echo "$(hash_paths csrc diffkern setup.py pyproject.toml) $TORCH_ID $TORCH_CUDA_ARCH_LIST" | sha256sum | cut -c1-16)
key_of() {
  case $1 in
    build) echo "$BUILD_KEY" ;;
    tests) echo "$BUILD_KEY-$(hash_paths tests scripts/pytest_cuda_select.py examples)" ;;
    memcheck|racecheck) echo "$BUILD_KEY-$(hash_paths scripts/sanitizer_workload.py)" ;;
    *) echo "$BUILD_KEY-$(hash_paths benchmarks examples)" ;;
  esac
}
stamped() { [ "${FORCE:-0}" != 1 ] && [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" == "$(key_of "$1")" ]; }

# ---- bookkeeping ---------------------------------------------------------------------------
declare -A STATUS SECS
declare -A STAGE_USED=([build]=0 [tests]=0 [sanitizer]=0 [bench]=0)
note() { echo "== $(date +%T) +$((SECONDS - T0))s $*" | tee -a "$LOGS/progress.txt"; }
pack() {
  {
    echo "diffkern gpu_check  $(date -u +%FT%TZ)  build key $BUILD_KEY  torch $TORCH_ID"
    echo "machine: $(head -1 "$LOGS/machine.txt" 2>/dev/null)"
    printf '%-16s %-16s %6s  %s\n' unit status seconds log
    for u in "${ALL_UNITS[@]}"; do
      local log=-
      [ -f "$LOGS/$u.log" ] && log=logs/$u.log
      [ -n "${STATUS[$u]:-}" ] && printf '%-16s %-16s %6s  %s\n' "$u" "${STATUS[$u]}" "${SECS[$u]:-}" "$log"
    done
    local failed=()
    for u in "${ALL_UNITS[@]}"; do
      case ${STATUS[$u]:-} in FAILED*|TIMEOUT|no-time) failed+=("$u") ;; esac
    done
    if [ ${#failed[@]} -gt 0 ]; then
      local IFS=,
      echo "rerun what failed: STAGES=${failed[*]} bash scripts/gpu_check.sh   (passed units are skipped by stamp;"
      echo "  on a fresh machine the build runs first by itself)"
    fi
    [ -f "$LOGS/highlights.txt" ] && { echo; cat "$LOGS/highlights.txt"; }
  } > "$OUT/summary.txt"
  cp "$OUT/summary.txt" "$STATE/summary.txt"
  tar czf "$OUT/gpu_check.tar.gz.tmp" -C "$STATE" logs results stamps summary.txt 2>/dev/null \
    && mv "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}
highlight() { echo "$*" >> "$LOGS/highlights.txt"; }

# run_unit UNIT CAP_SECONDS COMMAND...: runs the command under timeout with its output in
# logs/UNIT.log; records the status; stamps on success.
run_unit() {
  local u=$1 cap=$2; shift 2
  local cap_var=${u^^}_TIMEOUT  # e.g. BUILD_TIMEOUT=300, BENCH_LOOP_TIMEOUT=90
  cap=${!cap_var:-$cap}
  local st; st=$(stage_of "$u")
  local left=$((BUDGET - (SECONDS - T0) - 10)) stage_left=$((STAGE_BUDGET[$st] - STAGE_USED[$st]))
  local t=$cap
  ((stage_left < t)) && t=$stage_left
  ((left < t)) && t=$left
  if ((t < 10)); then
    STATUS[$u]=no-time; note "$u: not run (no time left in the $st stage or the whole)"; pack; return 1
  fi
  note "$u (timeout ${t}s)"
  local t1=$SECONDS rc=0
  echo "+ $*" > "$LOGS/$u.log"
  if declare -F "$1" > /dev/null; then  # a function of this script: run it in a child bash
    timeout -k 10 "$t" bash -c '"$@"' _ "$@" >> "$LOGS/$u.log" 2>&1 || rc=$?
  else
    timeout -k 10 "$t" "$@" >> "$LOGS/$u.log" 2>&1 || rc=$?
  fi
  SECS[$u]=$((SECONDS - t1))
  STAGE_USED[$st]=$((STAGE_USED[$st] + SECS[$u]))
  if ((rc == 0)); then
    STATUS[$u]=ok; key_of "$u" > "$STAMPS/$u"
  elif ((rc == 124 || rc == 137)); then
    STATUS[$u]=TIMEOUT; rm -f "$STAMPS/$u"
  else
    STATUS[$u]="FAILED($rc)"; rm -f "$STAMPS/$u"
  fi
  note "$u: ${STATUS[$u]} in ${SECS[$u]}s"
  if ((rc != 0)); then
    { echo "--- $u: ${STATUS[$u]}, last lines of logs/$u.log:"; tail -15 "$LOGS/$u.log"; } | tee -a "$LOGS/highlights.txt"
  fi
  pack
  return $rc
}

# ---- environment: machine, carried wheels (always; a few seconds) -------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  nvcc --version | tail -2
  command -v compute-sanitizer
  nproc; free -g | head -2
  nvidia-smi
} > "$LOGS/machine.txt" 2>&1
note "machine: $(head -1 "$LOGS/machine.txt")"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  missing=()
  for w in "$ROOT"/.whl/*.whl; do
    name=$(basename "$w" | cut -d- -f1)
    $PY -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$name" 2>/dev/null || missing+=("$w")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$STATE/site" "${missing[@]}" > "$LOGS/wheels.log" 2>&1 \
      && export PYTHONPATH=$STATE/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  note "wheels: installed $(basename -a "${missing[@]}" 2>/dev/null | tr '\n' ' ')(others already there)"
fi
DIFFUSERS=$($PY -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || echo "absent (diffusers rows n/a)")
note "diffusers: $DIFFUSERS"

# ---- build -----------------------------------------------------------------------------
NATIVE_OK=0
native_ok() {  # the installed diffkern (not the source tree) has CUDA kernels and is this tree's
  ((NATIVE_OK)) && return 0
  [ -f "$STAMPS/build" ] && [ "$(cat "$STAMPS/build")" == "$BUILD_KEY" ] \
    && (cd /tmp && $PY -c "import diffkern as dk, sys; sys.exit(0 if dk.native_available('cuda') else 1)" 2>/dev/null) \
    && NATIVE_OK=1
}
build_cmd() {
  # Headers torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) from torch's
  # nvidia-* wheels, in case the toolkit there lacks them (as the CI machine's does).
  local inc
  inc=$($PY -c "
import glob, os, site, sys
sps = dict.fromkeys(site.getsitepackages() + [p for p in sys.path if p.endswith('-packages')])
print(':'.join(d for sp in sps for d in sorted(glob.glob(os.path.join(sp, 'nvidia', '**', 'include'), recursive=True))
               if os.path.isdir(d)))")
  export CPATH=${CPATH:+$CPATH:}$inc
  echo "CPATH=$CPATH"
  # -Xptxas -v: registers, spills and stack frames of every kernel, in the log.
  NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas=-v" \
    $PY -m pip install -v --no-deps --no-build-isolation "$ROOT" || return 1
  cd /tmp && $PY -c "
import diffkern as dk, torch, sys
print('diffkern', dk.__file__, 'native cpu', dk.native_available('cpu'), 'cuda', dk.native_available('cuda'), dk.native_error())
sys.exit(0 if dk.native_available('cuda') else 1)"
}
export -f build_cmd
needs_build=0
for u in "${ALL_UNITS[@]}"; do
  [ "$u" != build ] && selected "$u" && ! stamped "$u" && needs_build=1
done
if selected build || { ((needs_build)) && ! native_ok; }; then
  if [ "${FORCE:-0}" != 1 ] && native_ok; then
    STATUS[build]=stamped; note "build: this tree is built and installed (stamp)"
  elif run_unit build 180 build_cmd; then
    grep -E "diffkern build" "$LOGS/build.log" | sort -u | head -3
    # Kernels that spill to local memory (bytes moved the roofline does not count).
    spills=$(grep -B2 -E " [1-9][0-9]* bytes spill" "$LOGS/build.log" | head -12)
    [ -n "$spills" ] && highlight "ptxas spills:" "$spills"
  fi
fi
have_native() {
  if [ "${STATUS[build]:-}" == ok ] || [ "${STATUS[build]:-}" == stamped ] || native_ok; then return 0; fi
  return 1
}

# ---- tests -------------------------------------------------------------------------------
tests_cmd() {
  cd /tmp || return 1
  PYTHONPATH=$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH} DIFFKERN_REQUIRE_NATIVE=1 $PY -m pytest "$ROOT/tests" \
    -p pytest_cuda_select --cuda-list "$LOGS/cuda_tests.txt" -q -rfEs -p no:cacheprovider \
    --junitxml="$LOGS/pytest_cuda.xml" -o faulthandler_timeout=100 ${PYTEST_ARGS:-} 2>&1 | tee "$LOGS/pytest.txt"
  local rc=${PIPESTATUS[0]}
  # A CUDA test skipped for want of a GPU or of CUDA kernels is a failure here.
  if grep -E "^SKIPPED.*(needs a CUDA device|built without CUDA|native ops not built)" "$LOGS/pytest.txt"; then
    echo "CUDA tests were skipped on a GPU machine"; return 3
  fi
  return $rc
}

# ---- compute-sanitizer ---------------------------------------------------------------------
sanitizer_cmd() {
  cd /tmp || return 1
  local cs
  cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
       "${CUDA_HOME:-/usr/local/cuda}"/compute-sanitizer/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$cs" ] || { echo "compute-sanitizer not found"; return 127; }
  # No caching allocator: each tensor is its own allocation, so memcheck sees an access
  # one element past a tensor (inside a cached block it could not).
  # racecheck: fp32 only (shared-memory hazards do not depend on the dtype).
  local dtypes=float32,bfloat16,float16,float64
  [ "$1" == racecheck ] && dtypes=float32
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 DIFFKERN_WORKLOAD_DTYPES=$dtypes \
    "$cs" --tool "$1" --error-exitcode 9 --print-limit 30 $PY "$ROOT/scripts/sanitizer_workload.py"
}

# ---- benchmarks ----------------------------------------------------------------------------
# step_speed ops, all of them (whatever OPS lists on this tree), the GMM loop apart (it is
# timed on its own, compute-bound, against the reference loop).
STEP_OPS=$(cd "$ROOT/benchmarks" && $PY -c "
import step_speed
print(','.join(o for o in step_speed.OPS if 'gmm' not in o))" 2>/dev/null | tail -1)
STEP_OPS=${STEP_OPS:-q_sample,ddpm_step,ddim_step,langevin_step}
STEP=("$PY" "$ROOT/benchmarks/step_speed.py" --device cuda --out "$RES" --no-plot)
REPS=(--min-reps 100 --reps 100 --budget 0.05 --warmup 5)
# Flags a benchmark that another branch adds takes, read from its --help.
flags_for() {
  local help; help=$($PY "$1" --help 2>/dev/null) || return 0
  [[ $help == *--device* ]] && printf -- '--device\ncuda\n'
  [[ $help == *--out* ]] && printf -- '--out\n%s\n' "$RES"
  return 0
}

export -f tests_cmd sanitizer_cmd
# ---- run the selected units ------------------------------------------------------------------
run_selected() {  # UNIT CAP COMMAND...
  local u=$1
  selected "$u" || return 0
  if stamped "$u"; then STATUS[$u]=stamped; note "$u: passed before with these inputs (stamp)"; return 0; fi
  if ! have_native; then STATUS[$u]=FAILED-no-build; note "$u: not run, no CUDA build"; pack; return 1; fi
  run_unit "$@"
}
run_optional() {  # UNIT SCRIPT CAP [ARGS]: a benchmark another branch adds, run when the tree
  # has it; --device cuda / --out and those of ARGS that its --help knows
  local u=$1 script=$ROOT/benchmarks/$2 cap=$3
  selected "$u" || return 0
  if [ ! -f "$script" ]; then STATUS[$u]=absent; note "$u: benchmarks/$2 not in this tree"; return 0; fi
  local -a extra; mapfile -t extra < <(flags_for "$script")
  local help a; help=$($PY "$script" --help 2>/dev/null)
  for a in ${4:-}; do [[ $a != --* || $help == *"$a"* ]] && extra+=("$a"); done
  run_selected "$u" "$cap" "$PY" "$script" "${extra[@]}"
}
run_selected tests 130 tests_cmd
run_selected memcheck 60 sanitizer_cmd memcheck
run_selected racecheck 30 sanitizer_cmd racecheck
# Roofline: every step op at sizes past the 50-60 MB L2, fp32 and bf16, against a copy of
# the same tensor, eager PyTorch and diffusers. Median of 100 calls timed by CUDA events.
run_selected bench_roofline 60 "${STEP[@]}" --ops "$STEP_OPS" --sizes 64x4x128x128,16x3x512x512 \
  --dtypes float32,bfloat16 --impls native,copy,eager,diffusers "${REPS[@]}" --no-overhead --tag cuda-roofline
# Host cost per call at 1x4x64x64 (us, launches, syncs) for native, eager and diffusers.
run_selected bench_overhead 40 "${STEP[@]}" --ops "$STEP_OPS" --sizes 1x4x64x64 --dtypes float32 \
  --impls native,eager,diffusers "${REPS[@]}" --tag cuda-overhead
# The fused GMM loop against the reference loop on 1e6 points (target >= 100x).
run_selected bench_gmm 30 "${STEP[@]}" --ops gmm_annealed_langevin --sizes 1e6x2 --impls native,eager,reference \
  --min-reps 3 --reps 20 --budget 1 --no-overhead --tag cuda-gmm
# Benchmarks other branches add, run when the tree has them (flags read from their --help).
run_optional bench_scheduler scheduler_speed.py 40 "${SCHEDULER_ARGS:-}"
# overhead_sweep is a CPU benchmark (host cost per call, issue 10): its --calls figures on
# this machine's CPU; SWEEP_ARGS="" runs the whole sweep (minutes).
run_optional bench_sweep overhead_sweep.py 40 "${SWEEP_ARGS---calls}"
# Whole loops with a small UNet (50-step DDIM) and an MLP score (annealed Langevin), eager
# and captured in one CUDA graph; LOOP_ARGS="--loops ddim50,ddpm1000,langevin" adds DDPM.
run_selected bench_loop 45 "$PY" "$ROOT/benchmarks/loop_speed.py" --device cuda --out "$RES" --tag cuda \
  ${LOOP_ARGS:---loops ddim50,langevin --reps 5}
# torch.compile of the formula, with the noise given and with torch.randn(generator=)
# inside (the targets' two baselines), fp32; COMPILE_IMPLS adds compile+randn. Last: the
# costliest (one inductor compile per op and row).
run_selected bench_compile 90 "${STEP[@]}" --ops "$STEP_OPS" --sizes 16x3x512x512 --dtypes float32 \
  --impls "${COMPILE_IMPLS:-native,compile,compile+gen}" "${REPS[@]}" --no-overhead --tag cuda-compile

# ---- the tables worth reading first, then the summary ----------------------------------------
passed() { [ "${STATUS[$1]:-}" == ok ] || [ "${STATUS[$1]:-}" == stamped ]; }
for u in tests memcheck racecheck; do
  [ -f "$LOGS/$u.log" ] && passed "$u" && highlight "$u: $(grep -E "passed|failed|ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$u.log" | tail -1)"
done
for u in bench_roofline bench_overhead bench_gmm bench_scheduler bench_sweep bench_loop bench_compile; do
  if [ -f "$LOGS/$u.log" ] && passed "$u"; then
    { echo "--- $u (end of its output)"; grep -v "^\s*$" "$LOGS/$u.log" | tail -"${BENCH_TAIL:-25}"; } >> "$LOGS/highlights.txt"
  fi
done
note "done in $((SECONDS - T0))s"
pack
cat "$OUT/summary.txt"
for u in "${ALL_UNITS[@]}"; do
  case ${STATUS[$u]:-} in FAILED*|TIMEOUT|no-time) exit 1 ;; esac
done
exit 0

#!/usr/bin/env bash
# CI's CUDA stage: compile the whole CUDA extension (bindings in csrc/torch/cuda/*.cpp and
# kernels in csrc/kernels/*.cu) against a CUDA build of torch, on a machine with no GPU.
# Compile only: nothing here runs a kernel (scripts/gpu_check.sh does, on a GPU).
#
# Why a second torch: the CPU build of torch that the rest of CI uses has no CUDA headers
# or libraries, so the bindings could never be compiled against it. The CUDA torch lives
# in its own virtual environment OUTSIDE the checkout, created when missing and reused
# afterwards (CI clones the checkout afresh; the venv survives between runs):
#   $DIFFKERN_CI_CACHE (default $HOME/.cache/diffkern-ci)/cuda-venv
# and the build runs in a mirror of the checkout beside it (cuda-src/), whose build/ is
# kept too, so ninja recompiles only the sources that changed since the last run.
# Measured on the 2-core CI kind of machine: venv from nothing 123 s (torch 2.14.1+cu130
# and its nvidia-* wheels from the local index), full compile of 22 sources 3.3 CPU-min
# (846 s wall here with the 2 cores shared ~6x over; the issue measured 75 s idle), an
# unchanged tree (fresh clone, 0 ninja steps) 42 s.
#
# Environment:
#   DIFFKERN_CI_CACHE      where the venv lives (default $HOME/.cache/diffkern-ci)
#   DIFFKERN_CI_TORCH      torch pin with a CUDA build reachable by pip (default 2.14.1)
#   DIFFKERN_CI_PYTHON     interpreter the venv is made from (default python3; the pinned
#                          wheel must exist for its version)
#   CUDA_HOME              toolkit whose major version matches torch's CUDA (default
#                          /usr/local/cuda-13.0 when present)
#   TORCH_CUDA_ARCH_LIST   default 9.0 (one architecture: the point is that it compiles)
#   MAX_JOBS               parallel compile jobs (default: the number of CPUs)
#   DIFFKERN_CI_CPU_ONLY_OPS  ops that have a CPU kernel and, by design, no CUDA one
# Exit status: non-zero when the venv cannot be made or any source fails to compile, or
# when the built extension lacks a CUDA kernel of an op (a binding that did not register).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${DIFFKERN_CI_CACHE:-${HOME:-/root}/.cache/diffkern-ci}
VENV=$CACHE/cuda-venv
TORCH_PIN=${DIFFKERN_CI_TORCH:-2.14.1}
BASE_PY=${DIFFKERN_CI_PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda-13.0; fi
export CUDA_HOME=${CUDA_HOME:?set CUDA_HOME to a CUDA toolkit}
export PATH=$CUDA_HOME/bin:$PATH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DIFFKERN_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PIP_DISABLE_PIP_VERSION_CHECK=1
PY=$VENV/bin/python
t0=$SECONDS
stamp() { echo "[ci_cuda_build] $*"; }

mkdir -p "$CACHE"
# One CI run at a time in the shared venv (a second waits instead of racing the install).
exec 9>"$CACHE/cuda-venv.lock"
flock 9

venv_ok() {
  [ -x "$PY" ] && "$PY" - "$TORCH_PIN" <<'EOF'
import sys, torch
ok = torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda
sys.exit(0 if ok else 1)
EOF
}

if venv_ok 2>/dev/null; then
  stamp "reusing $VENV"
  "$PY" -c "import numpy" 2>/dev/null || "$PY" -m pip install -q numpy > "$CACHE/cuda-venv-install.log" 2>&1 || true
else
  stamp "creating $VENV with torch==$TORCH_PIN (a CUDA build)"
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
  # setuptools/wheel/ninja: the build backend and the parallel compiler driver that
  # --no-build-isolation expects to find in the environment; numpy: diffkern's dependency
  # (and torch warns at import without it).
  if ! "$PY" -m pip install -q "torch==$TORCH_PIN" setuptools wheel ninja numpy > "$CACHE/cuda-venv-install.log" 2>&1; then
    tail -30 "$CACHE/cuda-venv-install.log"; rm -rf "$VENV"
    stamp "FAILED: cannot install torch==$TORCH_PIN into $VENV"; exit 1
  fi
  venv_ok || { stamp "FAILED: torch==$TORCH_PIN in $VENV is not a CUDA build"; rm -rf "$VENV"; exit 1; }
  stamp "venv ready in $((SECONDS - t0)) s"
fi
"$PY" -c "import torch; print('[ci_cuda_build] torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -1

# The local toolkit may be a minimal one (compiler and runtime only), while torch's
# ATen/cuda/CUDAContext.h includes cusparse.h, cublas_v2.h, cusolverDn.h: torch's nvidia-*
# dependencies carry those in site-packages/nvidia/*/include. CPATH hands them to the host
# compiler and to nvcc (which preprocesses with the host compiler).
NV_INC=$("$PY" - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(d for d in glob.glob(os.path.join(sp, "nvidia", "**", "include"), recursive=True)
                   if os.path.isdir(d))
print(":".join(dirs))
EOF
)
export CPATH=${NV_INC}${CPATH:+:$CPATH}

# Build in a mirror of the checkout kept beside the venv, not in the checkout: its build/
# belongs to the CPU build, and the mirror's build/ survives between CI runs, so ninja
# recompiles only what changed. Only files whose bytes differ are rewritten (and so get a
# new mtime): a fresh clone, whose every file is new, then costs no full rebuild.
SRC=$CACHE/cuda-src
[ -f "$CACHE/cuda-src.torch" ] && [ "$(cat "$CACHE/cuda-src.torch")" == "$TORCH_PIN" ] || rm -rf "$SRC"
mkdir -p "$SRC" && echo "$TORCH_PIN" > "$CACHE/cuda-src.torch"
{ git ls-files -co --exclude-standard -z 2>/dev/null || find . -path ./build -prune -o -type f -print0; } \
  | "$PY" -c '
import os, shutil, sys
src, dst = os.getcwd(), sys.argv[1]
keep = {p for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)}
changed = 0
for rel in keep:
    d = os.path.join(dst, rel)
    with open(rel, "rb") as f:
        data = f.read()
    if os.path.isfile(d):
        with open(d, "rb") as f:
            if f.read() == data:
                continue
    os.makedirs(os.path.dirname(d) or ".", exist_ok=True)
    with open(d, "wb") as f:
        f.write(data)
    shutil.copymode(rel, d)
    changed += 1
removed = 0
for top, dirs, files in os.walk(dst):
    dirs[:] = [x for x in dirs if os.path.relpath(os.path.join(top, x), dst) not in ("build", "dist")
               and not x.endswith(".egg-info")]
    for name in files:
        rel = os.path.relpath(os.path.join(top, name), dst)
        if rel not in keep:
            os.remove(os.path.join(top, name))
            removed += 1
print(f"[ci_cuda_build] mirror {dst}: {len(keep)} files, {changed} written, {removed} removed")
' "$SRC"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
stamp "compiling for sm_${TORCH_CUDA_ARCH_LIST//[.;]/} with MAX_JOBS=$MAX_JOBS (pip wheel --no-build-isolation --no-deps .)"
t1=$SECONDS
if ! (cd "$SRC" && "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" .) > "$WORK/build.log" 2>&1; then
  grep -E "error|Error|FAILED" "$WORK/build.log" | head -60 || true
  tail -40 "$WORK/build.log"
  stamp "FAILED: the CUDA extension does not compile (after $((SECONDS - t1)) s)"
  exit 1
fi
grep -E "diffkern build" "$WORK/build.log" | sort -u || true
stamp "compiled in $((SECONDS - t1)) s ($(grep -cE "^ *\[[0-9]+/[0-9]+\] " "$WORK/build.log" || true) ninja steps run)"

# The extension must load under the CUDA torch (no GPU needed to import it) and register a
# CUDA kernel for every op that has a CPU one: a binding file that compiled but did not
# register (or registered under another name) fails here.
"$PY" -m pip install -q --no-deps --no-index --target "$WORK/site" "$WORK"/dist/diffkern-*.whl
(cd "$WORK" && PYTHONPATH="$WORK/site" "$PY" - <<'EOF'
import os
import sys

import torch

import diffkern as dk

if not dk.native_available():
    sys.exit(f"[ci_cuda_build] FAILED: the extension does not load: {dk.native_error()}")
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("diffkern::"))
cpu = [o for o in ops if has(f"diffkern::{o}", "CPU")]
cuda = [o for o in ops if has(f"diffkern::{o}", "CUDA")]
# An op meant to be CPU-only is named in DIFFKERN_CI_CPU_ONLY_OPS (comma list).
cpu_only = set(filter(None, os.environ.get("DIFFKERN_CI_CPU_ONLY_OPS", "").split(",")))
missing = [o for o in cpu if o not in cuda and o not in cpu_only]
print(f"[ci_cuda_build] {len(ops)} ops; CPU kernels {len(cpu)}, CUDA kernels {len(cuda)}: {', '.join(cuda)}")
if missing or not cuda:
    sys.exit(f"[ci_cuda_build] FAILED: ops with a CPU kernel but no CUDA kernel: {', '.join(missing) or '(all)'}")
EOF
)
stamp "ok in $((SECONDS - t0)) s"

#!/usr/bin/env bash
# Download, HERE (a machine that reaches the package registry), the wheels that
# scripts/gpu_check.sh installs on the GPU machine, which has no network: diffusers (the
# step_speed/loop_speed baseline rows and tests/test_diffusers_equivalence.py) and those of
# its pure-Python requirements that the GPU image lacks. Into .whl/ (git-ignored), which
# the device tool must carry: run(..., carry=[".whl"]).
#
# The GPU image (Python 3.12, torch 2.11+cu130) already has filelock, huggingface_hub
# (1.33), numpy, Pillow, regex, requests, safetensors (0.8) and zipp: see
# /work/.library/device/KINDS.md. gpu_check.sh installs a carried wheel only when no
# distribution of that name is installed there, so carrying one that is present costs
# only bytes. Usage:  bash scripts/fetch_gpu_wheels.sh [NAME==VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
# diffusers: the version CI tests against here; importlib_metadata needs lazy-importer on
# Python < 3.15 (absent there); zipp: in case the image drops it.
DIFFUSERS=$(python -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || echo 0.42.1)
PKGS=("diffusers==$DIFFUSERS" "importlib_metadata" "lazy-importer" "zipp")
[ $# -gt 0 ] && PKGS=("$@")
mkdir -p "$DEST"
# The GPU machine's interpreter and platform (README of the device tool): cp312, x86-64.
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PKGS[@]}" 2>&1 \
  | grep -v "^WARNING: Location" || true
# Two versions of one package would stop the whole install there: keep the newest.
python - "$DEST" <<'EOF'
import os, re, sys
from collections import defaultdict

dest = sys.argv[1]
by_name = defaultdict(list)
for f in os.listdir(dest):
    if f.endswith(".whl"):
        by_name[re.sub(r"[-_.]+", "_", f.split("-")[0]).lower()].append(f)
for name, files in by_name.items():
    files.sort(key=lambda f: os.path.getmtime(os.path.join(dest, f)))
    for old in files[:-1]:
        print(f"removing older {old}")
        os.remove(os.path.join(dest, old))
EOF
ls -la "$DEST"
du -sh "$DEST"
echo "carry it: run(command=..., carry=[\"$DEST\"]); gpu_check.sh installs it (pip --no-index --no-deps)"

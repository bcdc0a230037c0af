"""Build diffkern's extension against the torch that is installed.

Install with ``pip install --no-build-isolation .``: the extension must be compiled
against the torch that will import it, and build isolation would compile it against a
freshly downloaded torch instead (which is also why pyproject.toml lists no torch).

Switches (environment):
  DIFFKERN_CUDA=auto|0|1   auto: build CUDA kernels when torch was built with CUDA and
                           nvcc is found (no visible GPU needed); 0: CPU only; 1: require.
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0").
  DIFFKERN_NATIVE=0        skip the extension entirely (pure-PyTorch reference only).
  DIFFKERN_MARCH           -march for the CPU code (default "native": the build machine).
  MAX_JOBS                 parallel compile jobs (ninja).
"""

import glob
import os
import platform
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[diffkern build] {msg}", file=sys.stderr)


def nvcc_version(nvcc):
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for tok in out.replace(",", " ").split():
        if tok.startswith("V") and tok[1:2].isdigit():
            return tok[1:]
    return None


def extension_modules():
    if os.environ.get("DIFFKERN_NATIVE", "1") == "0":
        log("DIFFKERN_NATIVE=0: installing the pure-PyTorch reference only")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        log("torch is not installed: installing the pure-PyTorch reference only "
            "(install torch first and use --no-build-isolation to build the kernels)")
        return [], {}

    want = os.environ.get("DIFFKERN_CUDA", "auto").lower()
    nvcc = None
    if ce.CUDA_HOME:
        cand = os.path.join(ce.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else shutil.which("nvcc")
    torch_cuda = torch.version.cuda
    if want in ("1", "true", "yes"):
        if not torch_cuda:
            raise RuntimeError("DIFFKERN_CUDA=1 but this torch was built without CUDA")
        if not nvcc:
            raise RuntimeError("DIFFKERN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        use_cuda = True
    elif want in ("0", "false", "no"):
        use_cuda = False
    else:
        use_cuda = bool(torch_cuda and nvcc)
    if use_cuda:
        nv = nvcc_version(nvcc)
        if nv and torch_cuda and nv.split(".")[0] != torch_cuda.split(".")[0]:
            raise RuntimeError(f"nvcc is CUDA {nv} but torch was built with CUDA {torch_cuda}: "
                               "point CUDA_HOME at a matching toolkit")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    march = os.environ.get("DIFFKERN_MARCH", "native")
    # -ffp-contract=off: the CPU code then rounds exactly like the PyTorch reference (no
    # fused multiply-adds), so native and reference agree bitwise in float32/float64.
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    if march:
        cxx.append(f"-march={march}")
        if platform.machine() in ("x86_64", "AMD64"):
            # Full-width AVX-512 where the CPU has it (gcc defaults to 256-bit vectors on
            # several cores): about 20% off the in-kernel normals; harmless elsewhere.
            cxx.append("-mprefer-vector-width=512")
    sources = sorted(glob.glob("csrc/torch/*.cpp") + glob.glob("csrc/torch/cpu/*.cpp"))
    macros = []
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if use_cuda:
        sources += sorted(glob.glob("csrc/torch/cuda/*.cpp") + glob.glob("csrc/kernels/*.cu"))
        macros.append(("DIFFKERN_WITH_CUDA", None))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo",
                                                "--expt-relaxed-constexpr"]
        ext = ce.CUDAExtension("diffkern._C", sources, define_macros=macros, **kwargs)
    else:
        ext = ce.CppExtension("diffkern._C", sources, define_macros=macros, **kwargs)
    log(f"torch {torch.__version__} (CUDA {torch_cuda}), nvcc {nvcc}, building "
        f"{'CPU+CUDA' if use_cuda else 'CPU'} extension; arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', '-')}; "
        f"-march={march or 'default'}; {len(sources)} sources")
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    name="diffkern",
    packages=find_packages(include=["diffkern", "diffkern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

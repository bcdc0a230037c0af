"""Build diffkern: ahead of time when torch is importable, else ship the sources for JIT.

* `pip install --no-build-isolation .` (or `-e .`, or `python setup.py build_ext --inplace`):
  torch is importable, so the extension is compiled now, against that torch: `diffkern._C`
  (schemas, autograd, CUDA) and one CPU library per instruction-set level,
  `diffkern._cpu_default`, `_cpu_avx2`, `_cpu_avx512` (x86-64; aarch64 builds its baseline
  only). The loader picks the level at run time (diffkern/_buildcfg.py says why and how).
  `diffkern/_build_info.json` records what it was built against, so that a build that no
  longer matches (another torch, changed sources) is refused before it is loaded.
* `pip install .` (build isolation: a fresh environment without torch): nothing is
  compiled; the C++/CUDA sources are installed as diffkern/_csrc and the first
  `import diffkern` compiles them against the running torch (diffkern/_jit.py).
  torch is deliberately not a build requirement: an isolated build would compile against a
  freshly downloaded torch, which is not the one that will import the extension.

Switches (environment):
  DIFFKERN_CUDA=auto|0|1        auto: build the CUDA kernels when torch was built with CUDA
                                and nvcc is found (no visible GPU needed); 0: CPU only; 1: require.
  TORCH_CUDA_ARCH_LIST          CUDA architectures (default "8.0;9.0+PTX": SASS for sm_80 and
                                sm_90, PTX of sm_90 so newer GPUs JIT-compile it).
  DIFFKERN_CPU_CAPABILITIES     comma list of CPU levels to build (default: all of this
                                architecture's: default,avx2,avx512 on x86-64).
  DIFFKERN_NATIVE=0             compile nothing now (the sources are still installed).
  MAX_JOBS                      parallel compile jobs (ninja).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_buildcfg():
    # By path: importing the package would import torch (absent in an isolated build).
    spec = importlib.util.spec_from_file_location("_diffkern_buildcfg", os.path.join(ROOT, "diffkern", "_buildcfg.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_buildcfg()


def log(msg):
    print(f"[diffkern build] {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Installs csrc/ as diffkern/_csrc: what a JIT build compiles, and what the run-time
    stale check hashes. (An editable install reads the checkout's csrc/ instead.)"""

    def run(self):
        super().run()
        if not os.path.isdir(CSRC):
            return
        dst = os.path.join(self.build_lib, "diffkern", "_csrc")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(CSRC, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


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
    cmdclass = {"build_py": BuildPyWithSources}
    if os.environ.get("DIFFKERN_NATIVE", "1") == "0":
        log("DIFFKERN_NATIVE=0: compiling nothing now (sources installed; JIT on first import unless DIFFKERN_JIT=0)")
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        log("torch is not importable here (an isolated build?): installing the C++/CUDA sources; the extension "
            "compiles on first import against the torch that runs it. To build now: pip install "
            "--no-build-isolation .")
        return [], cmdclass

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
    nv = None
    if use_cuda:
        nv = nvcc_version(nvcc)
        if nv and torch_cuda and nv.split(".")[0] != torch_cuda.split(".")[0]:
            raise RuntimeError(f"nvcc is CUDA {nv} but torch was built with CUDA {torch_cuda}: "
                               "point CUDA_HOME at a matching toolkit")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", B.DEFAULT_CUDA_ARCH_LIST)

    mach = B.machine()
    levels = B.levels(mach)
    chosen = os.environ.get("DIFFKERN_CPU_CAPABILITIES")
    if chosen:
        want_levels = [s.strip().lower() for s in chosen.split(",") if s.strip()]
        bad = [lv for lv in want_levels if lv not in levels]
        if bad:
            raise RuntimeError(f"DIFFKERN_CPU_CAPABILITIES: unknown level(s) {bad} on {mach} ({', '.join(levels)})")
        levels = tuple(lv for lv in levels if lv in want_levels)

    def rel(paths):  # setuptools wants paths relative to setup.py's folder
        return [os.path.relpath(p, ROOT).replace(os.sep, "/") for p in paths]

    exts = []
    core = rel(B.core_sources(CSRC, use_cuda))
    kw = dict(extra_link_args=list(B.COMMON_LD))
    if use_cuda:
        exts.append(ce.CUDAExtension("diffkern._C", core, define_macros=[("DIFFKERN_WITH_CUDA", None)],
                                     extra_compile_args={"cxx": B.core_cxx(), "nvcc": list(B.NVCC)}, **kw))
    else:
        exts.append(ce.CppExtension("diffkern._C", core, extra_compile_args={"cxx": B.core_cxx()}, **kw))
    for lv in levels:
        exts.append(ce.CppExtension(f"diffkern._cpu_{lv}", rel(B.cpu_sources(CSRC)),
                                    extra_compile_args={"cxx": B.cpu_cxx(lv, mach)}, **kw))

    info = {
        "kind": "aot", "torch": str(torch.__version__), "torch_cuda": torch_cuda, "with_cuda": use_cuda,
        "nvcc": nv, "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "nvcc_flags": list(B.NVCC) if use_cuda else None, "source_hash": B.source_hash(CSRC),
        "levels": list(levels),
        "cxx_flags": dict([("_C", B.core_cxx())] + [(f"_cpu_{lv}", B.cpu_cxx(lv, mach)) for lv in levels]),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "machine": mach,
        "compiler": os.environ.get("CXX", "c++"),
    }
    base = ce.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtensionWithInfo(base):
        """Writes _build_info.json beside the libraries once they are built."""

        def run(self):
            t0 = time.monotonic()
            super().run()
            out_dir = os.path.dirname(self.get_ext_fullpath("diffkern._C"))
            rec = dict(info, built_at=time.strftime("%Y-%m-%dT%H:%M:%S"), build_seconds=round(time.monotonic() - t0, 1))
            with open(os.path.join(out_dir, "_build_info.json"), "w") as fh:
                json.dump(rec, fh, indent=1)

        def get_outputs(self):
            out = super().get_outputs()
            return out + [os.path.join(os.path.dirname(self.get_ext_fullpath("diffkern._C")), "_build_info.json")]

    cmdclass["build_ext"] = BuildExtensionWithInfo
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "-") if use_cuda else "-"
    log(f"torch {torch.__version__} (CUDA {torch_cuda}), nvcc {nvcc}, building _C "
        f"({'CPU+CUDA' if use_cuda else 'CPU'}; arch list {arch}) "
        f"and CPU levels {', '.join(levels)}; {len(core)} + {len(B.cpu_sources(CSRC))} sources")
    return exts, cmdclass


ext_modules, cmdclass = extension_modules()

setup(
    name="diffkern",
    packages=find_packages(include=["diffkern", "diffkern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

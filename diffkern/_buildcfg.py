"""What diffkern's native libraries are compiled from and with: sources, flags, CPU levels.

Standard library only: setup.py loads this file by path (the package itself cannot be
imported during a build), and the run-time loader and the JIT builder import it, so an
ahead-of-time build and a JIT build compile the same sources with the same flags.

The extension is split in two kinds of library:
  _C            op schemas (registration.cpp), autograd, CUDA bindings and kernels:
                every csrc/torch/*.cpp, plus csrc/torch/cuda/*.cpp and csrc/kernels/*.cu
                in a CUDA build. Compiled for the compiler's default target.
  _cpu_<level>  the CPU kernels (every csrc/torch/cpu/*.cpp, which register themselves with
                TORCH_LIBRARY_IMPL(diffkern, CPU)), once per instruction-set level.
                Exactly one is loaded per process, after _C, chosen from what the CPU
                reports (as ATen picks its own kernels), so one build runs on any x86-64
                at the speed its CPU allows and never executes an instruction it lacks.
New source files join by being in those folders: nothing here lists them.
"""

from __future__ import annotations

import hashlib
import os
import platform

# -ffp-contract=off: the CPU code then rounds exactly like the PyTorch reference (no fused
# multiply-adds), so native and reference agree bitwise in float32/float64, at every level.
# -fno-math-errno lets sqrt/log vectorize. No -ffinite-math-only: NaNs must propagate.
# -fopenmp: at::parallel_for is an inline OpenMP loop, serial when compiled without it.
COMMON_CXX = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
COMMON_LD = ["-fopenmp"]
# The CPU libraries keep their symbols to themselves: an inline function compiled for
# AVX-512 in _cpu_avx512 must never be bound by _C (or the other way round).
CPU_LIB_CXX = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
NVCC = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]

# PTX of the newest architecture rides along, so GPUs newer than the list JIT-compile it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

X86_LEVELS = ("default", "avx2", "avx512")
# x86-64-v3 = Haswell/Zen: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE. x86-64-v4 adds AVX-512
# F/BW/CD/DQ/VL; 512-bit vectors preferred (gcc otherwise uses 256-bit ones on several
# cores): about 20% off the in-kernel normals.
X86_FLAGS = {
    "default": ["-march=x86-64", "-mtune=generic"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
}
# What /proc/cpuinfo must list for each level (Linux spelling); "abm" is LZCNT.
X86_CPUINFO = {
    "default": set(),
    "avx2": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"},
    "avx512": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm",
               "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
AARCH64_FLAGS = {"default": ["-march=armv8-a"]}

SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu")


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def levels(mach: str | None = None) -> tuple[str, ...]:
    """The CPU levels built for this architecture, lowest first."""
    return X86_LEVELS if (mach or machine()) == "x86_64" else ("default",)


def level_flags(level: str, mach: str | None = None) -> list[str]:
    mach = mach or machine()
    if mach == "x86_64":
        return list(X86_FLAGS[level])
    if mach == "aarch64":
        return list(AARCH64_FLAGS[level])
    return []  # other architectures: the compiler's default target


def core_cxx() -> list[str]:
    return list(COMMON_CXX)


def cpu_cxx(level: str, mach: str | None = None) -> list[str]:
    return COMMON_CXX + CPU_LIB_CXX + level_flags(level, mach)


def core_sources(root: str, with_cuda: bool) -> list[str]:
    """_C's sources under the csrc folder `root` (absolute paths, sorted)."""
    out = _glob(root, "torch", (".cpp",))
    if with_cuda:
        out += _glob(root, os.path.join("torch", "cuda"), (".cpp",)) + _glob(root, "kernels", (".cu",))
    return out


def cpu_sources(root: str) -> list[str]:
    return _glob(root, os.path.join("torch", "cpu"), (".cpp",))


def _glob(root: str, sub: str, suffixes) -> list[str]:
    d = os.path.join(root, sub)
    if not os.path.isdir(d):
        return []
    files = (os.path.join(d, f) for f in os.listdir(d) if f.endswith(suffixes))
    return sorted(p for p in files if os.path.isfile(p))


def source_hash(root: str) -> str:
    """sha256 over every source and header under `root` (relative paths and contents):
    the same sources give the same hash wherever they were copied."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if not f.endswith(SOURCE_SUFFIXES):
                continue
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            with open(p, "rb") as fh:
                data = fh.read()
            h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def cpuinfo_flags() -> set[str] | None:
    """The feature flags Linux reports for this CPU, or None where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def supported_levels() -> list[str]:
    """The levels this CPU runs, lowest first.

    On x86-64 a level must pass two checks: torch's (cpuid through the cpuinfo library,
    which also checks that the OS saves the AVX-512 registers, and which an emulator
    answers for the emulated CPU) and, where Linux has /proc/cpuinfo, every flag the level's
    -march implies (a VM may hide single features). Under user-mode emulation
    /proc/cpuinfo describes the host, so the cpuid answer is the one that limits.
    """
    mach = machine()
    if mach != "x86_64":
        return ["default"]
    out = ["default"]
    flags = cpuinfo_flags()
    cpuid = _torch_cpuid()
    for level in ("avx2", "avx512"):
        if cpuid is not None and not cpuid[level]:
            break
        if flags is not None and not X86_CPUINFO[level] <= flags:
            break
        if cpuid is None and flags is None:
            break
        out.append(level)
    return out


def _torch_cpuid() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and hasattr(cpu, "_is_avx512_supported") and hasattr(cpu, "_is_avx2_supported"):
        return {"avx2": bool(cpu._is_avx2_supported()), "avx512": bool(cpu._is_avx512_supported())}
    try:  # older torch: its own choice, which ATEN_CPU_CAPABILITY may have lowered
        cap = torch.backends.cpu.get_cpu_capability().upper()
    except Exception:
        return None
    return {"avx2": cap in ("AVX2", "AVX512"), "avx512": cap == "AVX512"}

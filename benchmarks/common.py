"""Helpers shared by the diffkern benchmarks: importing the checkout, parsing sizes and
dtypes, timing (perf_counter on the CPU, CUDA events on the GPU), statistics, machine
and version information, progress and JSON output.

Timing rules (see README.md): every measurement is preceded by warm-up calls, each call
is timed on its own, and the summary is the median with the interquartile range.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def import_diffkern():
    """``import diffkern``, falling back to this checkout when it is not installed."""
    try:
        import diffkern
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import diffkern
    return diffkern


def import_diffusers():
    """(module, None) or (None, reason): diffusers is optional."""
    try:
        import diffusers
    except Exception as e:  # absent, or broken by a dependency (transformers, hub, ...)
        return None, f"diffusers not importable ({type(e).__name__}: {e})".splitlines()[0][:200]
    return diffusers, None


# ---- parsing -----------------------------------------------------------------------------
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtypes(spec: str) -> list[torch.dtype]:
    out = []
    for name in split_list(spec):
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
        if DTYPES[name] not in out:
            out.append(DTYPES[name])
    return out


def parse_shape(spec: str) -> tuple[int, ...]:
    """'64x4x128x128' -> (64, 4, 128, 128); '1e7x2' -> (10000000, 2)."""
    try:
        dims = tuple(int(float(d)) for d in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad size {spec!r}: write it like 64x4x128x128 or 1e7x2") from None
    if not dims or any(d <= 0 for d in dims):
        raise SystemExit(f"bad size {spec!r}: every dimension must be positive")
    return dims


def shape_str(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


def split_list(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def resolve_devices(spec: str) -> list[torch.device]:
    """'auto' = the CPU, plus CUDA when available; otherwise a comma list."""
    names = ["cpu", "cuda"] if spec == "auto" else split_list(spec)
    devices = []
    for n in names:
        dev = torch.device(n)
        if dev.type == "cuda" and not torch.cuda.is_available():
            if spec == "auto":
                continue
            raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        devices.append(dev)
    return devices


# ---- timing ------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], n: int, device: torch.device, start: int = 0) -> list[float]:
    """Milliseconds of each of ``n`` calls ``fn(start + i)``, issued back to back.

    CPU: wall time of each call. CUDA: GPU time between events recorded around each call,
    so a call that the host cannot issue fast enough is charged for the GPU's idle wait."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda.synchronize(device)
        for i, (a, b) in enumerate(events):
            a.record()
            fn(start + i)
            b.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in events]
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(start + i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call including its device work (synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_medians(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms per call of each of ``runs`` (CPU, synchronous), the calls interleaved
    (one of each per round, after one warm-up call each: output cache, first touch), so a
    noisy shared machine slows every row alike."""
    for f in runs.values():
        f()
    ms = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ms.items()}


def summarize(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "min_ms": float(a.min()), "reps": int(a.size)}


def reps_for(estimate_s: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    """As many repetitions as fit in ``budget_s``, within [min_reps, max_reps]."""
    if estimate_s <= 0:
        return max_reps
    return int(min(max_reps, max(min_reps, math.floor(budget_s / estimate_s))))


# ---- machine -----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cache_bytes() -> int:
    """Largest CPU cache (the LLC) from sysfs; 32 MiB when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            s = (idx / "size").read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return cpu_cache_bytes()


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def machine_info(devices: list[torch.device]) -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_llc_bytes": cpu_cache_bytes(),
        "loadavg_start": loadavg(),
        "gpus": [],
    }
    for dev in devices:
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            info["gpus"].append({"device": str(dev), "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_bytes": int(p.total_memory), "sm_count": p.multi_processor_count,
                                 "l2_bytes": cache_bytes(dev)})
    return info


def versions(diffusers_mod=None) -> dict:
    dk = import_diffkern()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "numpy": np.__version__,
        "diffusers": getattr(diffusers_mod, "__version__", None),
        "diffkern": getattr(dk, "__version__", None),
        "diffkern_path": str(Path(dk.__file__).resolve().parent),
    }


def native_info(devices: list[torch.device]) -> dict:
    dk = import_diffkern()
    return {"error": dk.native_error(), **{str(d.type): bool(dk.native_available(d)) for d in devices}}


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: a busy machine makes every number noisier."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def warn_if_busy() -> None:
    """Other processes on the CPU make every timing noisy (and multithreaded CPU code
    stall on descheduled threads): say so up front."""
    load, n = loadavg(), os.cpu_count() or 1
    if load and load[0] > 0.75 * n:
        print(f"warning: load average {load[0]:.1f} on {n} CPUs: the machine is busy, timings will be noisy "
              "(see the IQR columns; --threads 1 helps on the CPU)", file=sys.stderr)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- output ------------------------------------------------------------------------------
def progress(total: int, desc: str):
    """tqdm on stderr when installed, else a line per step."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=0.5)
    except ImportError:
        return _PrintProgress(total, desc)


class _PrintProgress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0

    def set_postfix_str(self, s: str) -> None:
        print(f"[{self.desc} {self.n}/{self.total}] {s}", file=sys.stderr, flush=True)

    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass


def record(what: str, script: str, argv, **fields) -> dict:
    """A results file's common head (what, when, the command that made it, the CPU
    machine, versions, the native build), then ``fields``."""
    cpu = [torch.device("cpu")]
    return {"what": what, "when": now_iso(), "command": f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:]),
            **fields, "machine": machine_info(cpu), "versions": versions(), "native": native_info(cpu)}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def fmt_ms(v: float | None) -> str:
    """Milliseconds with three significant digits, never in exponent notation."""
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{max(2 - math.floor(math.log10(v)), 0)}f}" if v > 0 else "0"


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")

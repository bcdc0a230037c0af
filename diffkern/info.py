"""What this diffkern runs and how it was built: `python -m diffkern.info`, `diffkern.show_config()`.

Versions; which implementation each op uses on each device; whether the native libraries
were built ahead of time or by JIT, against which torch/CUDA, for which CUDA architectures,
with which compiler flags; the CPU level selected and those the CPU supports; threads; the
JIT cache; and the reason when the native ops are off.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import _native

# Public functions of the package that are not ops.
_NOT_OPS = {"native_available", "native_error", "show_config"}
# Ops without a kernel of their own.
_COMPOSITE = {"annealed_langevin": "Python loop over langevin_step", "gmm_score": "pure PyTorch (no kernel)"}


def _public_ops() -> list[str]:
    import diffkern as dk

    return [n for n in dk.__all__ if n not in _NOT_OPS and callable(getattr(dk, n, None))
            and type(getattr(dk, n)).__name__ == "function"]


def _has_kernel(op: str, key: str) -> bool:
    name = f"diffkern::{op}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, key))
    except RuntimeError:  # no such schema
        return False


def implementations() -> dict[str, dict[str, str]]:
    """{op: {"cpu": ..., "cuda": ...}}: "native (<level>)", "native", or "reference (why)"."""
    st = _native.state()
    on = _native.native_available()
    cuda_dev = torch.cuda.is_available()
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("diffkern::")] if on else []
    out = {}
    for op in _public_ops():
        if op in _COMPOSITE:
            out[op] = {"cpu": _COMPOSITE[op], "cuda": _COMPOSITE[op]}
            continue
        row = {}
        if not on:
            row["cpu"] = row["cuda"] = "reference (native off)"
        elif f"diffkern::{op}" not in ops:
            row["cpu"] = row["cuda"] = "reference (no kernel)"
        else:
            row["cpu"] = f"native ({st['level']})" if _has_kernel(op, "CPU") else "reference (no CPU kernel)"
            if not _has_kernel(op, "CUDA"):
                row["cuda"] = "reference (built without CUDA)" if not _native.built_with_cuda() else \
                    "reference (no CUDA kernel)"
            else:
                row["cuda"] = "native" if cuda_dev else "native (no CUDA device visible)"
        out[op] = row
    return out


def config() -> dict:
    """Everything show_config() prints, as a dict."""
    import diffkern as dk

    st = _native.state()
    return {
        "diffkern": dk.__version__, "diffkern_path": os.path.dirname(os.path.abspath(dk.__file__)),
        "torch": str(torch.__version__), "torch_cuda": torch.version.cuda, "python": platform.python_version(),
        "machine": platform.machine(), "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "native": _native.native_available(), "native_error": _native.native_error(),
        "native_cuda": _native.native_available("cuda"), **st,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ops": implementations(),
    }


def format_config(c: dict | None = None) -> str:
    c = c or config()
    b = c.get("build") or {}
    lines = [f"diffkern {c['diffkern']} ({c['diffkern_path']})",
             f"torch {c['torch']} (CUDA {c['torch_cuda'] or 'none'}), Python {c['python']}, {c['machine']}, "
             f"{c['cuda_devices']} CUDA device(s) visible"]
    if c["native"]:
        how = {"aot": "built ahead of time (setup.py)", "jit": "built by JIT on first use"}.get(c["kind"], c["kind"])
        lines.append(f"native: on, {how}")
        for name, path in c["libraries"].items():
            lines.append(f"  {name}: {path}")
        lines.append(f"  built against torch {b.get('torch')} (CUDA {b.get('torch_cuda') or 'none'}), Python "
                     f"{b.get('python')}, {b.get('built_at', '?')}, {b.get('build_seconds', '?')} s")
        if c["aot_skipped"]:
            lines.append(f"  (ahead-of-time build not used: {c['aot_skipped']})")
    else:
        lines.append(f"native: off: {c['native_error']}")
    if b.get("with_cuda"):
        lines.append(f"CUDA kernels: arch list {b.get('cuda_arch_list')}, nvcc {b.get('nvcc')}, "
                     f"flags {' '.join(b.get('nvcc_flags') or [])}")
    elif c["native"]:
        lines.append(f"CUDA kernels: not built ({b.get('cuda_skipped') or 'CPU build'})")
    forced = f"forced by DIFFKERN_CPU_CAPABILITY={c['forced_level']}" if c["forced_level"] else "highest supported"
    lines.append(f"CPU level: {c['level'] or 'none'} ({forced}); this CPU supports "
                 f"{', '.join(c['supported_levels'] or []) or '?'}; built: {', '.join(b.get('levels', [])) or '-'}")
    for lib, flags in (b.get("cxx_flags") or {}).items():
        lines.append(f"  {lib} flags: {' '.join(flags)}")
    if b.get("source_hash"):
        lines.append(f"  source hash {b['source_hash'][:16]}")
    omp = c["omp_num_threads"] or "unset"
    lines.append(f"threads: {c['threads']} (torch.get_num_threads(); OMP_NUM_THREADS={omp})")
    lines.append(f"JIT: {'on' if c['jit_enabled'] else 'off (DIFFKERN_JIT=0)'}, cache {c['jit_cache']}")
    ops = c["ops"]
    w = max(len(n) for n in ops) + 2
    wc = max(len(r["cpu"]) for r in ops.values()) + 2
    lines.append(f"{'op':<{w}}{'cpu':<{wc}}cuda")
    for name, r in ops.items():
        lines.append(f"{name:<{w}}{r['cpu']:<{wc}}{r['cuda']}")
    return "\n".join(lines)


def show_config(file=None) -> None:
    """Prints how diffkern is built and which implementation each op uses (like numpy.show_config)."""
    print(format_config(), file=file or sys.stdout)


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m diffkern.info", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the configuration as JSON")
    a = ap.parse_args(argv)
    if a.json:
        print(json.dumps(config(), indent=1, default=str))
    else:
        show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())

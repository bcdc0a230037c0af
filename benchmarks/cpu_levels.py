"""Per-call cost of the CPU libraries of each instruction-set level, each forced with
DIFFKERN_CPU_CAPABILITY in its own process, in alternating rounds.

Reports thread CPU time per call on one thread (median over calls, then over rounds): on a
shared machine wall time measures the queue for a core, CPU time measures the call.
`--baseline DIR` adds a row for another diffkern (its package's parent folder, e.g. a
checkout of an older commit with its own build).

    python benchmarks/cpu_levels.py --rounds 7
    python benchmarks/cpu_levels.py --baseline /tmp/old_checkout --levels avx512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch
import diffkern as dk
torch.set_num_threads(1)
assert dk.native_available(), dk.native_error()
shape = tuple(int(s) for s in sys.argv[1].split("x"))
calls = int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x, m = torch.randn(shape), torch.randn(shape)
ops = {"ddim_step eta=0": lambda: dk.ddim_step(x, m, 500, 0.0),
       "ddim_step eta=1": lambda: dk.ddim_step(x, m, 500, 1.0, generator=g),
       "q_sample": lambda: dk.q_sample(x, 500, generator=g)}
res = {}
for name, f in ops.items():
    for _ in range(3):
        f()
    cpu = []
    for _ in range(calls):
        c0 = time.thread_time()
        f()
        cpu.append(time.thread_time() - c0)
    res[name] = statistics.median(cpu) * 1e3
print("RES" + json.dumps(res))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=None, help="comma list (default: every level this CPU runs)")
    ap.add_argument("--baseline", default=None, help="folder holding another diffkern package")
    ap.add_argument("--size", default="64x4x128x128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=25)
    a = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if a.levels:
        levels = a.levels.split(",")
    else:
        sys.path.insert(0, os.path.join(here, "diffkern"))
        import _buildcfg

        levels = _buildcfg.supported_levels()
    rows = ([("baseline", a.baseline, {})] if a.baseline else []) + [
        (lv, here, {"DIFFKERN_CPU_CAPABILITY": lv}) for lv in levels]
    got: dict = {}
    for _ in range(a.rounds):
        for name, path, extra in rows:
            env = dict(os.environ, PYTHONPATH=path, DIFFKERN_JIT="0", **extra)
            r = subprocess.run([sys.executable, "-c", CHILD, a.size, str(a.calls)], env=env, cwd="/",
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: failed\n{r.stderr}", file=sys.stderr)
                return 1
            res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RES")][-1][3:])
            for op, ms in res.items():
                got.setdefault(op, {}).setdefault(name, []).append(ms)
    print(f"thread CPU ms per call, 1 thread, {a.size} float32, median of {a.rounds} rounds (each round's value)")
    for op, by in got.items():
        cells = [f"{n} {statistics.median(v):.2f} ({'/'.join(f'{x:.2f}' for x in v)})" for n, v in by.items()]
        print(f"  {op:<16} " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""linear_step against the memory floor and the eager formula, side by side.

Each case is a multistep update as the samplers call it (J inputs, K outputs, optional
noise): the fused op, the eager torch formula (``c0 * x + c1 * m + ...``, one op per
term), and a copy (``copy_`` into a preallocated tensor) of the same logical bytes (J reads
+ K writes: J + K tensors' worth, the floor any implementation pays). Calls are
interleaved (fused, eager, copy, fused, ...)
so a noisy machine shifts all three alike; the summary is the median per call.

    python benchmarks/linear_step_speed.py                       # 64x4x128x128 fp32, 1 thread
    python benchmarks/linear_step_speed.py --shape 1x4x64x64 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import DEFAULT_OUT, import_diffkern, machine_info, now_iso, parse_shape, shape_str, versions, write_json

dk = import_diffkern()

# (name, J inputs, K outputs, noise): the shapes of the samplers' updates
CASES = [
    ("dpm++ 2M (x, D, D1 -> x', D)", 3, 2, False),
    ("dpm++ 3M SDE (x, m, D1, D2 + z -> x', D)", 4, 2, True),
    ("UniPC P+C (x, m, last, D1, D2 -> xc, D, x')", 5, 3, False),
    ("PLMS (x, e, e1, e2, e3 -> x')", 5, 1, False),
    ("euler ancestral (x, m + z -> x')", 2, 1, True),
]


def _time(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _case(shape, g, J, K, noisy, reps) -> dict:
    """Median ms per call of the fused op, the eager formula and the copy floor, interleaved."""
    ins = [torch.randn(shape, generator=g) for _ in range(J)]
    c = [[0.5 + 0.1 * (k + j) for j in range(J)] for k in range(K)]
    cn = [0.3] * K if noisy else None
    floor_src = torch.randn((J + K,) + shape, generator=g)
    floor_dst = torch.empty_like(floor_src)  # preallocated: a copy without page faults

    def fused():
        return dk.linear_step(ins, c, noise_coeffs=cn, generator=g if noisy else None)

    def eager():
        z = torch.randn(shape, generator=g) if noisy else None
        outs = []
        for k in range(K):
            acc = ins[0] * c[k][0]
            for j in range(1, J):
                acc = acc + ins[j] * c[k][j]
            if z is not None:
                acc = acc + cn[k] * z
            outs.append(acc)
        return outs

    def floor():
        return floor_dst.copy_(floor_src)

    fns = {"fused": fused, "eager": eager, "floor": floor}
    for f in fns.values():
        f()
    t = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t[k] += _time(f, 1)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x4x128x128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shape = parse_shape(a.shape)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"linear_step, {shape_str(shape)} fp32, {a.threads} thread(s), native={dk.native_available()}")
    print(f"{'case':48s} {'fused ms':>9s} {'eager ms':>9s} {'floor ms':>9s} {'fused/floor':>11s} {'eager/fused':>11s}")
    for name, J, K, noisy in CASES:
        med = _case(shape, g, J, K, noisy, a.reps)
        # the copy reads and writes J + K tensors; the op reads J and writes K: the floor
        # of the op is half the copy's traffic
        floor_ms = med["floor"] / 2
        rows.append({"case": name, "inputs": J, "outputs": K, "noise": noisy, "fused_ms": med["fused"],
                     "eager_ms": med["eager"], "floor_ms": floor_ms})
        print(f"{name:48s} {med['fused']:9.2f} {med['eager']:9.2f} {floor_ms:9.2f} "
              f"{med['fused'] / floor_ms:10.2f}x {med['eager'] / med['fused']:10.2f}x")
    out = Path(a.out) if a.out else DEFAULT_OUT / f"linear_step-cpu-{shape_str(shape)}-{a.threads}thread.json"
    write_json(out, {"when": now_iso(), "shape": list(shape), "threads": a.threads,
                     "machine": machine_info([torch.device("cpu")]), "versions": versions(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

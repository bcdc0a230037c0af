"""A step on channels_last operands against the same step on contiguous ones, per op, on one
CPU thread, calls interleaved (contiguous, channels_last, copy floor) and medians taken.

The ratio is what keeping x's layout costs. Steps that draw noise run in logical order
(the Philox counter is the logical index), so they read channels_last operands through
strides; the others run in memory order.

    PYTHONPATH=. DIFFKERN_JIT=0 python benchmarks/channels_last_speed.py --shape 16x4x64x64 \
        --json benchmarks/results/channels_last-cpu-16x4x64x64-1thread.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import interleaved_medians, machine_info, now_iso, parse_shape, versions, write_json

import diffkern as dk


def cases(shape):
    B = shape[0]
    s = torch.full((B,), 1.5, dtype=torch.float64)
    sn, sp = s / 3, s * 2
    t, tp = torch.full((B,), 700), torch.full((B,), 500)

    def g():
        return torch.Generator().manual_seed(0)

    return {
        "euler_step": lambda x, m: dk.euler_step(x, m, s, sn),
        "euler_step eta=1 (draws)": lambda x, m: dk.euler_step(x, m, s, sn, eta=1.0, generator=g()),
        "heun_step": lambda x, m: dk.heun_step(x, m, x, m, s, sn),
        "dpmpp_2m_step": lambda x, m: dk.dpmpp_2m_step(x, m, m, s, sn, sp),
        "flow_step": lambda x, m: dk.flow_step(x, m, s / 2, sn / 2),
        "lcm_step (noise given)": lambda x, m: dk.lcm_step(x, m, t, tp, noise=m),
        "linear_step 2->2": lambda x, m: dk.linear_step([x, m], [[1.0, 0.5], [0.2, 0.8]]),
        "ddim_step eta=0": lambda x, m: dk.ddim_step(x, m, t, 0.0, t_prev=tp),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="16x4x64x64")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = parse_shape(args.shape)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x, m = torch.randn(*shape).to(dtype), torch.randn(*shape).to(dtype)
    xl, ml = x.contiguous(memory_format=fmt), m.contiguous(memory_format=fmt)
    rows = []
    for name, call in cases(shape).items():
        runs = {"contiguous": lambda c=call: c(x, m), "channels_last": lambda c=call: c(xl, ml),
                "copy floor": lambda: x.clone()}
        med = interleaved_medians(runs, args.reps)
        out = call(xl, ml)
        out = out[0] if isinstance(out, tuple) else out
        assert out.is_contiguous(memory_format=fmt)
        row = {"case": name, "contiguous_ms": med["contiguous"], "channels_last_ms": med["channels_last"],
               "floor_ms": med["copy floor"], "ratio": med["channels_last"] / med["contiguous"]}
        rows.append(row)
        print(f"{name:28s} contiguous {row['contiguous_ms']:8.3f} ms  channels_last {row['channels_last_ms']:8.3f} ms"
              f"  ratio {row['ratio']:5.2f}  (copy floor {row['floor_ms']:.3f} ms)")
    if args.json:
        write_json(args.json, {"when": now_iso(), "shape": list(shape), "dtype": args.dtype, "threads": 1,
                               "machine": machine_info([torch.device("cpu")]), "versions": versions(),
                               "native": dk.native_available(), "rows": rows})


if __name__ == "__main__":
    main()

"""What per-sample keys cost: each noisy op called with ``seeds=``/``step=`` against the same
call keyed by a generator, calls interleaved, medians taken. Both draw in the step's own
pass (README "Reproducible noise"), so the ratio is the price of the per-sample key.

    PYTHONPATH=. DIFFKERN_JIT=0 python benchmarks/keyed_noise_speed.py --shapes 16x4x64x64,64x4x128x128 \
        --json benchmarks/results/keyed_noise-cpu-2threads.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import interleaved_medians, machine_info, now_iso, parse_shape, versions, write_json

import diffkern as dk


def cases(B):
    t = torch.full((B,), 700)
    s = torch.linspace(2.0, 1.0, B, dtype=torch.float64)
    seeds = torch.arange(1000, 1000 + B)

    def g():
        return torch.Generator().manual_seed(0)

    return {
        "q_sample": (lambda x, m: dk.q_sample(x, t, generator=g()),
                     lambda x, m: dk.q_sample(x, t, seeds=seeds, step=3)),
        "ddim_step eta=1": (lambda x, m: dk.ddim_step(x, m, t, 1.0, generator=g()),
                            lambda x, m: dk.ddim_step(x, m, t, 1.0, seeds=seeds, step=3)),
        "euler_step ancestral": (lambda x, m: dk.euler_step(x, m, s, s * 0.7, eta=1.0, generator=g()),
                                 lambda x, m: dk.euler_step(x, m, s, s * 0.7, eta=1.0, seeds=seeds, step=3)),
        "flow_step stochastic": (lambda x, m: dk.flow_step(x, m, s / 4, s / 5, stochastic=True, generator=g()),
                                 lambda x, m: dk.flow_step(x, m, s / 4, s / 5, stochastic=True, seeds=seeds, step=3)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16x4x64x64,64x4x128x128")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.shapes.split(","):
        shape = parse_shape(spec)
        x, m = torch.randn(*shape), torch.randn(*shape)
        for name, (gen_call, keyed_call) in cases(shape[0]).items():
            runs = {"generator": lambda f=gen_call, x=x, m=m: f(x, m), "seeds": lambda f=keyed_call, x=x, m=m: f(x, m)}
            med = interleaved_medians(runs, args.reps)
            row = {"shape": list(shape), "case": name, "generator_ms": med["generator"], "seeds_ms": med["seeds"],
                   "ratio": med["seeds"] / med["generator"]}
            rows.append(row)
            print(f"{spec:14s} {name:22s} generator {med['generator']:8.3f} ms  seeds {med['seeds']:8.3f} ms  "
                  f"ratio {row['ratio']:.3f}")
    if args.json:
        write_json(args.json, {"when": now_iso(), "threads": args.threads, "reps": args.reps,
                               "machine": machine_info([torch.device("cpu")]), "versions": versions(),
                               "native": dk.native_available(), "rows": rows})


if __name__ == "__main__":
    main()

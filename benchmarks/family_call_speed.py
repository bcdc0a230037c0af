"""Host cost per call of the sampler-family ops beside their eager formulas (issue 20).

    python benchmarks/family_call_speed.py                  # 1x4x8x8 and 1x4x64x64, one thread
    python benchmarks/family_call_speed.py --shapes 1x4x8x8 --rounds 200

For each shape, every row is timed in blocks of ``--block`` calls, the blocks of all rows
interleaved round after round (a noisy shared machine slows every row alike); the figure
is the median over rounds of the block's mean, in microseconds per call. Ratios divide a
diffkern call by its eager formula measured in the same rounds:

- the eager formulas are what k-diffusion / diffusers run per step, written with Python
  float coefficients precomputed (the cheapest eager form: no tensor sigma arithmetic);
- ``euler / ddim`` divides ``dk.euler_step`` by the front door ``dk.ddim_step`` (the
  issue's target: at most 1.5x).

Targets (issue 20): every family op <= 1.0x its eager formula at 1x4x8x8 and 1x4x64x64;
euler <= 1.5x ddim. Results: benchmarks/results/family_call-cpu-<shape>-1thread.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

dk = C.import_diffkern()


def rows_for(shape):
    g = torch.Generator().manual_seed(0)
    x, e, xp, ep = (torch.randn(shape, generator=g) for _ in range(4))
    z = torch.randn(shape, generator=g)
    gen = torch.Generator().manual_seed(1)
    # sigma 2 -> 1 (sigma_prev 3), "sample" prediction; the eager coefficients as floats
    h = math.log(2.0)
    r = math.log(3.0 / 2.0) / h
    cd = 1 + 1 / (2 * r)
    up = math.sqrt(1.0 * (4.0 - 1.0) / 4.0)
    down = math.sqrt(1.0 - up * up)
    ts = dk.NoiseSchedule.linear()
    ab, ab_prev = float(ts.alphas_cumprod[499]), float(ts.alphas_cumprod[299])
    c_skip, c_out = 0.25 / (4990.0**2 + 0.25), 4990.0 / math.sqrt(4990.0**2 + 0.25)
    sa, s1a = math.sqrt(ab), math.sqrt(1 - ab)

    def eager_lcm():
        x0 = (x - s1a * e) / sa
        den = c_out * x0 + c_skip * x
        return math.sqrt(ab_prev) * den + math.sqrt(1 - ab_prev) * z

    return [
        # (group, name, callable); the first row of a group is diffkern's, the second the eager one
        ("ddim", "dk.ddim_step(x, e, 500, t_prev=480)", lambda: dk.ddim_step(x, e, 500, t_prev=480)),
        ("euler", "dk.euler_step(x, e, 2.0, 1.0)", lambda: dk.euler_step(x, e, 2.0, 1.0)),
        ("euler", "eager: x + (x - e) / 2 * (1 - 2)", lambda: x + (x - e) / 2.0 * (1.0 - 2.0)),
        ("euler_a", "dk.euler_step(..., eta=1, generator=g)",
         lambda: dk.euler_step(x, e, 2.0, 1.0, eta=1.0, generator=gen)),
        ("euler_a", "eager: x + d (down - 2) + randn * up",
         lambda: x + (x - e) / 2.0 * (down - 2.0) + torch.randn(shape, generator=gen) * up),
        ("heun", "dk.heun_step(x, e, xp, ep, 2.0, 1.0)", lambda: dk.heun_step(x, e, xp, ep, 2.0, 1.0)),
        ("heun", "eager: x + ((x - e)/2 + (xp - ep)/1)/2 * (1 - 2)",
         lambda: x + ((x - e) / 2.0 + (xp - ep) / 1.0) / 2.0 * (1.0 - 2.0)),
        ("dpmpp_2m", "dk.dpmpp_2m_step(x, e, ep, 2.0, 1.0, 3.0)", lambda: dk.dpmpp_2m_step(x, e, ep, 2.0, 1.0, 3.0)),
        ("dpmpp_2m", "eager: 0.5 x - expm1(-h) (cd e - (cd - 1) old)",
         lambda: 0.5 * x - math.expm1(-h) * (cd * e - (cd - 1) * ep)),
        ("flow", "dk.flow_step(x, e, 0.8, 0.6)", lambda: dk.flow_step(x, e, 0.8, 0.6)),
        ("flow", "eager: x + (0.6 - 0.8) * e", lambda: x + (0.6 - 0.8) * e),
        ("flow_q", "dk.flow_q_sample(x, 0.3, z)", lambda: dk.flow_q_sample(x, 0.3, z)),
        ("flow_q", "eager: (1 - 0.3) * x + 0.3 * z", lambda: (1 - 0.3) * x + 0.3 * z),
        ("lcm", "dk.lcm_step(x, e, 499, 299, noise=z)", lambda: dk.lcm_step(x, e, 499, 299, noise=z)),
        ("lcm", "eager: x0, c_out x0 + c_skip x, renoise", eager_lcm),
    ]


def measure(shape, rounds: int, block: int) -> dict:
    rows = rows_for(shape)
    for _, _, f in rows:  # warm-up: output caches, first touch, lazy init
        for _ in range(block):
            f()
    per = {name: [] for _, name, _ in rows}
    bar = C.progress(rounds, C.shape_str(shape))
    for _ in range(rounds):
        for _, name, f in rows:
            t0 = time.perf_counter()
            for _ in range(block):
                f()
            per[name].append((time.perf_counter() - t0) / block * 1e6)
        bar.update(1)
    bar.close()
    us = {name: statistics.median(v) for name, v in per.items()}
    groups: dict[str, list[str]] = {}
    for group, name, _ in rows:
        groups.setdefault(group, []).append(name)
    ratios = {}
    for group, names in groups.items():
        if len(names) == 2:
            ratios[f"{group} / eager"] = us[names[0]] / us[names[1]]
    ratios["euler / ddim"] = us[groups["euler"][0]] / us[groups["ddim"][0]]
    return {"shape": list(shape), "us_per_call": us, "ratios": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x4x8x8,1x4x64x64")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--block", type=int, default=200, help="calls per timed block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(C.DEFAULT_OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    C.warn_if_busy()
    for spec in C.split_list(args.shapes):
        shape = C.parse_shape(spec)
        r = measure(shape, args.rounds, args.block)
        print(f"\n{C.shape_str(shape)}, {args.threads} thread(s): median us per call (blocks of {args.block}, "
              f"{args.rounds} interleaved rounds)")
        for name, v in r["us_per_call"].items():
            print(f"  {v:8.2f}  {name}")
        for k, v in r["ratios"].items():
            print(f"  {v:8.2f}x {k}")
        out = C.record("host us per call, sampler-family ops vs eager formulas (issue 20)", "family_call_speed.py",
                       argv, threads=args.threads, **r)
        path = Path(args.out) / f"family_call-cpu-{C.shape_str(shape)}-{args.threads}thread.json"
        C.write_json(path, out)
        print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

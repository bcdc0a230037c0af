#!/usr/bin/env python
"""The sampler-family rows of step_speed.py timed as the calling thread's CPU time.

    python benchmarks/sampler_thread_time.py

For a machine too loaded for wall-clock timing: ``time.thread_time`` does not count the
time the thread spends descheduled. One thread, 64x4x128x128 float32, native / copy /
eager / diffusers rows (step_speed.py's builders) called in turns, 12 calls each; prints
the medians and the ratios to native.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_speed as S  # noqa: E402

CASES = [("euler_step", {"eta": 0.0}), ("euler_step", {"eta": 1.0}), ("heun_step", {}), ("dpmpp_2m_step", {}),
         ("flow_step", {}), ("flow_q_sample", {}), ("lcm_step", {})]


def main() -> None:
    import diffusers

    torch.set_num_threads(1)
    for op, params in CASES:
        case = S.Case(torch.device("cpu"), op, params, torch.float32, (64, 4, 128, 128))
        ctx = S.Ctx(case, 3, diffusers)
        specs = S.BUILDERS[op](ctx)
        specs["copy"] = lambda i, ctx=ctx: ctx.b(i)["x"].clone()
        rows = {k: specs[k] for k in ("native", "copy", "eager", "diffusers")}
        for f in rows.values():
            f(0)
            f(1)
        times = {k: [] for k in rows}
        for r in range(12):
            for k, f in rows.items():
                t0 = time.thread_time()
                f(r)
                times[k].append(time.thread_time() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{case.label:<22}" + "  ".join(f"{k} {v:7.2f} ms" for k, v in med.items())
              + f"   copy/native {med['copy'] / med['native']:.2f}  diffusers/native "
              f"{med['diffusers'] / med['native']:.1f}x  eager/native {med['eager'] / med['native']:.1f}x", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Whole 20-step sampling loops with a free model: diffkern.samplers against k-diffusion's
and ComfyUI's eager loops (issue 21's loop target: >= 2x).

    python benchmarks/sampler_loop_speed.py --quick
    python benchmarks/sampler_loop_speed.py --threads 1,2 --tag cpu-xeon-avx512-2core

Samplers: ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` (k-diffusion's signatures),
``sample_unipc`` (ComfyUI's, bh1). The eager loops are in ``_eager_samplers.py`` (k-diffusion's
code; ComfyUI's UniPC rewritten from the equations with the same tensor operations).

Rows (timed in turns: one loop of every row, then the next round, the row order rotated
every round, so a slow spell of a shared machine falls on all rows alike):
  eager           the k-diffusion / ComfyUI loop; SDE noise from k-diffusion's
                  default_noise_sampler (torch.randn_like), in place of its BrownianTree default
  diffkern        diffkern.samplers' loop, SDE noise drawn in-kernel from generator= (its default)
  diffkern+randn  (SDE only) diffkern's loop given the eager row's torch.randn_like noise_sampler:
                  what the fused steps alone give, without the in-kernel noise
  model only      the 20 model calls alone: the loops' floor

The model is free on purpose: the exact denoiser of unit-variance Gaussian data,
``D(x, sigma) = x / (1 + sigma^2)``, one multiply, so the loop's time is the sampler's.
Karras sigmas (SD's range 0.0292..14.6146, rho 7), 20 steps, float32.

Before timing, each sampler runs once per size with the same pre-drawn noise in both loops
(a noise_sampler returning the n-th draw on the n-th call) and a float64 run of the eager loop as
reference: ``err eager`` and ``err diffkern`` are max|x - x_f64| / max|x_f64| of the float32 runs,
so the rows compare equal work. Writes ``<out>/sampler_loop_speed-<tag>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _eager_samplers as E
import common as C
import torch

dk = C.import_diffkern()
from diffkern import samplers as S  # noqa: E402

SCHEMA = "diffkern.benchmarks.sampler_loop_speed/1"
SAMPLERS = ("dpmpp_2m_sde", "dpmpp_3m_sde", "unipc")
SDE = ("dpmpp_2m_sde", "dpmpp_3m_sde")
ROWS = {
    "eager": "k-diffusion's / ComfyUI's loop (benchmarks/_eager_samplers.py); SDE noise: torch.randn_like "
             "(k-diffusion's default_noise_sampler) in place of its BrownianTree default",
    "diffkern": "diffkern.samplers.sample_*; SDE noise in-kernel from generator= (diffkern's default)",
    "diffkern+randn": "diffkern.samplers.sample_* given the eager row's torch.randn_like noise_sampler (SDE only)",
    "model only": "the loop's model calls alone",
}
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146


def free_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of N(0, I) data: one multiply per element (plus a [B] vector)."""
    return x * (1 / (1 + sigma * sigma)).reshape(-1, *([1] * (x.dim() - 1)))


class Draws:
    """A noise_sampler returning pre-drawn tensors in call order, the same for every loop."""

    def __init__(self, draws):
        self.draws, self.n = draws, 0

    def __call__(self, sigma, sigma_next):
        self.n += 1
        return self.draws[self.n - 1]


def runs(name: str, sigmas: torch.Tensor, x_init: torch.Tensor, generator: torch.Generator) -> dict:
    """Row name -> a function running the whole loop from a fresh copy of x_init."""
    eager_fn, dk_fn = getattr(E, f"sample_{name}"), getattr(S, f"sample_{name}")
    if name in SDE:
        rows = {"eager": lambda: eager_fn(free_model, x_init.clone(), sigmas,
                                          noise_sampler=E.randn_sampler(x_init)),
                "diffkern": lambda: dk_fn(free_model, x_init.clone(), sigmas, disable=True, generator=generator),
                "diffkern+randn": lambda: dk_fn(free_model, x_init.clone(), sigmas, disable=True,
                                                noise_sampler=E.randn_sampler(x_init))}
    else:
        rows = {"eager": lambda: eager_fn(free_model, x_init.clone(), sigmas),
                "diffkern": lambda: dk_fn(free_model, x_init.clone(), sigmas, disable=True)}
    levels = sigmas[:-1].tolist()
    ones = x_init.new_ones([x_init.shape[0]])

    def model_only():
        x = x_init.clone()
        for s in levels:
            free_model(x, s * ones)
        return x

    rows["model only"] = model_only
    return rows


def same_work(name: str, sigmas: torch.Tensor, shape, seed: int) -> dict:
    """The float32 loops (eager and diffkern, the same noise) against the eager loop in float64."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * float(sigmas[0])
    draws = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(len(sigmas))] if name in SDE else []
    out = {}
    for key, fn, dtype in (("ref", getattr(E, f"sample_{name}"), torch.float64),
                           ("eager", getattr(E, f"sample_{name}"), torch.float32),
                           ("diffkern", getattr(S, f"sample_{name}"), torch.float32)):
        kw = {"noise_sampler": Draws([d.to(dtype) for d in draws])} if name in SDE else {}
        if key == "diffkern":
            kw["disable"] = True
        out[key] = fn(free_model, x64.to(dtype), sigmas.to(dtype), **kw).double()
        if name in SDE:
            out[f"{key}_noise_calls"] = kw["noise_sampler"].n
    scale = float(out["ref"].abs().max())
    return {"rel_err_eager_f32": float((out["eager"] - out["ref"]).abs().max()) / scale,
            "rel_err_diffkern_f32": float((out["diffkern"] - out["ref"]).abs().max()) / scale,
            "rel_diff_diffkern_vs_eager_f32": float((out["diffkern"] - out["eager"]).abs().max()) / scale,
            "noise_calls": {k[:-12]: v for k, v in out.items() if k.endswith("_noise_calls")}}


def time_case(rows: dict, args) -> dict:
    """Milliseconds per loop of every row, in rotated turns; reps to fit the budget. Wall
    time, and the process's CPU time (``cpu``): on one thread the latter leaves out the
    time other processes of a shared machine hold the core (a 4 ms time slice lands in
    a few percent of short loops and in every long one)."""
    for fn in rows.values():  # warm-up: allocator, diffkern's output cache, lazy imports
        fn()
    t0 = time.perf_counter()
    for fn in rows.values():
        fn()
    reps = C.reps_for(time.perf_counter() - t0, args.budget, args.min_reps, args.max_reps)
    names, ms, cpu = list(rows), {n: [] for n in rows}, {n: [] for n in rows}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            rows[name]()
            ms[name].append(1e3 * (time.perf_counter() - w0))
            cpu[name].append(1e3 * (time.process_time() - c0))
    return {n: C.summarize(v) | {"cpu_median_ms": C.summarize(cpu[n])["median_ms"]} for n, v in ms.items()}


def print_table(doc: dict, file=sys.stdout) -> None:
    m = doc["machine"]
    print(f"\ndiffkern sampler_loop_speed  ({m['cpu_model']}, {m['cpu_count']} CPUs; torch {doc['versions']['torch']};"
          f" {doc['settings']['steps']} steps, float32, free model)", file=file)
    print(f"  {'sampler':<14}{'shape':<14}{'thr':>4}{'eager ms':>10}{'dk ms':>9}{'dk+randn':>10}{'model':>8}"
          f"{'eager/dk':>10}{'IQR% e/d':>10}{'cpu e/dk':>10}{'err eager':>11}{'err dk':>9}", file=file)
    for c in doc["cases"]:
        t = c["times"]

        def med(n, t=t):
            return t[n]["median_ms"] if n in t else None

        iqr = "/".join(f"{100 * t[n]['iqr_ms'] / t[n]['median_ms']:.0f}" for n in ("eager", "diffkern"))
        w = c["same_work"]
        print(f"  {c['sampler']:<14}{C.shape_str(c['shape']):<14}{c['threads']:>4}{C.fmt_ms(med('eager')):>10}"
              f"{C.fmt_ms(med('diffkern')):>9}{C.fmt_ms(med('diffkern+randn')):>10}{C.fmt_ms(med('model only')):>8}"
              f"{C.fmt_ratio(c['ratio_eager_over_diffkern']):>10}{iqr:>10}"
              f"{C.fmt_ratio(c['cpu_ratio_eager_over_diffkern']):>10}{w['rel_err_eager_f32']:>11.1e}"
              f"{w['rel_err_diffkern_f32']:>9.1e}", file=file)
    print("\n'eager/dk': the eager loop's median wall time / diffkern's (issue 21's target: >= 2x); 'cpu e/dk': "
          "the same for process CPU time (one thread: not charged for other processes' time slices; two threads: "
          "includes OpenMP workers' spinning); 'err': the float32 loop vs a float64 eager run with the same "
          "noise, max|diff| / max|x|", file=file)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1x4x16x16, one thread, 0.5 s per case")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list of {', '.join(SAMPLERS)}")
    p.add_argument("--sizes", default=None, help="comma list (default 1x4x64x64,4x4x128x128,16x4x128x128)")
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default 1,2)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--budget", type=float, default=None, help="seconds per case (default 8; quick 0.5)")
    p.add_argument("--min-reps", type=int, default=None, help="at least this many rounds (default 9; quick 3)")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT, help="output folder (default benchmarks/results/)")
    p.add_argument("--tag", default=None, help="file name tag (default cpu, plus -quick)")
    args = p.parse_args(argv)
    q = args.quick
    args.sizes = [C.parse_shape(s) for s in C.split_list(args.sizes or
                                                         ("1x4x16x16" if q else "1x4x64x64,4x4x128x128,16x4x128x128"))]
    args.threads = [int(t) for t in C.split_list(args.threads or ("1" if q else "1,2"))]
    args.budget = args.budget if args.budget is not None else (0.5 if q else 8.0)
    args.min_reps = args.min_reps or (3 if q else 9)
    args.samplers = C.split_list(args.samplers)
    for name in args.samplers:
        if name not in SAMPLERS:
            raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    for shape in args.sizes:
        if len(shape) != 4:
            raise SystemExit(f"sizes must be 4-D (UniPC's einsums): {C.shape_str(shape)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.warn_if_busy()
    if not dk.native_available("cpu"):
        raise SystemExit(f"diffkern's CPU kernels are not available ({dk.native_error()}): nothing to measure")
    started = time.perf_counter()
    sigmas = S.get_sigmas_karras(args.steps, SIGMA_MIN, SIGMA_MAX)
    doc = {"schema": SCHEMA, "created": C.now_iso(), "command": [sys.executable, *sys.argv],
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": C.machine_info([torch.device("cpu")]), "versions": C.versions(C.import_diffusers()[0]),
           "native": C.native_info([torch.device("cpu")]), "rows": ROWS,
           "model": "D(x, sigma) = x / (1 + sigma^2)", "sigmas": sigmas.tolist(), "cases": []}
    checks = {}
    bar = C.progress(len(args.samplers) * len(args.sizes) * len(args.threads), "sampler_loop_speed")
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for shape in args.sizes:
                for name in args.samplers:
                    bar.set_postfix_str(f"{name} {C.shape_str(shape)} {threads} thread(s)")
                    if (name, shape) not in checks:
                        checks[name, shape] = same_work(name, sigmas, shape, args.seed)
                    g = torch.Generator().manual_seed(args.seed)
                    x_init = torch.randn(shape, generator=g) * sigmas[0]
                    times = time_case(runs(name, sigmas, x_init, g), args)
                    doc["cases"].append({
                        "sampler": name, "shape": list(shape), "threads": threads, "times": times,
                        "ratio_eager_over_diffkern": times["eager"]["median_ms"] / times["diffkern"]["median_ms"],
                        "cpu_ratio_eager_over_diffkern": times["eager"]["cpu_median_ms"]
                        / times["diffkern"]["cpu_median_ms"],
                        "same_work": checks[name, shape]})
                    bar.update()
    bar.close()
    doc["machine"]["loadavg_end"] = C.loadavg()
    doc["elapsed_s"] = time.perf_counter() - started
    path = args.out / f"sampler_loop_speed-{args.tag or 'cpu' + ('-quick' if args.quick else '')}.json"
    doc["files"] = {"json": str(path)}
    C.write_json(path, doc)
    print_table(doc)
    print(f"\nwrote {path} in {doc['elapsed_s']:.0f} s", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What does one diffkern call cost, from one element up, against the formula in eager
PyTorch and torch.compile of it? (issue 10: a call must cost about one torch op.)

    python benchmarks/overhead_sweep.py --calls            # host us per call at 1x4x8x8, one thread
    python benchmarks/overhead_sweep.py --out benchmarks/results/cpu-overhead-<date>/after
    python benchmarks/overhead_sweep.py --quick --no-compile

``--calls``: the per-call figures of the issue: mean of ``--n-calls`` (20000) calls after
warm-up, one CPU thread, 1x4x8x8 float32, the call exactly as a sampling loop writes it;
best of 3 such means, as wall time and as this thread's CPU time (the steadier of the
two on a shared machine).

The sweep: for every op and size (1 element to 64x4x128x128) and for one thread and all
threads, three rows on the same inputs:

- ``diffkern``: the public op (in-kernel noise from a generator where the op draws);
- ``eager``: the shortest formula a user would write, Python-float coefficients
  precomputed outside the loop (DDIM eta=0 is ``a*x + b*e``, two ops), noise from
  ``torch.randn(generator=)``; q_sample indexes the table with a per-sample tensor t;
- ``compile``: ``torch.compile(dynamic=True)`` of that formula, drawing its noise with
  ``torch.randn_like`` inside the graph (a generator would graph-break).

Each point is the median over 5 batches of the mean time per call (a batch runs for
about ``--budget`` seconds), as wall time and as the process's CPU time (all threads).
The plot shows CPU time for one thread (the host cost of a call, steady on a shared
machine) and wall time for all threads. Writes
``overhead_sweep.json`` and a log-log plot ``overhead_sweep.png`` (time per call vs
elements, one panel per op) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import common as C
import torch

dk = C.import_diffkern()

SCHEMA = "diffkern.benchmarks.overhead_sweep/1"
SHAPES = [(1,), (16,), (1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 32, 32), (4, 4, 32, 32), (1, 4, 128, 128),
          (4, 4, 128, 128), (16, 4, 128, 128), (64, 4, 128, 128)]
QUICK_SHAPES = [(1,), (1, 4, 8, 8), (1, 4, 32, 32), (4, 4, 128, 128)]
OPS = ("q_sample", "ddpm_step", "ddim_step_eta0", "ddim_step_eta1", "langevin_step", "ddim_backward",
       "gmm_annealed_langevin")
T, T_PREV = 500, 480


def _coeffs():
    ac = dk.NoiseSchedule.linear().alphas_cumprod.double()
    ab, abp = float(ac[T]), float(ac[T_PREV])
    sa, s1a, sap = math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(abp)
    var = (1 - abp) / (1 - ab) * (1 - ab / abp)
    # DDIM eta=0 epsilon: x' = sap (x - s1a e)/sa + sqrt(1-abp) e = a x + b e
    a0, b0 = sap / sa, math.sqrt(1 - abp) - sap * s1a / sa
    std1 = math.sqrt(var)
    b1 = math.sqrt(max(1 - abp - var, 0.0)) - sap * s1a / sa
    return dict(a0=a0, b0=b0, b1=b1, std1=std1, std_ddpm=math.sqrt(1 - ab / float(ac[T - 1])))


K = _coeffs()


def _gmm_parts(D=2, Kc=4):
    g = torch.Generator().manual_seed(3)
    w = torch.full((Kc,), 1.0 / Kc)
    mu = torch.randn(Kc, D, generator=g) * 3
    sd = torch.rand(Kc, D, generator=g) + 0.5
    return w, mu, sd


def _gmm_score_eager(x, w, mu, sd, sigma):
    var = sd * sd + sigma * sigma
    diff = mu - x[..., None, :]
    logp = torch.log(w) - 0.5 * ((diff * diff) / var + torch.log(2 * math.pi * var)).sum(-1)
    r = torch.softmax(logp, dim=-1)
    return (r[..., None] * diff / var).sum(-2)


def _compiled(f):
    """torch.compile(f, dynamic=True), built on first call (importing dynamo takes seconds,
    and --no-compile runs never need it)."""
    box = []

    def call(*args):
        if not box:
            box.append(torch.compile(f, dynamic=True))
        return box[0](*args)

    return call


def make_case(op: str, shape, threads_label: str):
    """-> (inputs, {impl: fn}) for one op and shape."""
    g = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if op == "gmm_annealed_langevin":
        n = max(1, math.prod(shape) // 2)
        x = torch.randn(n, 2, generator=g)
        w, mu, sd = _gmm_parts()
        lr = 0.01

        def native():
            return dk.gmm_annealed_langevin(x, w, mu, sd, [1.0], n_steps_each=1, step_lr=lr, generator=gen)

        def eager_f(x_, z):
            return x_ + lr * _gmm_score_eager(x_, w, mu, sd, 1.0) + math.sqrt(2 * lr) * z

        def eager():
            return eager_f(x, torch.randn(x.shape, generator=gen))

        cf = _compiled(lambda x_: eager_f(x_, torch.randn_like(x_)))
        return x.numel(), {"diffkern": native, "eager": eager, "compile": lambda: cf(x)}
    x = torch.randn(*shape, generator=g)
    e = torch.randn(*shape, generator=g)
    B = shape[0]
    if op == "q_sample":
        t = torch.randint(0, 1000, (B,), generator=g)
        table = dk.NoiseSchedule.linear().alphas_cumprod
        view = (B,) + (1,) * (len(shape) - 1)

        def eager_f(x_, t_, z):
            ab = table[t_].view(view)
            return ab.sqrt() * x_ + (1 - ab).sqrt() * z

        cf = _compiled(lambda x_, t_: eager_f(x_, t_, torch.randn_like(x_)))
        return x.numel(), {"diffkern": lambda: dk.q_sample(x, t, generator=gen),
                           "eager": lambda: eager_f(x, t, torch.randn(x.shape, generator=gen)),
                           "compile": lambda: cf(x, t)}
    if op == "ddim_step_eta0":
        a, b = K["a0"], K["b0"]
        cf = _compiled(lambda x_, e_: a * x_ + b * e_)
        return x.numel(), {"diffkern": lambda: dk.ddim_step(x, e, T, 0.0, t_prev=T_PREV),
                           "eager": lambda: a * x + b * e, "compile": lambda: cf(x, e)}
    if op in ("ddim_step_eta1", "ddpm_step", "langevin_step"):
        if op == "ddim_step_eta1":
            a, b, s = K["a0"], K["b1"], K["std1"]
            native = lambda: dk.ddim_step(x, e, T, 1.0, t_prev=T_PREV, generator=gen)  # noqa: E731
        elif op == "ddpm_step":
            a, b, s = K["a0"], K["b0"], K["std_ddpm"]
            native = lambda: dk.ddpm_step(x, e, T, generator=gen)  # noqa: E731
        else:
            a, b, s = 1.0, 0.01, math.sqrt(0.02)
            native = lambda: dk.langevin_step(x, e, 0.01, generator=gen)  # noqa: E731
        cf = _compiled(lambda x_, e_: a * x_ + b * e_ + s * torch.randn_like(x_))
        return x.numel(), {"diffkern": native,
                           "eager": lambda: a * x + b * e + s * torch.randn(x.shape, generator=gen),
                           "compile": lambda: cf(x, e)}
    if op == "ddim_backward":
        xr, er = x.clone().requires_grad_(), e.clone().requires_grad_()
        gout = torch.randn(*shape, generator=g)
        a, b = K["a0"], K["b0"]
        cf = _compiled(lambda x_, e_: a * x_ + b * e_)

        def run(f):
            def call():
                xr.grad = er.grad = None
                f(xr, er).backward(gout)
            return call

        return x.numel(), {"diffkern": run(lambda x_, e_: dk.ddim_step(x_, e_, T, 0.0, t_prev=T_PREV)),
                           "eager": run(lambda x_, e_: a * x_ + b * e_), "compile": run(cf)}
    raise ValueError(op)


def time_per_call(fn, budget_s: float, batches: int = 5) -> tuple[float, float]:
    """Median over batches of the mean time per call in microseconds: wall time, and the
    process's CPU time (all its threads; the steadier one on a shared machine, and with
    one thread the host cost of the call)."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7)
    n = int(min(max(budget_s / est, 3), 20000))
    means, cpu = [], []
    for _ in range(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        means.append((time.perf_counter() - t0) / n * 1e6)
        cpu.append((time.process_time() - c0) / n * 1e6)
    return statistics.median(means), statistics.median(cpu)


def per_call_figures(n_calls: int) -> list[dict]:
    """The issue's per-call figures: one thread, 1x4x8x8 float32, mean of n_calls."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    gen = torch.Generator().manual_seed(1)
    tt = torch.tensor([500])
    sched = dk.NoiseSchedule.linear()
    table = sched.table(x.device)
    ops = torch.ops.diffkern if dk.native_available() else None
    rows = [
        ("torch.add(x, e)", lambda: torch.add(x, e)),
        ("eager 0.9*x + 0.1*e", lambda: 0.9 * x + 0.1 * e),
        ("dk.ddim_step(x, e, 500, 0.0, t_prev=480)", lambda: dk.ddim_step(x, e, 500, 0.0, t_prev=480)),
        ("dk.ddim_step(x, e, 500)  (eta=0, t_prev default)", lambda: dk.ddim_step(x, e, 500)),
        ("dk.ddim_step(x, e, 500, 1.0, t_prev=480, generator=g)",
         lambda: dk.ddim_step(x, e, 500, 1.0, t_prev=480, generator=gen)),
        ("dk.ddpm_step(x, e, 500, generator=g)", lambda: dk.ddpm_step(x, e, 500, generator=gen)),
        ("dk.q_sample(x, tensor([500]), generator=g)", lambda: dk.q_sample(x, tt, generator=gen)),
        ("dk.langevin_step(x, e, 0.01)  (default generator)", lambda: dk.langevin_step(x, e, 0.01)),
        ("dk.langevin_step(x, e, 0.01, generator=g)", lambda: dk.langevin_step(x, e, 0.01, generator=gen)),
    ]
    # the sampler families (issue 20) beside their eager k-diffusion formulas, Python-float
    # coefficients precomputed (sigma 2 -> 1, "sample" prediction, old_denoised given)
    h = math.log(2.0)
    r_ = math.log(3.0 / 2.0) / h
    cd = 1 + 1 / (2 * r_)
    up = math.sqrt(1.0 * (4.0 - 1.0) / 4.0)
    down = math.sqrt(1.0 - up * up)
    rows += [
        ("dk.euler_step(x, e, 2.0, 1.0)", lambda: dk.euler_step(x, e, 2.0, 1.0)),
        ("eager euler: x + (x - e) / 2 * (1 - 2)", lambda: x + (x - e) / 2.0 * (1.0 - 2.0)),
        ("dk.euler_step(x, e, 2.0, 1.0, eta=1, generator=g)",
         lambda: dk.euler_step(x, e, 2.0, 1.0, eta=1.0, generator=gen)),
        ("eager euler ancestral (torch.randn noise)",
         lambda: x + (x - e) / 2.0 * (down - 2.0) + torch.randn(x.shape, generator=gen) * up),
        ("dk.dpmpp_2m_step(x, e, e, 2.0, 1.0, 3.0)", lambda: dk.dpmpp_2m_step(x, e, e, 2.0, 1.0, 3.0)),
        ("eager dpmpp_2m: 0.5 x - expm1(-h) (cd e - (cd - 1) old)",
         lambda: 0.5 * x - math.expm1(-h) * (cd * e - (cd - 1) * e)),
        ("dk.flow_step(x, e, 0.8, 0.6)", lambda: dk.flow_step(x, e, 0.8, 0.6)),
        ("eager flow: x + (0.6 - 0.8) * e", lambda: x + (0.6 - 0.8) * e),
    ]
    if ops is not None:
        rows.append(("torch.ops.diffkern.ddim_step (raw, eta=0)",
                     lambda: ops.ddim_step(x, e, tt, None, table, 0.0, 0, 0.0, None, None, 0, 0)))
    out = []
    for name, fn in rows:
        for _ in range(min(2000, n_calls)):
            fn()
        best, cpu = [], []
        for _ in range(3):  # best of 3 means of n_calls: the machine is shared
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n_calls):
                fn()
            best.append((time.perf_counter() - t0) / n_calls * 1e6)
            cpu.append((time.thread_time() - c0) / n_calls * 1e6)
        # thread CPU time: what the call costs this thread, less sensitive than wall time to
        # other processes on a shared machine
        out.append({"call": name, "us": min(best), "us_all": best, "cpu_us": min(cpu), "cpu_us_all": cpu})
        print(f"{min(best):8.2f} us wall {min(cpu):8.2f} us cpu  {name}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", action="store_true", help="only the per-call figures at 1x4x8x8")
    ap.add_argument("--n-calls", type=int, default=20000)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts; 'all' = torch's default")
    ap.add_argument("--budget", type=float, default=0.04, help="seconds per timed batch")
    ap.add_argument("--quick", action="store_true", help="four sizes")
    ap.add_argument("--shapes", default=None, help="comma list of shapes instead, e.g. 1,1x4x8x8")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(C.DEFAULT_OUT / "overhead_sweep"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.calls:
        figures = per_call_figures(args.n_calls)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        C.write_json(out / "per_call.json", {
            "schema": SCHEMA + "/calls", "when": C.now_iso(), "machine": C.machine_info([torch.device("cpu")]),
            "versions": C.versions(), "native": C.native_info([torch.device("cpu")]),
            "n_calls": args.n_calls, "threads": 1, "shape": [1, 4, 8, 8], "rows": figures,
            "elapsed_s": time.perf_counter() - t_start})
        return 0
    all_threads = torch.get_num_threads()
    threads = [all_threads if s == "all" else int(s) for s in C.split_list(args.threads)]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [C.parse_shape(v) for v in C.split_list(args.shapes)]
    ops = C.split_list(args.ops)
    results = []
    for op in ops:
        for shape in shapes:
            for nt in threads:
                torch.set_num_threads(nt)
                numel, impls = make_case(op, shape, str(nt))
                for impl, fn in impls.items():
                    if impl == "compile" and args.no_compile:
                        continue
                    try:
                        us, cpu_us = time_per_call(fn, args.budget)
                    except Exception as exc:  # e.g. compile unavailable
                        print(f"{op} {shape} {impl}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
                        us = cpu_us = None
                    results.append({"op": op, "shape": list(shape), "numel": numel, "threads": nt, "impl": impl,
                                    "us_per_call": us, "cpu_us_per_call": cpu_us})
                    print(f"{op:22s} {C.shape_str(shape):14s} thr={nt} {impl:9s} "
                          f"{'-' if us is None else f'{us:10.2f}'} us wall "
                          f"{'-' if cpu_us is None else f'{cpu_us:10.2f}'} us cpu", flush=True)
    torch.set_num_threads(all_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "overhead_sweep.png"
    _plot(results, ops, threads, plot)
    C.write_json(out / "overhead_sweep.json", {
        "schema": SCHEMA, "when": C.now_iso(), "machine": C.machine_info([torch.device("cpu")]),
        "versions": C.versions(), "native": C.native_info([torch.device("cpu")]), "threads": threads,
        "results": results, "files": {"plot": str(plot)}, "elapsed_s": time.perf_counter() - t_start})
    return 0


def _plot(results, ops, threads, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ops)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"diffkern": "-o", "eager": "--s", "compile": ":^"}
    for ax, op in zip(axes.flat, ops, strict=False):
        for impl, style in styles.items():
            for nt in threads:
                key = "cpu_us_per_call" if nt == 1 else "us_per_call"  # 1 thread: host cost; else latency
                pts = sorted((r["numel"], r[key]) for r in results
                             if r["op"] == op and r["impl"] == impl and r["threads"] == nt and r.get(key))
                if pts:
                    ax.loglog(*zip(*pts, strict=True), style, ms=3, alpha=0.9 if nt == 1 else 0.5,
                              label=f"{impl} {nt}thr {'cpu' if nt == 1 else 'wall'}")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("elements")
        ax.set_ylabel("us per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
